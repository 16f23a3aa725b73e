"""SAEConfig (format-independent: what changes the encoding, plus site and provenance), SAEFormatError, and the site
name helpers of subject.names raising SAEFormatError."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from autointerp.subject import names
from autointerp.subject.sae.registry import SAE_ARCHITECTURES, SAEArchitecture

Normalization = Literal["none", "expected_average_only_in", "constant_norm_rescale"]


class SAEFormatError(ValueError):
    """An SAE file or config that cannot be used; the message names the path and the problem."""


def read_cfg_json(path: Path) -> Any:
    """An SAE's config file parsed; SAEFormatError naming it when it cannot be read or is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFormatError(f"{path}: invalid JSON: {e}") from None
    except OSError as e:
        raise SAEFormatError(f"{path}: cannot read it: {e.strerror or e}") from None


def tl_hook_to_site(name: str) -> str:
    """`blocks.6.hook_resid_post` -> `blocks.6.resid.post` (see subject.names), as an SAEFormatError."""
    try:
        return names.tl_hook_to_site(name)
    except names.SiteError as exc:
        raise SAEFormatError(str(exc)) from exc


def site_to_tl_hook(site: str) -> str:
    try:
        return names.site_to_tl_hook(site)
    except names.SiteError as exc:
        raise SAEFormatError(str(exc)) from exc


@dataclass(frozen=True)
class SAEConfig:
    d_in: int
    d_sae: int
    architecture: SAEArchitecture
    k: int | None = None
    """Number of active latents per token (TopK; the number of groups for GroupMax)."""
    apply_b_dec_to_input: bool = True
    site: str | None = None
    """Our site name (`blocks.L.resid.post`), converted from the cfg's TransformerLens hook name."""
    model_name: str | None = None
    normalize_activations: Normalization = "none"
    norm_scaling_factor: float | None = None
    """Constant input multiplier for `expected_average_only_in` (outputs are divided by it)."""
    rescale_acts_by_decoder_norm: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """The whole cfg.json as read, for provenance."""
    write_sites: tuple[str, ...] = ()
    """Transcoders: the sites its decoder writes (one; a cross-layer transcoder's layer: every later layer's, in
    order). Empty: an SAE, which writes (reconstructs) the site it reads."""
    d_out: int | None = None
    """Transcoders: the width of the write sites (None: d_in)."""
    skip: bool = False
    """A linear skip connection W_skip [d_in, d_out]: `forward` adds x @ W_skip (b_dec is its bias)."""

    @property
    def is_transcoder(self) -> bool:
        return bool(self.write_sites)

    @property
    def out_width(self) -> int:
        """The width of what the decoder writes."""
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def n_write(self) -> int:
        """How many sites the decoder writes (1 for SAEs and transcoders, more for a cross-layer transcoder)."""
        return max(1, len(self.write_sites))

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}")
        spec = SAE_ARCHITECTURES.get(self.architecture)
        if spec is None:
            raise ValueError(f"unknown architecture {self.architecture!r}")
        if spec.needs_k:
            if self.k is None or not 0 < self.k <= self.d_sae:
                raise ValueError(f"{self.architecture} needs 0 < k <= d_sae={self.d_sae}, got k={self.k}")
        elif self.k is not None:
            raise ValueError(f"k is not meaningful for {self.architecture}, got k={self.k}")
        if spec.validate is not None:
            spec.validate(self)
        if self.normalize_activations == "expected_average_only_in":
            f = self.norm_scaling_factor
            if f is None or not (math.isfinite(f) and f > 0):
                raise ValueError(f"expected_average_only_in needs a positive norm_scaling_factor, got {f}")
        elif self.normalize_activations not in ("none", "constant_norm_rescale"):
            raise ValueError(f"unsupported normalize_activations {self.normalize_activations!r}")
        if self.rescale_acts_by_decoder_norm and not spec.supports_rescale:
            raise ValueError(f"rescale_acts_by_decoder_norm is not supported for {self.architecture}")
        if self.site is not None:
            object.__setattr__(self, "site", tl_hook_to_site(self.site))
        object.__setattr__(self, "write_sites", tuple(tl_hook_to_site(s) for s in self.write_sites))
        if self.d_out is not None and self.d_out <= 0:
            raise ValueError(f"d_out must be positive, got {self.d_out}")
        if self.d_out is not None and not self.write_sites and self.d_out != self.d_in:
            raise ValueError(f"an SAE (no write_sites) reconstructs its input: d_out={self.d_out} != d_in={self.d_in}")
        if self.write_sites:
            # b_dec lives in the output space; inputs are read raw.
            if self.apply_b_dec_to_input:
                raise ValueError("apply_b_dec_to_input is not meaningful for a transcoder (b_dec is an output bias)")
            if self.normalize_activations != "none":
                raise ValueError(f"input normalization {self.normalize_activations!r} is not supported for transcoders")
            if self.n_write > 1 and self.rescale_acts_by_decoder_norm:
                raise ValueError("rescale_acts_by_decoder_norm is not supported for cross-layer transcoders")
            if self.n_write > 1 and self.skip:
                raise ValueError("skip connections are not supported for cross-layer transcoders")


def check_expected(
    cfg: SAEConfig, where: str, *, expected_site: str | None, expected_d_in: int | None, origin: str | None = None
) -> SAEConfig:
    """The loaders' common checks against what the caller attaches the SAE to; a cfg without a site takes
    `expected_site`. `origin` says where the SAE's own site came from, for the message."""
    if expected_site is not None:
        want = tl_hook_to_site(expected_site)
        if cfg.site is None:
            cfg = replace(cfg, site=want)
        elif cfg.site != want:
            source = f" ({origin})" if origin else ""
            raise SAEFormatError(f"{where}: SAE was trained on site {cfg.site}{source}, but it is attached to {want}")
    if expected_d_in is not None and expected_d_in != cfg.d_in:
        raise SAEFormatError(
            f"{where}: d_in={cfg.d_in} does not match the width {expected_d_in} of site "
            f"{cfg.site or expected_site or '(unknown)'}"
        )
    return cfg
