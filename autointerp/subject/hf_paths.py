"""Hugging Face module paths (Gemma Scope 2's `hf_hook_point_in` / `hf_hook_point_out`) -> our sites, per family.

A path is `<prefix>.layers.L.<module>.<input|output>` (or `<prefix>.layers.L.<input|output>` for the block). What a
module means depends on the family: llama's `post_attention_layernorm` is the MLP's norm, Gemma's is the norm of the
attention output. Torch-free.
"""

from __future__ import annotations

from autointerp.subject.names import SiteError


def hf_path_to_site(path: str, family: str | None) -> str:
    """`model.layers.12.pre_feedforward_layernorm.output` on gemma2 -> `blocks.12.mlp.in`."""
    raise SiteError(f"unknown hook {path!r}: Hugging Face module paths are not mapped yet (family {family!r})")
