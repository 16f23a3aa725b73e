"""The site registry on the real SmolLM2 (the llama family): each site's tensor equals a manual computation in the
first, a middle and the last block; hooks always come off."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from autointerp.subject.sites import parse_site


@pytest.mark.slow
def test_llama_sites_on_real_smollm2(smol_subject: Any, check_sites: Any) -> None:
    assert smol_subject.layout.family == "llama" and smol_subject.n_layers == 30 and smol_subject.d_model == 576

    def mlp_post(got: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
        block = smol_subject.model.model.layers[layer]
        x = block.post_attention_layernorm(got[f"blocks.{layer}.resid.pre"] + got[f"blocks.{layer}.attn.out"])
        with torch.inference_mode():
            return block.mlp.act_fn(block.mlp.gate_proj(x)) * block.mlp.up_proj(x)  # act(gate) * up

    for layer in (0, 12, 28):
        check_sites(smol_subject, layer, mlp_post)
    assert smol_subject.layout.site_width(smol_subject.model, parse_site("blocks.3.mlp.post")) == 1536
