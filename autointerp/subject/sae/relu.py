"""ReLU SAE (SAELens "standard"): z = relu(pre)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from autointerp.subject.sae.specs import ArchSpec

if TYPE_CHECKING:
    from autointerp.subject.sae.module import SAE


def _relu(pre: torch.Tensor, sae: SAE, inplace: bool) -> torch.Tensor:  # noqa: ARG001
    return pre.relu_() if inplace else pre.relu()


SPEC = ArchSpec(name="relu", activate=_relu, saelens_architecture="standard", saelens_activation="relu")
