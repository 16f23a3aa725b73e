"""JumpReLU SAE: z = relu(pre) * (pre > threshold), with a per-latent threshold tensor in the weights file."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from autointerp.subject.sae.specs import ArchSpec

if TYPE_CHECKING:
    from autointerp.subject.sae.module import SAE


def _jumprelu(pre: torch.Tensor, sae: SAE, inplace: bool) -> torch.Tensor:
    assert sae.threshold is not None  # the loader requires the tensor
    mask = pre > sae.threshold
    return pre.relu_().mul_(mask) if inplace else pre.relu() * mask


SPEC = ArchSpec(
    name="jumprelu",
    activate=_jumprelu,
    needs_threshold=True,
    # Whether the threshold applies before or after the rescale is not fixed by any format we know.
    supports_rescale=False,
    saelens_architecture="jumprelu",
)
