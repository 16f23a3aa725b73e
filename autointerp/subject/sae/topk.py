"""TopK SAE: the k largest pre-activations of each token, then relu (SAELens order), zeros elsewhere.

sparsify applies relu first and then selects; both orders give the same dense z (the positive entries among the
k largest are the same), they differ only in which indices carry a zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from autointerp.subject.sae.specs import ArchSpec

if TYPE_CHECKING:
    from autointerp.subject.sae.module import SAE


def _topk_sparse(pre: torch.Tensor, sae: SAE) -> tuple[torch.Tensor, torch.Tensor]:
    k = sae.cfg.k
    assert k is not None  # SAEConfig requires it
    values, indices = torch.topk(pre, k, dim=-1, sorted=False)
    return values.relu_(), indices


def _topk(pre: torch.Tensor, sae: SAE, inplace: bool) -> torch.Tensor:
    values, indices = _topk_sparse(pre, sae)
    # Reuse the pre-activation buffer as the output: one [N, d_sae] allocation instead of two.
    out = pre.zero_() if inplace else torch.zeros_like(pre)
    return out.scatter_(-1, indices, values)


SPEC = ArchSpec(
    name="topk",
    activate=_topk,
    sparse=_topk_sparse,
    needs_k=True,
    saelens_architecture="topk",
    saelens_activation="topk",
)
