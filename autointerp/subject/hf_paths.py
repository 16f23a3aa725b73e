"""Hugging Face module paths (Gemma Scope 2's `hf_hook_point_in` / `hf_hook_point_out`) -> our sites, per family.

A path is `<prefix>.L.<module>.<input|output>` (or `<prefix>.L.<input|output>` for the block itself), `input` being
the module's first positional input and `output` its first output. What a module means depends on the family:
llama's `post_attention_layernorm` is the norm in front of the MLP (its output is `mlp.in`), Gemma 2/3's is the norm
of the attention output (its output is `attn.out`); Gemma's `mlp.output` is not what the block adds to the residual
stream (`post_feedforward_layernorm.output` is). So each family has its own table, written out here without torch;
a test checks every entry against a hook on that module of a real (tiny) model. Anything not in the table is refused
with the list of what is accepted: a path is never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from autointerp.subject.names import SiteError


@dataclass(frozen=True)
class HfTable:
    """The module paths of one family: `prefixes` lead to the blocks (`model.layers`), `sites` maps what follows
    the block index to a site kind, `refused` maps paths that look right but are not a site to the path to use."""

    prefixes: tuple[str, ...]
    sites: Mapping[str, str]
    refused: Mapping[str, str] = field(default_factory=dict)


_LLAMA = HfTable(
    prefixes=("model.layers",),
    sites={
        "input": "resid.pre",
        "input_layernorm.input": "resid.pre",
        "self_attn.o_proj.input": "attn.z",
        "self_attn.o_proj.output": "attn.out",
        "self_attn.output": "attn.out",
        "post_attention_layernorm.input": "resid.mid",  # llama's norm in front of the MLP
        "post_attention_layernorm.output": "mlp.in",
        "mlp.input": "mlp.in",
        "mlp.down_proj.input": "mlp.post",
        "mlp.down_proj.output": "mlp.out",
        "mlp.output": "mlp.out",
        "output": "resid.post",
    },
)

# Gemma 2 and 3 normalize what attention and the MLP return before adding it (post_attention_layernorm,
# post_feedforward_layernorm); the MLP's own norm is pre_feedforward_layernorm.
_GEMMA = HfTable(
    prefixes=("model.layers",),
    sites={
        "input": "resid.pre",
        "input_layernorm.input": "resid.pre",
        "self_attn.o_proj.input": "attn.z",
        "post_attention_layernorm.output": "attn.out",
        "pre_feedforward_layernorm.input": "resid.mid",
        "pre_feedforward_layernorm.output": "mlp.in",
        "mlp.input": "mlp.in",
        "mlp.down_proj.input": "mlp.post",
        "post_feedforward_layernorm.output": "mlp.out",
        "output": "resid.post",
    },
    refused={
        "mlp.output": "post_feedforward_layernorm.output",
        "mlp.down_proj.output": "post_feedforward_layernorm.output",
        "post_feedforward_layernorm.input": "post_feedforward_layernorm.output",
        "self_attn.output": "post_attention_layernorm.output",
        "self_attn.o_proj.output": "post_attention_layernorm.output",
        "post_attention_layernorm.input": "post_attention_layernorm.output",
    },
)

# Gemma3ForConditionalGeneration keeps its text blocks at model.language_model.layers (transformers < 4.52:
# language_model.model.layers); Gemma Scope 2 writes model.layers for every Gemma 3 size.
_GEMMA3 = HfTable(
    prefixes=("model.layers", "model.language_model.layers", "language_model.model.layers"),
    sites=_GEMMA.sites,
    refused=_GEMMA.refused,
)

_GPT2 = HfTable(
    prefixes=("transformer.h",),
    sites={
        "input": "resid.pre",
        "ln_1.input": "resid.pre",
        "attn.c_proj.input": "attn.z",
        "attn.output": "attn.out",
        "ln_2.input": "resid.mid",
        "ln_2.output": "mlp.in",
        "mlp.input": "mlp.in",
        "mlp.c_proj.input": "mlp.post",
        "mlp.output": "mlp.out",
        "output": "resid.post",
    },
)

# With use_parallel_residual (pythia) the MLP's norm reads the block input: the layout refuses resid.mid there.
_GPT_NEOX = HfTable(
    prefixes=("gpt_neox.layers",),
    sites={
        "input": "resid.pre",
        "input_layernorm.input": "resid.pre",
        "attention.dense.input": "attn.z",
        "attention.output": "attn.out",
        "post_attention_layernorm.input": "resid.mid",
        "post_attention_layernorm.output": "mlp.in",
        "mlp.input": "mlp.in",
        "mlp.dense_4h_to_h.input": "mlp.post",
        "mlp.output": "mlp.out",
        "output": "resid.post",
    },
)

HF_TABLES: dict[str, HfTable] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,  # Gemma 1 has llama's two norms
    "olmo": _LLAMA,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA3,
    "gemma3": _GEMMA3,
    "gpt2": _GPT2,
    "gpt_neox": _GPT_NEOX,
}
"""model_type (the model config's) -> its module paths; the same families as subject.sites.LAYOUTS."""


def accepted_paths(family: str) -> list[str]:
    """Every path `hf_path_to_site` accepts on `family`, with `L` for the block index."""
    table = HF_TABLES[family]
    return [f"{prefix}.L.{rest}" for prefix in table.prefixes for rest in table.sites]


def hf_path_to_site(path: str, family: str | None) -> str:
    """`model.layers.12.pre_feedforward_layernorm.output` on gemma2 -> `blocks.12.mlp.in`.

    Raises SiteError naming the path when the family is unknown (or None), when the path is not one of the
    family's, or when it names a tensor that is not a site there (Gemma's `mlp.output`, before the post-norm)."""
    if family is None or family not in HF_TABLES:
        known = ", ".join(sorted(HF_TABLES))
        said = "is not known here" if family is None else f"{family!r} has no table"
        raise SiteError(
            f"hook {path!r} is a Hugging Face module path, which means a different tensor on each model family, "
            f"and the model family {said}; families with module paths: {known}"
        )
    table = HF_TABLES[family]
    for prefix in table.prefixes:
        m = re.fullmatch(re.escape(prefix) + r"\.(\d+)\.(.+)", path.strip())
        if m is None:
            continue
        layer, rest = int(m.group(1)), m.group(2)
        if rest in table.sites:
            return f"blocks.{layer}.{table.sites[rest]}"
        if rest in table.refused:
            use = table.refused[rest]
            raise SiteError(
                f"hook {path!r} on {family} is not a site: it is the tensor before the norm that the block applies "
                f"before adding it to the residual stream; use {prefix}.{layer}.{use} "
                f"(blocks.{layer}.{table.sites[use]})"
            )
    raise SiteError(
        f"unknown hook {path!r} on model family {family}; accepted Hugging Face module paths: "
        + ", ".join(accepted_paths(family))
    )
