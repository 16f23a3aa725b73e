"""The collector on a real PostgreSQL server beside SQLite (tests/conftest.py starts the server): exactness against a
brute-force computation over every activation, a rerun that does nothing, resume after an interruption, a damaged
checkpoint (a file beside a SQLite database, rows in a PostgreSQL one) never resumed from, the database checkpoint
written in parts and replaced whole, and a PostgreSQL collection resumed from its pre-schema-6 file."""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sqlmodel import select

from autointerp.collect.buffers import SALT_QUANTILE, Dense, Sparse, hash_uniform, hist_bins, random_pool
from autointerp.collect.checkpoint import DatabaseCheckpoint, FileCheckpoint, checkpoint_dir, checkpoint_for
from autointerp.collect.run import run_collect, source_specs
from autointerp.config import RunConfig
from autointerp.corpus import tokenize_corpus
from autointerp.store import open_store
from autointerp.store.blobs import unpack_f16
from autointerp.store.checkpoints import checkpoint_writer, delete_checkpoint, read_checkpoint
from autointerp.store.runs import worker_name
from autointerp.store.tables import Context, Feature, Record, Run
from autointerp.subject.sites import capture
from autointerp.subject.sources import load_sources

SITE_N = "blocks.1.mlp.post"
SITE_R = "blocks.1.resid.post"  # collect_config's site and its SAEs'


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest) -> str | None:
    """The database a test collects into: None for a SQLite file in its directory, else a new PostgreSQL one."""
    return None if request.param == "sqlite" else str(request.getfixturevalue("postgres_db"))


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
    sources = load_sources(subject, source_specs(cfg))
    acts = capture(subject.model, subject.layout, [SITE_N, SITE_R], torch.from_numpy(corpus.tokens), stop_early=False)
    out = []
    for s in sources:
        x = acts[s.read_site][:, 1 + cfg.collect.skip_positions :, :]
        dense = Sparse(*s.encode_sparse(x), s.n_features).dense() if s.sparse else s.encode(x)
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


@pytest.mark.parametrize(("skip", "backend"), [(0, "sqlite"), (1, "sqlite"), (0, "postgresql")])
def test_collector_matches_brute_force(
    tmp_path: Path,
    small_corpus: Path,
    tiny_gpt2_dir: Path,
    tiny_subject: Any,
    request: pytest.FixtureRequest,
    skip: int,
    backend: str,
    collect_config: Any,
) -> None:
    db = request.getfixturevalue("postgres_db") if backend == "postgresql" else None
    cfg = collect_config(tmp_path, small_corpus, tiny_gpt2_dir, db, skip_positions=skip)
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
            feats = s.exec(select(Feature).where(Feature.source == source.name)).all()
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
    tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path, tiny_subject: Any, db: str | None, collect_config: Any
) -> None:
    cfg = collect_config(tmp_path, small_corpus, tiny_gpt2_dir, db)
    store = open_store(cfg.db)
    run_collect(cfg, store, subject=tiny_subject)
    before = _db_dump(cfg.db)
    again = run_collect(cfg, store, subject=tiny_subject)
    assert again.status == "already-done"
    assert _db_dump(cfg.db) == before


