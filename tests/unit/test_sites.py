"""Site registry on a tiny random GPT-2: each site's tensor equals a manual computation; hooks always come off; the
forward pass stops after the deepest requested site. The llama family's sites on the real SmolLM2:
tests/integration/test_sites_smollm2.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from autointerp.subject.sites import SiteError, capture, hooks, parse_site


def test_parse_site() -> None:
    assert parse_site("blocks.3.mlp.post").layer == 3
    for bad in ("blocks.x.mlp.post", "layer.3.mlp", "blocks.3.mlp.pre", ""):
        with pytest.raises(SiteError, match="bad site"):
            parse_site(bad)


def test_gpt2_sites(tiny_subject: Any, check_sites: Any) -> None:
    def mlp_post(got: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
        block = tiny_subject.model.transformer.h[layer]
        x = got[f"blocks.{layer}.resid.pre"] + got[f"blocks.{layer}.attn.out"]
        with torch.inference_mode():
            return block.mlp.act(block.mlp.c_fc(block.ln_2(x)))  # gelu(c_fc)

    for layer in range(3):
        check_sites(tiny_subject, layer, mlp_post)


def test_forward_stops_after_deepest_site(tiny_subject: Any, random_ids: Any) -> None:
    calls: list[int] = []
    blocks = tiny_subject.layout.blocks(tiny_subject.model)
    handles = [b.register_forward_pre_hook(lambda _m, _a, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    try:
        capture(
            tiny_subject.model,
            tiny_subject.layout,
            ["blocks.0.resid.post", "blocks.1.mlp.post"],
            random_ids(tiny_subject),
        )
        assert calls == [0, 1]
        calls.clear()
        capture(
            tiny_subject.model, tiny_subject.layout, ["blocks.0.mlp.post"], random_ids(tiny_subject), stop_early=False
        )
        assert calls == [0, 1, 2]
    finally:
        for h in handles:
            h.remove()


def test_hooks_removed_after_exception(tiny_subject: Any, random_ids: Any, n_hooks: Any) -> None:
    model = tiny_subject.model

    def boom(_t: torch.Tensor) -> None:
        raise ValueError("boom")

    before = n_hooks(model)
    with (
        pytest.raises(ValueError, match="boom"),
        hooks(model, tiny_subject.layout, {"blocks.1.mlp.post": boom}),
    ):
        model(random_ids(tiny_subject))
    assert n_hooks(model) == before
    with (
        pytest.raises(RuntimeError),
        hooks(model, tiny_subject.layout, {"blocks.0.resid.post": lambda t: None}),
    ):
        raise RuntimeError("raised inside the block")
    assert n_hooks(model) == before


def test_hook_can_replace_a_site(tiny_subject: Any, random_ids: Any) -> None:
    model, ids = tiny_subject.model, random_ids(tiny_subject)
    with torch.inference_mode():
        base = model(ids).logits
        with hooks(model, tiny_subject.layout, {"blocks.2.mlp.post": lambda t: t}):
            same = model(ids).logits
        with hooks(model, tiny_subject.layout, {"blocks.2.mlp.post": lambda t: torch.zeros_like(t)}):
            zeroed = model(ids).logits
    torch.testing.assert_close(base, same)
    assert not torch.allclose(base, zeroed)


def test_bad_layer_is_clear(tiny_subject: Any, random_ids: Any) -> None:
    with pytest.raises(SiteError, match="out of range"):
        capture(tiny_subject.model, tiny_subject.layout, ["blocks.7.mlp.post"], random_ids(tiny_subject))
