"""Site registry on a tiny random GPT-2 (fast) and the real SmolLM2 (slow): each site's tensor equals a manual
computation; hooks always come off; the forward pass stops after the deepest requested site."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from autointerp.subject.sites import SiteError, capture, hooks, parse_site


def _ids(subject: Any, n: int = 2, t: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 5000, (n, t), generator=g)
    ids[:, 0] = subject.bos_token_id
    return ids


def _n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_parse_site() -> None:
    assert parse_site("blocks.3.mlp.post").layer == 3
    for bad in ("blocks.x.mlp.post", "layer.3.mlp", "blocks.3.mlp.pre", ""):
        with pytest.raises(SiteError, match="bad site"):
            parse_site(bad)


def _check_sites(subject: Any, layer: int, mlp_post: Any) -> None:
    model = subject.model
    ids = _ids(subject)
    sites = [f"blocks.{layer}.{k}" for k in ("mlp.post", "resid.post", "resid.pre", "mlp.out", "attn.out")]
    got = capture(model, subject.layout, sites, ids)
    with torch.inference_mode():
        hs = model(ids, output_hidden_states=True).hidden_states
    before = _n_hooks(model)  # transformers installs output-capturing hooks of its own on first use
    got = capture(model, subject.layout, sites, ids)
    torch.testing.assert_close(got[f"blocks.{layer}.resid.pre"], hs[layer])
    if layer + 1 < len(hs) - 1:  # the last hidden state has the final norm applied in HF models
        torch.testing.assert_close(got[f"blocks.{layer}.resid.post"], hs[layer + 1])
    # resid.post = resid.pre + attn.out + mlp.out for both families (pre-norm blocks).
    recon = got[f"blocks.{layer}.resid.pre"] + got[f"blocks.{layer}.attn.out"] + got[f"blocks.{layer}.mlp.out"]
    torch.testing.assert_close(got[f"blocks.{layer}.resid.post"], recon, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[f"blocks.{layer}.mlp.post"], mlp_post(got, layer), rtol=1e-4, atol=1e-4)
    assert got[f"blocks.{layer}.mlp.post"].shape[-1] == subject.layout.site_width(model, parse_site(sites[0]))
    assert _n_hooks(model) == before


def test_gpt2_sites(tiny_subject: Any) -> None:
    def mlp_post(got: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
        block = tiny_subject.model.transformer.h[layer]
        x = got[f"blocks.{layer}.resid.pre"] + got[f"blocks.{layer}.attn.out"]
        with torch.inference_mode():
            return block.mlp.act(block.mlp.c_fc(block.ln_2(x)))  # gelu(c_fc)

    for layer in range(3):
        _check_sites(tiny_subject, layer, mlp_post)


@pytest.mark.slow
def test_llama_sites_on_real_smollm2(smol_subject: Any) -> None:
    assert smol_subject.layout.family == "llama" and smol_subject.n_layers == 30 and smol_subject.d_model == 576

    def mlp_post(got: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
        block = smol_subject.model.model.layers[layer]
        x = block.post_attention_layernorm(got[f"blocks.{layer}.resid.pre"] + got[f"blocks.{layer}.attn.out"])
        with torch.inference_mode():
            return block.mlp.act_fn(block.mlp.gate_proj(x)) * block.mlp.up_proj(x)  # act(gate) * up

    for layer in (0, 12, 28):
        _check_sites(smol_subject, layer, mlp_post)
    assert smol_subject.layout.site_width(smol_subject.model, parse_site("blocks.3.mlp.post")) == 1536


def test_forward_stops_after_deepest_site(tiny_subject: Any) -> None:
    calls: list[int] = []
    blocks = tiny_subject.layout.blocks(tiny_subject.model)
    handles = [b.register_forward_pre_hook(lambda _m, _a, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    try:
        capture(
            tiny_subject.model,
            tiny_subject.layout,
            ["blocks.0.resid.post", "blocks.1.mlp.post"],
            _ids(tiny_subject),
        )
        assert calls == [0, 1]
        calls.clear()
        capture(tiny_subject.model, tiny_subject.layout, ["blocks.0.mlp.post"], _ids(tiny_subject), stop_early=False)
        assert calls == [0, 1, 2]
    finally:
        for h in handles:
            h.remove()


def test_hooks_removed_after_exception(tiny_subject: Any) -> None:
    model = tiny_subject.model

    def boom(_t: torch.Tensor) -> None:
        raise ValueError("boom")

    before = _n_hooks(model)
    with (
        pytest.raises(ValueError, match="boom"),
        hooks(model, tiny_subject.layout, {"blocks.1.mlp.post": boom}),
    ):
        model(_ids(tiny_subject))
    assert _n_hooks(model) == before
    with (
        pytest.raises(RuntimeError),
        hooks(model, tiny_subject.layout, {"blocks.0.resid.post": lambda t: None}),
    ):
        raise RuntimeError("raised inside the block")
    assert _n_hooks(model) == before


def test_hook_can_replace_a_site(tiny_subject: Any) -> None:
    model, ids = tiny_subject.model, _ids(tiny_subject)
    with torch.inference_mode():
        base = model(ids).logits
        with hooks(model, tiny_subject.layout, {"blocks.2.mlp.post": lambda t: t}):
            same = model(ids).logits
        with hooks(model, tiny_subject.layout, {"blocks.2.mlp.post": lambda t: torch.zeros_like(t)}):
            zeroed = model(ids).logits
    torch.testing.assert_close(base, same)
    assert not torch.allclose(base, zeroed)


def test_bad_layer_is_clear(tiny_subject: Any) -> None:
    with pytest.raises(SiteError, match="out of range"):
        capture(tiny_subject.model, tiny_subject.layout, ["blocks.7.mlp.post"], _ids(tiny_subject))