@pytest.mark.parametrize(("fail_at", "backend"), [(1, "sqlite"), (6, "sqlite"), (6, "postgresql")])
def test_resume_after_interruption_equals_uninterrupted(
    tmp_path: Path,
    small_corpus: Path,
    tiny_gpt2_dir: Path,
    tiny_subject: Any,
    request: pytest.FixtureRequest,
    fail_at: int,
    backend: str,
    collect_config: Any,
) -> None:
    (tmp_path / "ref").mkdir()
    ref = collect_config(tmp_path / "ref", small_corpus, tiny_gpt2_dir)
    run_collect(ref, open_store(ref.db), subject=tiny_subject)

    (tmp_path / "cut").mkdir()
    db = request.getfixturevalue("postgres_db") if backend == "postgresql" else None
    cfg = collect_config(tmp_path / "cut", small_corpus, tiny_gpt2_dir, db)
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
    assert run.status == "interrupted" and run.finished_at is not None
    assert run.error is not None and f"{fail_at + 1} of {run.total} batches done" in run.error
    assert run.worker == worker_name() and run.heartbeat_at is not None
    saved = fail_at // 2 * 2  # checkpoint_tokens 100 // (3 contexts x 16 tokens): a checkpoint every 2 batches
    assert run.progress == saved and (
        f"checkpoint ({saved} batches)" in run.error if saved else "start again" in run.error
    )
    ckpt = checkpoint_for(store, run.key)
    assert ckpt.exists() == bool(saved) and isinstance(ckpt, DatabaseCheckpoint) == (backend == "postgresql")
    if saved:
        assert run.checkpoint == ckpt.label(hashlib.sha256(_checkpoint_bytes(store, run.key)[:-48]).hexdigest())
    resumed = run_collect(cfg, store, subject=tiny_subject)
    assert resumed.status == "done" and resumed.resumed_at_batch == saved
    assert _db_dump(cfg.db) == _db_dump(ref.db)
    assert not ckpt.exists() and not any(checkpoint_dir(store).glob("*.pt"))
    with store.session() as s:
        run = s.exec(select(Run)).one()
    assert run.status == "done" and run.error is None and run.counts["resumed_at_batch"] == saved
    assert run.heartbeat_at is not None and run.heartbeat_at >= run.started_at


def _checkpoint_bytes(store: Any, key: str) -> bytes:
    """The stored checkpoint of run `key`: its file's bytes, or its parts in the database joined."""
    ckpt = checkpoint_for(store, key)
    if isinstance(ckpt, FileCheckpoint):
        return ckpt.path.read_bytes()
    data = read_checkpoint(store, key)
    assert data is not None
    return data


def _interrupted_run(
    tmp_path: Path,
    small_corpus: Path,
    tiny_gpt2_dir: Path,
    tiny_subject: Any,
    collect_config: Any,
    db: str | None = None,
) -> tuple[Any, Any]:
    """A reference database (SQLite), and a run of the same config on `db` stopped after batch 7 (its checkpoint
    holds 6)."""
    (tmp_path / "ref").mkdir()
    ref = collect_config(tmp_path / "ref", small_corpus, tiny_gpt2_dir)
    run_collect(ref, open_store(ref.db), subject=tiny_subject)
    (tmp_path / "cut").mkdir()
    cfg = collect_config(tmp_path / "cut", small_corpus, tiny_gpt2_dir, db).model_copy(update={"collect": ref.collect})
    store = open_store(cfg.db)

    def interrupt(i: int) -> None:
        if i == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_collect(cfg, store, subject=tiny_subject, on_batch=interrupt)
    return ref, cfg


def _damaged(data: bytes, how: str) -> bytes:
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "bit-flipped":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x10  # inside the state: torch may still read it, the checksum does not match
        return bytes(flipped)
    buf = io.BytesIO()
    if how == "no checksum":  # a checkpoint as autointerp wrote them before they carried one
        torch.save(torch.load(io.BytesIO(data[:-48]), weights_only=True), buf)
        return buf.getvalue()
    torch.save({"x": torch.zeros(2)}, buf)  # a checksummed file that is not a checkpoint
    payload = buf.getvalue()
    return payload + b"AICKPT1\n" + len(payload).to_bytes(8, "little") + hashlib.sha256(payload).digest()


