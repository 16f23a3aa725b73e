"""The collector on a tiny GPT-2: BOS exclusion, config errors that name the input, SAEs that must fit their site,
non-finite activations, the checkpoint file's checksum, Ctrl-C during a checkpoint. Its exactness against a
brute-force computation, resume and damaged checkpoints, on SQLite and on PostgreSQL: tests/integration/
test_collect_postgres.py."""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sqlmodel import select

from autointerp.collect.buffers import Dense, Sparse
from autointerp.collect.run import run_collect, source_specs
from autointerp.config import load_config
from autointerp.corpus import tokenize_corpus
from autointerp.store import open_store
from autointerp.store.blobs import unpack_f16
from autointerp.store.tables import Feature, Record, Run
from autointerp.subject.sites import capture
from autointerp.subject.sources import load_sources

SITE_N = "blocks.1.mlp.post"
SITE_R = "blocks.1.resid.post"  # collect_config's site and its SAEs'


def test_state_file_round_trip_and_checksum(tmp_path: Path) -> None:
    from autointerp.collect.buffers import CheckpointError, read_state, save_state
    from autointerp.collect.sampler import FeatureSampler, SamplerConfig

    sampler = FeatureSampler(5, 3, SamplerConfig(top_k=2, n_quantiles=1, per_quantile=1, n_random=1), np.arange(2))
    sampler.update(Dense(torch.rand(2, 3, 5)), torch.arange(2))
    path = tmp_path / "c.pt"
    digest = save_state(path, {"next_batch": 7, "samplers": [sampler.state()]})
    data = path.read_bytes()
    assert hashlib.sha256(data[:-48]).hexdigest() == digest and data[-48:-40] == b"AICKPT1\n"
    state = read_state(path)
    assert state["next_batch"] == 7 and torch.equal(state["samplers"][0]["max"], sampler.max)
    path.write_bytes(data[:40])
    with pytest.raises(CheckpointError, match="too short"):
        read_state(path)


def test_bos_is_excluded(
    tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path, tiny_subject: Any, collect_config: Any
) -> None:
    cfg = collect_config(tmp_path, small_corpus, tiny_gpt2_dir, saes=[])
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


def test_sae_must_fit_its_site(
    tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path, tiny_subject: Any, collect_config: Any, random_sae: Any
) -> None:
    from autointerp.subject.sae import SAEFormatError

    sae = random_sae(tmp_path, "relu", 64)  # trained on blocks.1.resid.post
    cfg = collect_config(tmp_path, small_corpus, tiny_gpt2_dir, saes=[{"path": str(sae), "site": SITE_N}])
    with pytest.raises(SAEFormatError, match=r"sae-relu.*resid\.post.*mlp\.post"):
        load_sources(tiny_subject, source_specs(cfg))
    odd = tmp_path / "odd"  # _cfg rewrites the default SAE directories, so edit a copy
    shutil.copytree(sae, odd)
    cfg_json = odd / "cfg.json"
    text = cfg_json.read_text().replace("hook_resid_post", "mlp.hook_post").replace("resid.post", "mlp.post")
    cfg_json.write_text(text)  # now claims blocks.1.mlp.post (128 wide) with d_in 64
    cfg = collect_config(tmp_path, small_corpus, tiny_gpt2_dir, saes=[{"path": str(odd)}])
    with pytest.raises(SAEFormatError, match=r"odd.*d_in=64.*width 128"):
        load_sources(tiny_subject, source_specs(cfg))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_activations_stop_the_run_naming_site_and_batch(
    tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path, tiny_subject: Any, bad: float, collect_config: Any
) -> None:
    from autointerp.collect.sampler import NonFiniteActivations

    cfg = collect_config(tmp_path, small_corpus, tiny_gpt2_dir)
    store = open_store(cfg.db)
    calls = []

    def poison(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
        calls.append(1)
        if len(calls) == 3:  # the third batch: neuron 5 of its second context, at absolute position 4
            args[0][1, 4, 5] = bad

    mlp_down = tiny_subject.model.transformer.h[1].mlp.c_proj  # its input is blocks.1.mlp.post
    handle = mlp_down.register_forward_pre_hook(poison)
    try:
        with pytest.raises(NonFiniteActivations) as info:
            run_collect(cfg, store, subject=tiny_subject)
    finally:
        handle.remove()
    msg = str(info.value)
    assert msg.startswith("non-finite activations at site blocks.1.mlp.post (neurons) in batch 3 of "), msg
    assert "(contexts 6-8): 1 value(s) NaN or inf in 1 feature(s) [5]" in msg, msg
    assert f"feature 5 = {bad} at context 7, position 2" in msg and "float32" in msg, msg
    with store.session() as s:
        assert s.exec(select(Feature)).first() is None  # nothing of the poisoned pass was written
        run = s.exec(select(Run)).one()
    assert run.status == "failed" and run.error is not None and "batch 3 of" in run.error
    again = run_collect(cfg, store, subject=tiny_subject)  # the cause gone, the rerun goes on from its checkpoint
    assert again.status == "done" and again.resumed_at_batch == 2


@pytest.mark.parametrize("sparse", [False, True])
def test_sampler_refuses_a_non_finite_batch_before_changing_its_state(sparse: bool) -> None:
    from autointerp.collect.sampler import FeatureSampler, NonFiniteActivations, SamplerConfig

    sampler = FeatureSampler(6, 4, SamplerConfig(top_k=2, n_quantiles=1, per_quantile=1, n_random=1), np.arange(3))
    good = torch.rand(3, 4, 6)
    sampler.update(Dense(good), torch.arange(3))
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sampler.state().items() if k != "top"}
    acts = torch.rand(3, 4, 6)
    acts[2, 1, 4] = math.nan
    if sparse:
        values, indices = acts.topk(2, dim=-1)
        batch: Any = Sparse(values, indices, 6)
    else:
        batch = Dense(acts)
    with pytest.raises(
        NonFiniteActivations, match=r"feature\(s\) \[4\], e.g. feature 4 = nan at context 5, position 1"
    ):
        sampler.update(batch, torch.arange(3, 6))
    for k, v in before.items():
        now = sampler.state()[k]
        assert torch.equal(now, v) if isinstance(v, torch.Tensor) else now == v, k


def test_a_ctrl_c_during_a_checkpoint_takes_effect_after_it() -> None:
    """The checkpoint on disk and the count the interruption message reports change together."""
    import os
    import signal

    from autointerp.collect.checkpoint import ctrl_c_after

    done = []
    with pytest.raises(KeyboardInterrupt), ctrl_c_after():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("saved")  # still runs: the signal waits for the block's end
        done.append("counted")
    assert done == ["saved", "counted"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back
