"""Site names, without torch: the grammar of our sites and the TransformerLens hook names SAE files use.

A site is a stable string `blocks.L.KIND`:
- `mlp.post`   the input of the MLP's output projection (gated MLPs: act(gate) * up; gpt2: gelu(c_fc)),
- `mlp.out`    the MLP's output before it is added to the residual stream,
- `attn.out`   the attention block's output before it is added,
- `resid.pre`  the hidden state entering block L, `resid.post` the hidden state block L returns,
- `resid.mid`  the residual stream between attention and MLP (the MLP's input before its norm; TransformerLens
               `hook_resid_mid`). Families with a parallel attention/MLP (pythia) have none.
- `mlp.in`     the MLP's normalized input (TransformerLens `hook_mlp_in` / `ln2.hook_normalized`): what a transcoder
               usually reads. Gemma 2/3: the output of `pre_feedforward_layernorm`.
- `attn.z`     the attention heads' concatenated outputs, the input of the output projection (`attn.hook_z`).
`mlp.out` and `attn.out` are what is added to the residual stream: on Gemma 2/3 the output of the post-norms
(`post_feedforward_layernorm`, `post_attention_layernorm`), not of the `mlp` / `self_attn` modules.
The query path (config validation, `features list`, the review page) parses sites through this module only, so it
never waits for torch to import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SITE_KINDS = ("mlp.post", "mlp.out", "attn.out", "resid.pre", "resid.post", "resid.mid", "mlp.in", "attn.z")
_SITE_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in SITE_KINDS) + r")$")
FORWARD_ORDER = {
    "resid.pre": 0,
    "attn.z": 1,
    "attn.out": 2,
    "resid.mid": 3,
    "mlp.in": 4,
    "mlp.post": 5,
    "mlp.out": 6,
    "resid.post": 7,
}
"""The order in which a block computes its sites (capture stops after the last one asked for)."""


class SiteError(ValueError):
    """A site name that does not parse or does not exist in the model."""


@dataclass(frozen=True)
class SiteRef:
    layer: int
    kind: str

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.kind}"


def parse_site(name: str) -> SiteRef:
    m = _SITE_RE.match(name.strip())
    if not m:
        raise SiteError(f"bad site {name!r}: expected blocks.LAYER.KIND with KIND one of {', '.join(SITE_KINDS)}")
    return SiteRef(int(m.group(1)), m.group(2))


# TransformerLens hook suffix -> our site kind. Our own names pass through unchanged.
_TL_TO_KIND: dict[str, str] = {
    "hook_resid_post": "resid.post",
    "hook_resid_pre": "resid.pre",
    "mlp.hook_post": "mlp.post",
    "hook_mlp_out": "mlp.out",
    "hook_attn_out": "attn.out",
    "hook_resid_mid": "resid.mid",
    "hook_mlp_in": "mlp.in",
    "ln2.hook_normalized": "mlp.in",
    "attn.hook_z": "attn.z",
}
_KIND_TO_TL: dict[str, str] = {}
for _hook, _kind in _TL_TO_KIND.items():
    _KIND_TO_TL.setdefault(_kind, _hook)  # mlp.in -> hook_mlp_in (the first name listed)
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def tl_hook_to_site(name: str) -> str:
    """`blocks.6.hook_resid_post` -> `blocks.6.resid.post`; our own site names are returned unchanged."""
    m = _BLOCK_RE.match(name)
    if m:
        layer, rest = m.groups()
        if rest in _KIND_TO_TL:
            return name
        if rest in _TL_TO_KIND:
            return f"blocks.{layer}.{_TL_TO_KIND[rest]}"
    known = ", ".join(f"blocks.L.{h}" for h in _TL_TO_KIND)
    raise SiteError(f"unknown hook or site name {name!r}; supported: {known} (or blocks.L.resid.post etc.)")


def site_to_tl_hook(site: str) -> str:
    """`blocks.6.resid.post` -> `blocks.6.hook_resid_post` (TransformerLens names are accepted too)."""
    m = _BLOCK_RE.match(tl_hook_to_site(site))
    assert m is not None  # tl_hook_to_site only returns names of this shape
    return f"blocks.{m.group(1)}.{_KIND_TO_TL[m.group(2)]}"


def layer_of(site: str) -> int:
    """The block index of a site or hook name."""
    return parse_site(tl_hook_to_site(site)).layer


def hook_to_site(name: str, family: str | None = None) -> str:
    """The site a hook name in an SAE/transcoder cfg means: our own names and TransformerLens names
    (`blocks.L.hook_mlp_out`) need no family; Hugging Face module paths (`model.layers.L.pre_feedforward_layernorm.
    output`, Gemma Scope 2's hf_hook_point_in/out) mean different tensors on different families and need the
    model's `family` (its config's model_type). An unknown name is refused, never guessed."""
    if _BLOCK_RE.match(name):
        return tl_hook_to_site(name)
    from autointerp.subject.hf_paths import hf_path_to_site  # the per-family tables

    return hf_path_to_site(name, family)
