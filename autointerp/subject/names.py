"""Site names, without torch: the grammar of our sites and the TransformerLens hook names SAE files use.

A site is a stable string `blocks.L.KIND`:
- `mlp.post`   the input of the MLP's output projection (gated MLPs: act(gate) * up; gpt2: gelu(c_fc)),
- `mlp.out`    the MLP's output before it is added to the residual stream,
- `attn.out`   the attention block's output before it is added,
- `resid.pre`  the hidden state entering block L, `resid.post` the hidden state block L returns.
The query path (config validation, `features list`, the review page) parses sites through this module only, so it
never waits for torch to import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SITE_KINDS = ("mlp.post", "mlp.out", "attn.out", "resid.pre", "resid.post")
_SITE_RE = re.compile(r"^blocks\.(\d+)\.(mlp\.post|mlp\.out|attn\.out|resid\.pre|resid\.post)$")


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
}
_KIND_TO_TL = {kind: hook for hook, kind in _TL_TO_KIND.items()}
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
