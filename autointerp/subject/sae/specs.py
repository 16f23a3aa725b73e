"""The two kinds of registry entry: an SAE architecture (how latents are computed from pre-activations) and an
on-disk format (how a directory is recognised and read). Both are plain frozen dataclasses, so a registry is a dict
literal and importing a module registers nothing by side effect."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from autointerp.subject.sae.config import SAEConfig
    from autointerp.subject.sae.module import SAE

Activation = Callable[[torch.Tensor, "SAE", bool], torch.Tensor]
"""(pre [N, d_sae], sae, inplace) -> z [N, d_sae]; may reuse `pre`'s buffer when inplace."""
SparseActivation = Callable[[torch.Tensor, "SAE"], tuple[torch.Tensor, torch.Tensor]]
"""(pre [N, d_sae], sae) -> ([N, k] values, [N, k] latent indices) of z, for SAEs with k active latents a token."""


@dataclass(frozen=True)
class ArchSpec:
    """An SAE architecture: its activation function and what it needs from the cfg and the weights file."""

    name: str
    activate: Activation
    sparse: SparseActivation | None = None
    """The (values, indices) form of `activate`, for architectures with exactly k slots a token."""
    needs_k: bool = False
    """The cfg must give k (1 <= k <= d_sae); for the others k must be absent."""
    needs_threshold: bool = False
    """The weights carry a `threshold` tensor [d_sae]."""
    supports_rescale: bool = True
    """Whether rescale_acts_by_decoder_norm is defined for it."""
    validate: Callable[[SAEConfig], None] | None = None
    """Further constraints on the cfg; raises ValueError."""
    saelens_architecture: str | None = None
    """The SAELens cfg `architecture` value; None: SAELens has no such SAE (save_sae refuses it)."""
    saelens_activation: str | None = None
    """The SAELens `activation_fn_str` that selects it under architecture 'standard' (old SAELens)."""


class Loader(Protocol):
    def __call__(
        self,
        root: Path,
        *,
        expected_d_in: int | None,
        expected_site: str | None,
        device: str | torch.device,
        dtype: torch.dtype,
        family: str | None = None,
    ) -> SAE: ...


@dataclass(frozen=True)
class DiskFormat:
    """An on-disk SAE format: whether a directory is one of its SAEs, and how to load it."""

    name: str
    is_own: Callable[[Path], bool]
    """Cheap test on the directory's file names; at most one format may claim a directory."""
    load: Loader
    """Load and validate one SAE directory; every problem raises SAEFormatError naming the file."""
    layout: str
    """Its files, for error messages."""
    parts: Callable[[Path, str | None], list[str]] | None = None
    """For a format whose directory holds one SAE or transcoder per layer (circuit-tracer's transcoder sets and
    cross-layer transcoders): (directory, model family) -> the read sites of its parts, in layer order; `load` then
    needs expected_site to pick one. None: a directory is one SAE."""