def _damage(store: Any, key: str, how: str) -> str:
    """Damage the stored checkpoint of run `key` (its file, or its rows: in parts of 1 kB, so that the damage
    falls in a part of its own); returns where it is, as the collector's warning names it."""
    ckpt = checkpoint_for(store, key)
    data = _damaged(_checkpoint_bytes(store, key), how)
    if isinstance(ckpt, FileCheckpoint):
        ckpt.path.write_bytes(data)
    else:
        with checkpoint_writer(store, key, part_bytes=1024) as sink:
            sink.write(data)
    return str(ckpt)


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("truncated", "no checksum at its end"),
        ("bit-flipped", "SHA-256 mismatch"),
        ("no checksum", "no checksum at its end"),
        ("not a checkpoint", "not a checkpoint of this collection"),
    ],
)
def test_damaged_checkpoint_restarts_from_the_start_with_a_warning(
    tmp_path: Path,
    small_corpus: Path,
    tiny_gpt2_dir: Path,
    tiny_subject: Any,
    caplog: pytest.LogCaptureFixture,
    db: str | None,
    how: str,
    reason: str,
    collect_config: Any,
) -> None:
    ref, cfg = _interrupted_run(tmp_path, small_corpus, tiny_gpt2_dir, tiny_subject, collect_config, db)
    store = open_store(cfg.db)
    with store.session() as s:
        key = s.exec(select(Run)).one().key
    where = _damage(store, key, how)
    with caplog.at_level(logging.WARNING, logger="autointerp.collect.run"):
        again = run_collect(cfg, store, subject=tiny_subject)
    assert again.status == "done" and again.resumed_at_batch == 0  # never resumed from it
    assert again.checkpoint_rejected is not None and reason in again.checkpoint_rejected
    assert any(where in r.getMessage() and reason in r.getMessage() for r in caplog.records), caplog.text
    with store.session() as s:
        run = s.exec(select(Run)).one()
    assert reason in run.counts["checkpoint_rejected"] and run.counts["resumed_at_batch"] == 0
    assert _db_dump(cfg.db) == _db_dump(ref.db)


def test_database_checkpoint_goes_in_parts_and_is_replaced_whole(
    postgres_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint larger than a part is stored as several rows and read back whole; a write cut off inside its
    transaction (an error, as a kill would) leaves the previous checkpoint as it was."""
    from autointerp.collect.sampler import FeatureSampler, SamplerConfig
    from autointerp.store import checkpoints
    from autointerp.store.tables import CheckpointPart

    monkeypatch.setattr(checkpoints, "CHECKPOINT_PART_BYTES", 4096)
    store = open_store(postgres_db)

    def sampler() -> FeatureSampler:
        return FeatureSampler(50, 8, SamplerConfig(top_k=4, n_quantiles=1, per_quantile=1, n_random=1), np.arange(2))

    first = sampler()
    first.update(Dense(torch.rand(2, 8, 50)), torch.arange(2))
    ckpt = DatabaseCheckpoint(store, "collect-k")
    digest = ckpt.save(3, [first], lambda: None)
    with store.session() as s:
        parts = s.exec(select(CheckpointPart).where(CheckpointPart.key == "collect-k")).all()
    assert len(parts) > 3 and all(len(p.data) == 4096 for p in parts[:-1])
    data = read_checkpoint(store, "collect-k")
    assert data is not None and hashlib.sha256(data[:-48]).hexdigest() == digest

    def killed() -> None:
        raise RuntimeError("killed while writing")

    second = sampler()
    second.update(Dense(torch.rand(2, 8, 50) + 5), torch.arange(2))
    with pytest.raises(RuntimeError, match="killed"):
        ckpt.save(5, [second], killed)
    back = sampler()
    assert ckpt.restore([back], 10) == 3 and torch.equal(back.max, first.max)
    ckpt.remove()
    assert not ckpt.exists()
    store.engine.dispose()


def test_postgresql_collection_resumes_from_its_pre_schema_6_file(
    tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path, tiny_subject: Any, postgres_db: str, collect_config: Any
) -> None:
    """Before schema 6 a PostgreSQL collection checkpointed to a file in this machine's cache: one interrupted
    then is resumed from that file after the upgrade, and the file is gone once the database holds a checkpoint."""
    ref, cfg = _interrupted_run(tmp_path, small_corpus, tiny_gpt2_dir, tiny_subject, collect_config, postgres_db)
    store = open_store(cfg.db)
    with store.session() as s:
        key = s.exec(select(Run)).one().key
    legacy = checkpoint_dir(store) / f"{key}.pt"
    legacy.parent.mkdir(parents=True, exist_ok=True)
    legacy.write_bytes(_checkpoint_bytes(store, key))
    delete_checkpoint(store, key)  # as schema 5 left it: the file alone
    again = run_collect(cfg, store, subject=tiny_subject)
    assert again.status == "done" and again.resumed_at_batch == 6 and again.checkpoint_rejected is None
    assert _db_dump(cfg.db) == _db_dump(ref.db)
    assert not legacy.exists() and read_checkpoint(store, key) is None
