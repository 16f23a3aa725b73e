"""Transcoders: the SAE module with write sites (encode like an SAE, decode to the write site, forward adds the skip
connection), SAELens' and sparsify's transcoders read from files their own code wrote and encoded as they encode
them, and a transcoder source on a tiny GPT-2: collected at its read site, steered and logit-lensed at its write
site, stored as an `sae` row that reloads, refused before anything is written when it does not fit the model."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlmodel import select

import autointerp.collect.run as collect_run
from autointerp.config import RunConfig
from autointerp.corpus import tokenize_corpus
from autointerp.intervene.hooks import (
    Direction,
    Intervention,
    InterventionError,
    Latent,
    intervene,
    load_target,
    target_of,
)
from autointerp.intervene.steer import residual_direction
from autointerp.review.pages import transcoder_line
from autointerp.store import open_store
from autointerp.store.tables import Feature, SAERow
from autointerp.subject.sae import SAE, SAEConfig, SAEFormatError, load_sae, save_sae, stable_id
from autointerp.subject.sites import capture
from autointerp.subject.sources import TRANSCODER, SAESource, load_sources

READ, WRITE = "blocks.1.mlp.in", "blocks.1.mlp.out"  # both of width 64 on the tiny GPT-2


def _transcoder(
    arch: str = "relu", *, skip: bool = False, d_in: int = 64, d_out: int = 64, d_sae: int = 32, seed: int = 1
) -> SAE:
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(
        d_in=d_in, d_sae=d_sae, architecture=arch, k=4 if arch == "topk" else None, apply_b_dec_to_input=False,
        site=READ, write_sites=(WRITE,), d_out=d_out, skip=skip,
    )  # fmt: skip
    t = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in),
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "W_dec": torch.randn(d_sae, d_out, generator=g) / math.sqrt(d_sae),
        "b_dec": torch.randn(d_out, generator=g) * 0.1,
    }
    if arch == "jumprelu":
        t["threshold"] = torch.rand(d_sae, generator=g) * 0.3
    if skip:
        t["W_skip"] = torch.randn(d_in, d_out, generator=g) / math.sqrt(d_in)
    return SAE(cfg, **t)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_forward_is_decode_of_encode_plus_skip(arch: str) -> None:
    tc = _transcoder(arch, skip=True, d_out=48)
    x = torch.randn(3, 5, 64)
    z = tc.encode(x)
    pre = x @ tc.W_enc + tc.b_enc  # b_dec is an output bias: never subtracted from the input
    if arch == "relu":
        torch.testing.assert_close(z, pre.relu())
    want = z @ tc.W_dec + tc.b_dec + x @ tc.W_skip
    torch.testing.assert_close(tc(x), want)
    assert tc(x).shape == (3, 5, 48)
    with pytest.raises(ValueError, match="apply_b_dec_to_input"):
        SAEConfig(d_in=4, d_sae=4, architecture="relu", site=READ, write_sites=(WRITE,))
    with pytest.raises(SAEFormatError, match="W_skip"):
        SAE(tc.cfg, W_enc=tc.W_enc, b_enc=tc.b_enc, W_dec=tc.W_dec, b_dec=tc.b_dec)


def test_saes_keep_their_ids_and_a_transcoder_differs() -> None:
    tc = _transcoder()
    sae_cfg = SAEConfig(d_in=64, d_sae=32, architecture="relu", apply_b_dec_to_input=False, site=READ)
    sae = SAE(sae_cfg, W_enc=tc.W_enc, b_enc=tc.b_enc, W_dec=tc.W_dec, b_dec=tc.b_dec)
    # The id an SAE had before transcoders existed (that version's formula: the cfg fields it had, then each
    # tensor's name, shape and float32 bytes); the transcoder fields are left out at their defaults.
    old_fields = {k: v for k, v in asdict(sae_cfg).items() if k not in ("raw", "write_sites", "d_out", "skip")}
    h = hashlib.sha256(json.dumps(old_fields, sort_keys=True).encode())
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        t = getattr(sae, name).float().contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    assert stable_id(sae) == h.hexdigest()[:16]
    assert stable_id(sae) != stable_id(tc)


@pytest.mark.parametrize(("arch", "skip"), [("relu", False), ("relu", True), ("jumprelu", False), ("jumprelu", True)])
def test_saelens_transcoders_encode_as_saelens(tmp_path: Path, arch: str, skip: bool) -> None:
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.transcoder import (
        JumpReLUSkipTranscoder,
        JumpReLUSkipTranscoderConfig,
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        Transcoder,
        TranscoderConfig,
    )

    cls, cfg_cls = {
        ("relu", False): (Transcoder, TranscoderConfig),
        ("relu", True): (SkipTranscoder, SkipTranscoderConfig),
        ("jumprelu", False): (JumpReLUTranscoder, JumpReLUTranscoderConfig),
        ("jumprelu", True): (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig),
    }[(arch, skip)]
    meta = SAEMetadata(hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out")
    theirs = cls(cfg_cls(d_in=64, d_sae=32, d_out=48, apply_b_dec_to_input=False, metadata=meta))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        if arch == "jumprelu":
            theirs.threshold.abs_()
    theirs.save_model(tmp_path / "tc")  # SAELens' own writer
    ours = load_sae(tmp_path / "tc")
    assert (ours.cfg.site, ours.cfg.write_sites, ours.cfg.skip, ours.cfg.out_width) == (READ, (WRITE,), skip, 48)
    x = torch.randn(50, 64, generator=g)
    with torch.no_grad():
        z_diff = (ours.encode(x) - theirs.encode(x)).abs().max().item()
        out_diff = (ours(x) - theirs(x)).abs().max().item()
    print(f"SAELens {arch} transcoder skip={skip}: max |diff| encode {z_diff:.3g}, forward {out_diff:.3g}")  # noqa: T201 (the max |diff| the issue asks to report; shown with -s)
    assert ours.encode(x).count_nonzero() > 0
    assert z_diff <= 1e-5 and out_diff <= 1e-5
    # written back in SAELens' layout, it reloads as the same transcoder
    assert stable_id(load_sae(save_sae(ours, tmp_path / "again"))) == stable_id(ours)


def test_saelens_transcoder_without_hook_out_refused(tmp_path: Path) -> None:
    path = save_sae(_transcoder(), tmp_path / "tc")
    raw = json.loads((path / "cfg.json").read_text())
    raw["metadata"].pop("hook_name_out")
    (path / "cfg.json").write_text(json.dumps(raw))
    with pytest.raises(SAEFormatError, match="hook_name_out") as info:
        load_sae(path)
    assert str(path / "cfg.json") in str(info.value)


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_transcoders_encode_as_sparsify(tmp_path: Path, skip: bool) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(64, SparseCoderConfig(num_latents=96, k=6, transcode=True, skip_connection=skip))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    coder.save_to_disk(tmp_path / "h.1.mlp")  # sparsify's own writer; gpt2's MLP hookpoint
    ours = load_sae(tmp_path / "h.1.mlp")
    assert (ours.cfg.site, ours.cfg.write_sites, ours.cfg.skip) == (READ, (WRITE,), skip)
    x = torch.randn(40, 64, generator=g)
    with torch.no_grad():
        enc = coder.encode(x)
        dense = torch.zeros(40, 96).scatter_(-1, enc.top_indices, enc.top_acts)
        want = coder.decode(enc.top_acts, enc.top_indices)
        if skip:
            want = want + x @ coder.W_skip.mT
        z_diff = (ours.encode(x) - dense).abs().max().item()
        out_diff = (ours(x) - want).abs().max().item()
    print(f"sparsify transcoder skip={skip}: max |diff| encode {z_diff:.3g}, forward {out_diff:.3g}")  # noqa: T201 (the max |diff| the issue asks to report; shown with -s)
    assert z_diff <= 1e-5 and out_diff <= 1e-5


# --- as a feature source on the tiny GPT-2


def _cfg(tmp_path: Path, tiny_gpt2_dir: Path, small_corpus: Path, path: Path, **sae: Any) -> RunConfig:
    return RunConfig.model_validate(
        {
            "db": f"sqlite:///{tmp_path}/a.sqlite",
            "model": {"name": str(tiny_gpt2_dir)},
            "corpus": {"source": str(small_corpus), "ctx_len": 16, "max_tokens": 600, "seed": 3},
            "collect": {
                "sites": [], "saes": [{"path": str(path), **sae}], "batch_size": 4, "top_k": 2,
                "n_quantiles": 1, "per_quantile": 1, "n_random": 1,
            },
        }
    )  # fmt: skip


def test_collected_at_the_read_site_stored_and_reloaded(
    tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path, tiny_subject: Any
) -> None:
    path = save_sae(_transcoder(skip=True), tmp_path / "tc")
    cfg = _cfg(tmp_path, tiny_gpt2_dir, small_corpus, path)
    store = open_store(cfg.db)
    summary = collect_run.run_collect(cfg, store, subject=tiny_subject)
    (name,) = summary.sources
    with store.session() as s:
        feats = sorted(s.exec(select(Feature)).all(), key=lambda f: f.index)
        row = s.exec(select(SAERow)).one()
    assert {f.site for f in feats} == {READ} and row.site == READ
    assert row.cfg["autointerp"] == {"kind": TRANSCODER, "read_site": READ, "write_sites": [WRITE]}
    assert transcoder_line(store, name) == f"transcoder: reads {READ}, writes {WRITE}"
    # the activations are the transcoder's encoding of the MLP's normalized input (ln_2's output), by hand
    corpus = tokenize_corpus(cfg.corpus.source, tiny_subject.tokenizer, tokenizer_name=tiny_subject.name,
                             bos_token_id=tiny_subject.bos_token_id, ctx_len=16, max_tokens=600, seed=3)  # fmt: skip
    tokens = torch.from_numpy(corpus.tokens)
    x = capture(tiny_subject.model, tiny_subject.layout, [READ], tokens)[READ]
    blocks = tiny_subject.layout.blocks(tiny_subject.model)
    seen: list[torch.Tensor] = []
    h = blocks[1].ln_2.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    try:
        with torch.inference_mode():
            tiny_subject.model(tokens)
    finally:
        h.remove()
    torch.testing.assert_close(x, seen[0])
    tc = load_sae(path)
    want = tc.encode(seen[0][:, 1 + cfg.collect.skip_positions :]).amax(dim=(0, 1))
    assert [f.max_act for f in feats] == pytest.approx(want.tolist(), rel=1e-5, abs=1e-6)
    # what the database stores reloads as the same transcoder, written at its write site
    target = load_target(tiny_subject, READ, name, 3, row.path)
    assert isinstance(target, Direction) and (target.read_site, target.write_sites) == (READ, (WRITE,))


def test_steered_and_logit_lensed_at_the_write_site(tmp_path: Path, tiny_subject: Any) -> None:
    (source,) = load_sources(tiny_subject, [SAESource(str(save_sae(_transcoder(), tmp_path / "tc")))])
    assert (source.kind, source.read_site, source.write_site) == (TRANSCODER, READ, WRITE)
    target = target_of(source, 5)
    with pytest.raises(InterventionError, match="use add"):
        Intervention.clamp(target, 1.0)
    with pytest.raises(InterventionError, match="writes elsewhere than it reads"):
        Latent(source.sae, 5)  # type: ignore[arg-type]
    ids = torch.tensor([tiny_subject.tokenizer("The state of the Union is strong")["input_ids"]])
    mlp = tiny_subject.layout.mlp(tiny_subject.layout.blocks(tiny_subject.model)[1])
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    h1 = mlp.register_forward_hook(lambda _m, _a, out: before.append(out.detach().clone()))
    try:
        with torch.inference_mode(), intervene(tiny_subject, Intervention.add(target, 3.0)):
            h2 = mlp.register_forward_hook(lambda _m, _a, out: after.append(out.detach().clone()))
            tiny_subject.model(ids)
            h2.remove()
    finally:
        h1.remove()
    delta = after[0] - before[0]  # the MLP output, before and after the steering hook
    u = source.decoder_direction(5)
    torch.testing.assert_close(delta[0, 2:], (3.0 * u).expand(ids.shape[1] - 2, -1))
    assert torch.equal(delta[0, :2], torch.zeros_like(delta[0, :2]))
    torch.testing.assert_close(u, source.sae.W_dec[5] / source.sae.W_dec[5].norm())  # type: ignore[union-attr]
    # mlp.out is added to the residual stream as is: the logit lens starts from the decoder row itself
    torch.testing.assert_close(residual_direction(tiny_subject, target), u)


def test_refused_before_anything_is_written(
    tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path, tiny_subject: Any
) -> None:
    bad_out = save_sae(_transcoder(d_out=48), tmp_path / "out")
    with pytest.raises(SAEFormatError, match="d_out=48 does not match write site blocks.1.mlp.out of width 64"):
        load_sources(tiny_subject, [SAESource(str(bad_out))])
    far = _transcoder()
    far = SAE(
        SAEConfig(**{**far.cfg.__dict__, "write_sites": ("blocks.7.mlp.out",)}),
        W_enc=far.W_enc, b_enc=far.b_enc, W_dec=far.W_dec, b_dec=far.b_dec,
    )  # fmt: skip
    with pytest.raises(SAEFormatError, match="writes blocks.7.mlp.out"):
        load_sources(tiny_subject, [SAESource(str(save_sae(far, tmp_path / "far")))])
    # a cfg hook no family has: refused by the loader, naming the file and the hook
    path = save_sae(_transcoder(), tmp_path / "hook")
    raw = json.loads((path / "cfg.json").read_text())
    raw["metadata"]["hook_name_out"] = raw["hook_name_out"] = "blocks.1.hook_mlp_sideways"
    (path / "cfg.json").write_text(json.dumps(raw))
    cfg = _cfg(tmp_path, tiny_gpt2_dir, small_corpus, path)
    store = open_store(cfg.db)
    with pytest.raises(SAEFormatError, match="hook_mlp_sideways") as info:
        collect_run.run_collect(cfg, store, subject=tiny_subject)
    assert str(path / "cfg.json") in str(info.value)
    with store.session() as s:
        assert s.exec(select(Feature)).all() == [] and s.exec(select(SAERow)).all() == []
