"""Hugging Face module paths (Gemma Scope 2's hf_hook_point_in / hf_hook_point_out) -> sites, per family: the values
Gemma Scope 2 configs carry, the paths that mean different tensors on llama and on Gemma, and refusals that name the
path and what is accepted. Each table entry is checked against the real module on tiny models in
test_site_families.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from autointerp.subject.hf_paths import HF_TABLES, accepted_paths, hf_path_to_site
from autointerp.subject.names import SiteError, hook_to_site

# hf_hook_point_in / hf_hook_point_out as Gemma Scope 2 writes them (transcoder_all, clt, resid_post_all, attn_out_all,
# mlp_out_all), with the site each means on Gemma 3.
GEMMA_SCOPE_2 = {
    "model.layers.12.pre_feedforward_layernorm.output": "blocks.12.mlp.in",
    "model.layers.12.post_feedforward_layernorm.output": "blocks.12.mlp.out",
    "model.layers.10.output": "blocks.10.resid.post",
    "model.layers.11.self_attn.o_proj.input": "blocks.11.attn.z",
    "model.layers.3.mlp.down_proj.input": "blocks.3.mlp.post",
    "model.layers.0.input": "blocks.0.resid.pre",
}


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "gemma3"])
@pytest.mark.parametrize(("path", "site"), GEMMA_SCOPE_2.items())
def test_gemma_scope_2_hook_points(family: str, path: str, site: str) -> None:
    assert hf_path_to_site(path, family) == site
    assert hook_to_site(path, family) == site  # the entry point SAE and transcoder loaders call


def test_multimodal_gemma3_prefixes() -> None:
    for prefix in ("model.language_model.layers", "language_model.model.layers"):
        assert hf_path_to_site(f"{prefix}.5.pre_feedforward_layernorm.output", "gemma3") == "blocks.5.mlp.in"
        assert hf_path_to_site(f"{prefix}.5.output", "gemma3_text") == "blocks.5.resid.post"
    with pytest.raises(SiteError, match="unknown hook"):
        hf_path_to_site("model.language_model.layers.5.output", "llama")


def test_post_attention_layernorm_means_different_sites() -> None:
    path = "model.layers.4.post_attention_layernorm.output"
    assert hf_path_to_site(path, "llama") == "blocks.4.mlp.in"  # llama's norm in front of the MLP
    assert hf_path_to_site(path, "qwen3") == "blocks.4.mlp.in"
    assert hf_path_to_site(path, "gemma2") == "blocks.4.attn.out"  # Gemma's norm of the attention output
    assert hf_path_to_site("model.layers.4.post_attention_layernorm.input", "llama") == "blocks.4.resid.mid"
    assert hf_path_to_site("model.layers.4.pre_feedforward_layernorm.input", "gemma3_text") == "blocks.4.resid.mid"


def test_gemma_mlp_output_is_refused_naming_the_post_norm() -> None:
    assert hf_path_to_site("model.layers.2.mlp.output", "llama") == "blocks.2.mlp.out"
    for family in ("gemma2", "gemma3_text"):
        with pytest.raises(SiteError) as err:
            hf_path_to_site("model.layers.2.mlp.output", family)
        msg = str(err.value)
        assert "'model.layers.2.mlp.output'" in msg and "not a site" in msg
        assert "model.layers.2.post_feedforward_layernorm.output (blocks.2.mlp.out)" in msg
    with pytest.raises(SiteError, match=r"use model\.layers\.2\.post_attention_layernorm\.output"):
        hf_path_to_site("model.layers.2.self_attn.output", "gemma3")


def test_other_families() -> None:
    assert hf_path_to_site("transformer.h.1.ln_2.output", "gpt2") == "blocks.1.mlp.in"
    assert hf_path_to_site("transformer.h.1.mlp.c_proj.input", "gpt2") == "blocks.1.mlp.post"
    assert hf_path_to_site("gpt_neox.layers.3.attention.dense.input", "gpt_neox") == "blocks.3.attn.z"
    assert hf_path_to_site("gpt_neox.layers.3.mlp.output", "gpt_neox") == "blocks.3.mlp.out"
    assert hf_path_to_site("model.layers.7.mlp.down_proj.output", "mistral") == "blocks.7.mlp.out"


@pytest.mark.parametrize(
    "path",
    [
        "model.layers.12.input_layernorm.output",  # attention's normalized input: no site
        "model.layers.12.mlp.gate_proj.output",
        "model.layers.12",
        "model.layers.x.output",
        "model.embed_tokens.output",
        "transformer.h.1.output",  # gpt2's path on a gemma
        "blocks.12.hook_mlp_out.output",
        "",
    ],
)
def test_unknown_path_is_refused_listing_what_is_accepted(path: str) -> None:
    with pytest.raises(SiteError) as err:
        hf_path_to_site(path, "gemma2")
    msg = str(err.value)
    assert repr(path) in msg and "model.layers.L.pre_feedforward_layernorm.output" in msg


@pytest.mark.parametrize("family", [None, "", "t5", "olmo2"])
def test_unknown_family_is_refused(family: str | None) -> None:
    with pytest.raises(SiteError) as err:
        hf_path_to_site("model.layers.1.output", family)
    msg = str(err.value)
    assert "'model.layers.1.output'" in msg and "gemma3_text" in msg and "llama" in msg


def test_names_pass_through_without_a_family() -> None:
    assert hook_to_site("blocks.3.hook_mlp_out") == "blocks.3.mlp.out"
    assert hook_to_site("blocks.3.ln2.hook_normalized", "gemma2") == "blocks.3.mlp.in"
    with pytest.raises(SiteError, match="family is not known"):
        hook_to_site("model.layers.3.output")


def test_tables_map_to_every_site_kind_at_most_once_per_module() -> None:
    for family, table in HF_TABLES.items():
        assert set(table.refused).isdisjoint(table.sites), family
        assert all(use in table.sites for use in table.refused.values()), family
        assert len(accepted_paths(family)) == len(table.prefixes) * len(table.sites)
        assert {"resid.pre", "resid.post", "mlp.in", "mlp.out", "mlp.post", "attn.z", "attn.out", "resid.mid"} == set(
            table.sites.values()
        ), family


def test_torch_free() -> None:
    code = "import sys, autointerp.subject.hf_paths as h; h.hf_path_to_site('model.layers.1.output', 'gemma2'); "
    code += "assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
