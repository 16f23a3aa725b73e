"""Collector exactness against a brute-force computation over every activation, resume, BOS exclusion."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sqlmodel import select

from autointerp.collect.buffers import SALT_QUANTILE, Dense, hash_uniform, hist_bins, random_pool
from autointerp.collect.run import checkpoint_dir, load_sources, run_collect
from autointerp.config import RunConfig, load_config
from autointerp.corpus import tokenize_corpus
from autointerp.store import open_store
from autointerp.store.blobs import unpack_f16
from autointerp.store.tables import Context, Feature, Record, Run
from autointerp.subject.sae import SAE, SAEConfig, save_sae
from autointerp.subject.sites import capture

SITE_N = "blocks.1.mlp.post"
SITE_R = "blocks.1.resid.post"


def _sae(tmp: Path, arch: str, d_in: int, d_sae: int = 48, k: int | None = 4) -> Path:
    g = torch.Generator().manual_seed(1 if arch == "topk" else 2)
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k if arch == "topk" else None, site=SITE_R)  # type: ignore[arg-type]
    sae = SAE(
        cfg,
        W_enc=torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in),
        b_enc=torch.randn(d_sae, generator=g) * 0.1 - 0.05,
        W_dec=torch.randn(d_sae, d_in, generator=g) / math.sqrt(d_sae),
        b_dec=torch.randn(d_in, generator=g) * 0.01,
    )
    return save_sae(sae, tmp / f"sae-{arch}")


def _cfg(tmp: Path, corpus: Path, model_dir: Path, **collect: Any) -> RunConfig:
    base = {
        "db": f"sqlite:///{tmp}/a.sqlite",
        "model": {"name": str(model_dir)},
        "corpus": {"source": str(corpus), "ctx_len": 16, "max_tokens": None, "seed": 3},
        "collect": {
            "sites": [SITE_N],
            "saes": [{"path": str(_sae(tmp, "topk", 64))}, {"path": str(_sae(tmp, "relu", 64))}],
            "batch_size": 3,
            "top_k": 5,
            "n_quantiles": 3,
            "per_quantile": 2,
            "n_random": 4,
            "histogram_every": 1,
            "checkpoint_tokens": 100,
            "write_batch_features": 7,
        }
        | collect,
    }
    return RunConfig.model_validate(base)


def _brute(cfg: RunConfig, subject: Any) -> tuple[Any, list[tuple[Any, np.ndarray]]]:
    corpus = tokenize_corpus(
        cfg.corpus.source,
        subject.tokenizer,
        tokenizer_name=subject.name,
        bos_token_id=subject.bos_token_id,
        ctx_len=cfg.corpus.ctx_len,
        max_tokens=None,
        seed=cfg.corpus.seed,
    )
    sources, _ = load_sources(cfg, subject)
    acts = capture(subject.model, subject.layout, [SITE_N, SITE_R], torch.from_numpy(corpus.tokens), stop_early=False)
    out = []
    for s in sources:
        x = acts[s.site][:, 1 + cfg.collect.skip_positions :, :]
        batch = s.encode(x)
        dense = batch.acts if isinstance(batch, Dense) else batch.dense()
        out.append((s, dense.numpy().astype(np.float64)))
    return corpus, out


def _db_dump(url: str) -> dict[str, Any]:
    store = open_store(url)
    with store.session() as s:
        feats = {
            f.key: (f.status, f.max_act, f.mean_act, f.density, f.n_tokens, f.histogram["counts"])
            for f in s.exec(select(Feature)).all()
        }
        ctx = {c.id: c.idx for c in s.exec(select(Context)).all()}
        keys = {f.id: f.key for f in s.exec(select(Feature)).all()}
        recs = sorted(
            (keys[r.feature_id], ctx[r.context_id], r.role, r.split, r.rank, r.bin, r.max_act, r.acts)
            for r in s.exec(select(Record)).all()
        )
    return {"features": feats, "records": recs}


@pytest.mark.parametrize("skip", [0, 1])
def test_collector_matches_brute_force(
    tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path, tiny_subject: Any, skip: int
) -> None:
    cfg = _cfg(tmp_path, small_corpus, tiny_gpt2_dir, skip_positions=skip)
    store = open_store(cfg.db)
    summary = run_collect(cfg, store, subject=tiny_subject)
    corpus, sources = _brute(cfg, tiny_subject)
    n_ctx = corpus.n_contexts
    assert summary.n_tokens == n_ctx * (15 - cfg.collect.skip_positions)
    pool = random_pool(n_ctx, 8, seed=cfg.corpus.seed)
    c = cfg.collect
    with store.session() as s:
        ctx_idx = {row.id: row.idx for row in s.exec(select(Context)).all()}
        for source, dense in sources:
            feats = s.exec(select(Feature).where(Feature.source == source.source)).all()
            assert len(feats) == source.n_features  # dead ones included, never dropped
            for f in feats:
                a = dense[:, :, f.index]  # [N, P] without BOS
                assert f.max_act == pytest.approx(a.max(), rel=1e-5, abs=1e-6)
                assert f.mean_act == pytest.approx(a.mean(), rel=1e-4, abs=1e-6)
                assert f.density == pytest.approx((a > 0).mean())
                assert f.status == ("dead" if (a <= 0).all() else "ok")
                pos = torch.from_numpy(a[a > 0])
                expect_hist = np.bincount(hist_bins(pos).numpy(), minlength=len(f.histogram["counts"]))
                assert f.histogram["counts"] == expect_hist.tolist()
                recs = s.exec(select(Record).where(Record.feature_id == f.id)).all()
                by_role: dict[str, list[Record]] = {}
                for r in recs:
                    by_role.setdefault(r.role, []).append(r)
                    got = unpack_f16(r.acts)
                    np.testing.assert_allclose(got, a[ctx_idx[r.context_id]], rtol=2e-3, atol=2e-3)
                    assert r.max_act == pytest.approx(a[ctx_idx[r.context_id]].max(), rel=2e-3, abs=2e-3)
                assert len({r.context_id for r in recs}) == len(recs)
                # Top-k: the k largest context maxima among activating contexts.
                cmax = a.max(axis=1)
                activating = np.flatnonzero(cmax > 0)
                expect_top = np.sort(cmax[activating])[::-1][: c.top_k]
                top = sorted(by_role.get("top", []), key=lambda r: r.rank)
                np.testing.assert_allclose([r.max_act for r in top], expect_top, rtol=1e-5)
                assert [r.split for r in top] == ["train" if i % 2 == 0 else "test" for i in range(len(top))]
                top_ctx = {ctx_idx[r.context_id] for r in top}
                # Quantiles: reservoir = largest hash keys among activating contexts, binned by rank of activation.
                keys = hash_uniform(torch.from_numpy(activating), torch.tensor(f.index), SALT_QUANTILE).numpy()
                res = activating[np.argsort(-keys, kind="stable")][:12]
                res = res[np.lexsort((res, cmax[res].astype(np.float32)))]  # by activation, ties by context
                bin_of = {int(cx): (i * c.n_quantiles) // max(len(res), 1) for i, cx in enumerate(res)}
                for r in by_role.get("quantile", []):
                    cx = ctx_idx[r.context_id]
                    assert cx in bin_of and bin_of[cx] == r.bin and cx not in top_ctx
                for b in range(c.n_quantiles):
                    avail = [cx for cx, bb in bin_of.items() if bb == b and cx not in top_ctx]
                    got_b = [r for r in by_role.get("quantile", []) if r.bin == b]
                    assert len(got_b) == min(c.per_quantile, len(avail))
                # Random: the shared pool in order, minus contexts already chosen.
                chosen = top_ctx | {ctx_idx[r.context_id] for r in by_role.get("quantile", [])}
                expect_rand = [int(cx) for cx in pool if cx not in chosen][: c.n_random]
                rand = sorted(by_role.get("random", []), key=lambda r: r.rank)
                assert [ctx_idx[r.context_id] for r in rand] == expect_rand
                assert all(r.split == "test" for r in rand)


def test_rerun_of_finished_collection_does_nothing(
    tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path, tiny_subject: Any
) -> None:
    cfg = _cfg(tmp_path, small_corpus, tiny_gpt2_dir)
    store = open_store(cfg.db)
    run_collect(cfg, store, subject=tiny_subject)
    before = _db_dump(cfg.db)
    again = run_collect(cfg, store, subject=tiny_subject)
    assert again.status == "already-done"
    assert _db_dump(cfg.db) == before


@pytest.mark.parametrize("fail_at", [1, 6])
def test_resume_after_interruption_equals_uninterrupted(
    tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path, tiny_subject: Any, fail_at: int
) -> None:
    (tmp_path / "ref").mkdir()
    ref = _cfg(tmp_path / "ref", small_corpus, tiny_gpt2_dir)
    run_collect(ref, open_store(ref.db), subject=tiny_subject)

    (tmp_path / "cut").mkdir()
    cfg = _cfg(tmp_path / "cut", small_corpus, tiny_gpt2_dir)
    # Same SAE files as the reference run, so the runs are comparable.
    cfg = cfg.model_copy(update={"collect": ref.collect})
    store = open_store(cfg.db)

    def interrupt(i: int) -> None:
        if i == fail_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_collect(cfg, store, subject=tiny_subject, on_batch=interrupt)
    with store.session() as s:
        run = s.exec(select(Run)).one()
        assert run.status == "running"
    resumed = run_collect(cfg, store, subject=tiny_subject)
    assert resumed.status == "done"
    assert _db_dump(cfg.db) == _db_dump(ref.db)
    assert not any(checkpoint_dir(store).glob("*.pt"))


def test_bos_is_excluded(tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path, tiny_subject: Any) -> None:
    cfg = _cfg(tmp_path, small_corpus, tiny_gpt2_dir, saes=[])
    store = open_store(cfg.db)
    run_collect(cfg, store, subject=tiny_subject)
    corpus = tokenize_corpus(
        str(small_corpus),
        tiny_subject.tokenizer,
        tokenizer_name=tiny_subject.name,
        bos_token_id=tiny_subject.bos_token_id,
        ctx_len=16,
        seed=3,
    )
    acts = capture(tiny_subject.model, tiny_subject.layout, [SITE_N], torch.from_numpy(corpus.tokens))[SITE_N]
    with store.session() as s:
        for f in s.exec(select(Feature)).all():
            no_bos = acts[:, 2:, f.index]  # BOS and the first token after it (skip_positions=1)
            assert f.max_act == pytest.approx(float(no_bos.max()), rel=1e-5)
            for r in s.exec(select(Record).where(Record.feature_id == f.id)).all():
                assert len(unpack_f16(r.acts)) == 14  # ctx_len - 1 - skip_positions: BOS is never stored
    assert (corpus.tokens[:, 0] == tiny_subject.bos_token_id).all()


def test_config_errors_name_the_input(tmp_path: Path) -> None:
    from autointerp.config import ConfigError

    bad = tmp_path / "bad.toml"
    bad.write_text("[collect]\nbatch_size = 'x'\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("[collect]\nbatchsize = 3\n")
    with pytest.raises(ConfigError, match="batchsize"):
        load_config(typo)


def test_sae_must_fit_its_site(tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path, tiny_subject: Any) -> None:
    from autointerp.subject.sae import SAEFormatError

    sae = _sae(tmp_path, "relu", 64)  # trained on blocks.1.resid.post
    cfg = _cfg(tmp_path, small_corpus, tiny_gpt2_dir, saes=[{"path": str(sae), "site": SITE_N}])
    with pytest.raises(SAEFormatError, match=r"sae-relu.*resid\.post.*mlp\.post"):
        load_sources(cfg, tiny_subject)
    odd = tmp_path / "odd"  # _cfg rewrites the default SAE directories, so edit a copy
    shutil.copytree(sae, odd)
    cfg_json = odd / "cfg.json"
    text = cfg_json.read_text().replace("hook_resid_post", "mlp.hook_post").replace("resid.post", "mlp.post")
    cfg_json.write_text(text)  # now claims blocks.1.mlp.post (128 wide) with d_in 64
    cfg = _cfg(tmp_path, small_corpus, tiny_gpt2_dir, saes=[{"path": str(odd)}])
    with pytest.raises(SAEFormatError, match=r"odd.*d_in=64.*width 128"):
        load_sources(cfg, tiny_subject)
