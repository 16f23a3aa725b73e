"""Feature sources (subject.sources): one loader for collect, inspect, steer and intervene. Neurons and SAEs read and
write one site; a source kind that reads one site and writes another (registered here for the test, as a transcoder
will be) is collected at its read site and steered and logit-lensed at its write site, on a tiny GPT-2."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

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
    Neuron,
    intervene,
    load_target,
    target_of,
)
from autointerp.intervene.measure import continuation_activations
from autointerp.intervene.steer import direct_effects, generate, residual_direction
from autointerp.store import open_store
from autointerp.store.tables import Corpus, Feature
from autointerp.subject.sae import SAE, SAEConfig, save_sae, stable_id
from autointerp.subject.sites import capture
from autointerp.subject.sources import (
    SOURCE_KINDS,
    FeatureSource,
    NeuronSpec,
    SAESource,
    SourceError,
    load_sources,
    stored_spec,
)

READ, WRITE = "blocks.0.resid.post", "blocks.1.mlp.post"  # widths 64 and 128 on the tiny GPT-2
N = 6


@dataclass(frozen=True)
class CrossSpec:
    """A test-only kind: reads the residual stream after block 0, writes the MLP neurons of block 1."""

    kind: ClassVar[str] = "cross"


def _cross(_spec: CrossSpec, _subject: Any) -> list[FeatureSource]:
    g = torch.Generator().manual_seed(5)
    w_enc = torch.randn(64, N, generator=g) / 8
    w_dec = torch.randn(N, 128, generator=g)
    return [
        FeatureSource(
            "cross", "cross-1", READ, WRITE, N, lambda x: torch.relu(x @ w_enc), lambda i: w_dec[i] / w_dec[i].norm()
        )
    ]


@pytest.fixture
def cross(monkeypatch: pytest.MonkeyPatch, tiny_subject: Any) -> FeatureSource:
    monkeypatch.setitem(SOURCE_KINDS, CrossSpec.kind, _cross)
    (source,) = load_sources(tiny_subject, [CrossSpec()])  # type: ignore[list-item]
    return source


def _sae(tmp: Path, site: str = "blocks.1.resid.post") -> Path:
    g = torch.Generator().manual_seed(1)
    sae = SAE(SAEConfig(d_in=64, d_sae=32, architecture="topk", k=4, site=site),
              W_enc=torch.randn(64, 32, generator=g) / 8, b_enc=torch.zeros(32),
              W_dec=torch.randn(32, 64, generator=g) / math.sqrt(32), b_dec=torch.zeros(64))  # fmt: skip
    return save_sae(sae, tmp / "sae")


def test_neurons_and_saes_read_and_write_one_site(tmp_path: Path, tiny_subject: Any) -> None:
    path = _sae(tmp_path)
    neurons, sae = load_sources(tiny_subject, [NeuronSpec("blocks.1.mlp.post"), SAESource(str(path))])
    assert (neurons.name, neurons.read_site, neurons.write_site, neurons.n_features) == (
        "neurons", "blocks.1.mlp.post", "blocks.1.mlp.post", 128,
    )  # fmt: skip
    assert (sae.name, sae.read_site, sae.write_site, sae.sparse) == (
        stable_id(path), "blocks.1.resid.post", "blocks.1.resid.post", True,
    )  # fmt: skip
    assert torch.equal(neurons.decoder_direction(3), torch.eye(128)[3])
    assert sae.sae is not None
    torch.testing.assert_close(sae.decoder_direction(7), sae.sae.W_dec[7] / sae.sae.W_dec[7].norm())
    x = torch.randn(2, 5, 64)
    values, indices = sae.encode_sparse(x)
    dense = torch.zeros(2, 5, 32).scatter_(2, indices, values)
    torch.testing.assert_close(dense, sae.encode(x))
    # the intervention targets keep the one site, and clamp as before
    neuron, latent = target_of(neurons, 3), target_of(sae, 7)
    assert isinstance(neuron, Neuron) and isinstance(latent, Latent)
    assert neuron.read_site == neuron.write_site == "blocks.1.mlp.post"
    assert latent.read_site == latent.write_site == "blocks.1.resid.post"
    Intervention.clamp(latent, 1.0)
    # what the database stores loads back as the same source; another SAE at that path does not
    again = load_target(tiny_subject, sae.read_site, sae.name, 7, str(path))
    assert isinstance(again, Latent) and again.write_site == sae.write_site
    with pytest.raises(InterventionError, match="not the one collected"):
        load_target(tiny_subject, sae.read_site, "0123456789abcdef", 7, str(path))
    with pytest.raises(SourceError, match="names no SAE directory"):
        stored_spec("blocks.0.resid.pre", "planted", None)
    with pytest.raises(SourceError, match="unknown source kind"):
        load_sources(tiny_subject, [CrossSpec()])  # type: ignore[list-item]
    with pytest.raises(SourceError, match="out of range"):
        neurons.decoder_direction(128)


def test_collected_at_the_read_site(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path, tiny_subject: Any
) -> None:
    monkeypatch.setitem(SOURCE_KINDS, CrossSpec.kind, _cross)
    monkeypatch.setattr(collect_run, "source_specs", lambda _cfg: [CrossSpec()])
    cfg = RunConfig.model_validate(
        {
            "db": f"sqlite:///{tmp_path}/a.sqlite",
            "model": {"name": str(tiny_gpt2_dir)},
            "corpus": {"source": str(small_corpus), "ctx_len": 16, "max_tokens": 800, "seed": 3},
            "collect": {"sites": [], "batch_size": 4, "top_k": 2, "n_quantiles": 1, "per_quantile": 1, "n_random": 1},
        }
    )
    store = open_store(cfg.db)
    summary = collect_run.run_collect(cfg, store, subject=tiny_subject)
    assert summary.sources == ("cross-1",)
    with store.session() as s:
        feats = sorted(s.exec(select(Feature)).all(), key=lambda f: f.index)
        ctx = s.exec(select(Corpus)).one()
    assert [(f.site, f.source) for f in feats] == [(READ, "cross-1")] * N  # filed under the site it reads
    corpus = tokenize_corpus(cfg.corpus.source, tiny_subject.tokenizer, tokenizer_name=tiny_subject.name,
                             bos_token_id=tiny_subject.bos_token_id, ctx_len=16, max_tokens=800, seed=3)  # fmt: skip
    assert corpus.id == ctx.id
    x = capture(tiny_subject.model, tiny_subject.layout, [READ], torch.from_numpy(corpus.tokens))[READ]
    (source,) = _cross(CrossSpec(), tiny_subject)
    want = source.encode(x[:, 1 + cfg.collect.skip_positions :]).amax(dim=(0, 1))
    assert [f.max_act for f in feats] == pytest.approx(want.tolist(), rel=1e-5, abs=1e-6)


def test_steered_and_logit_lensed_at_the_write_site(cross: FeatureSource, tiny_subject: Any) -> None:
    target = target_of(cross, 2)
    assert isinstance(target, Direction) and (target.read_site, target.write_site) == (READ, WRITE)
    with pytest.raises(InterventionError, match="use add"):
        Intervention.clamp(target, 1.0)
    ids = torch.tensor([tiny_subject.tokenizer("The state of the Union is strong")["input_ids"]])
    model, layout = tiny_subject.model, tiny_subject.layout
    blocks = layout.blocks(model)
    seen: dict[str, torch.Tensor] = {}
    handles = [
        blocks[0].register_forward_hook(lambda _m, _a, out: seen.__setitem__("read", out[0].detach().clone())),
        layout.mlp_down(blocks[1]).register_forward_hook(
            lambda _m, args, _o: seen.__setitem__("write", args[0].detach().clone())
        ),
    ]
    try:
        with torch.inference_mode():
            model(ids)
            base = dict(seen)
            with intervene(tiny_subject, Intervention.add(target, 3.0)):
                model(ids)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(seen["read"], base["read"])  # the read site is left alone
    delta = seen["write"] - base["write"]
    torch.testing.assert_close(delta[0, 2:], (3.0 * cross.decoder_direction(2)).expand(ids.shape[1] - 2, -1))
    assert torch.equal(delta[0, :2], torch.zeros_like(delta[0, :2]))
    # the logit lens starts from the write site: the direction through block 1's MLP down projection
    down = layout.mlp_down(blocks[1])
    with torch.inference_mode():
        u = down(cross.decoder_direction(2)) - down(torch.zeros(128))
    torch.testing.assert_close(residual_direction(tiny_subject, target), u / u.norm())
    eff = direct_effects(tiny_subject, target, k=3)
    assert len(eff.promoted) == len(eff.suppressed) == 3


def test_activation_on_continuations_read_at_the_read_site(cross: FeatureSource, tiny_subject: Any) -> None:
    target = target_of(cross, 4)
    gens = [generate(tiny_subject, "The state of the Union", [Intervention.add(target, 5.0)], max_new_tokens=4)]
    (got,) = continuation_activations(tiny_subject, target, gens)
    g = gens[0]
    x = capture(tiny_subject.model, tiny_subject.layout, [READ], torch.tensor([[*g.prompt_ids, *g.token_ids]]))[READ]
    assert got == pytest.approx(cross.encode(x)[0, len(g.prompt_ids) :, 4].tolist(), abs=1e-5)
