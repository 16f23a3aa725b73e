"""GroupMax SAE (sparsify `activation = "groupmax"`): the latents form k contiguous groups of d_sae / k; each token
keeps the largest relu'd pre-activation of every group, zeros elsewhere. SAELens has no such SAE."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from autointerp.subject.sae.specs import ArchSpec

if TYPE_CHECKING:
    from autointerp.subject.sae.config import SAEConfig
    from autointerp.subject.sae.module import SAE


def _groupmax_sparse(pre: torch.Tensor, sae: SAE) -> tuple[torch.Tensor, torch.Tensor]:
    k = sae.cfg.k
    assert k is not None  # SAEConfig requires it
    n, d_sae = pre.shape
    size = d_sae // k
    # max of pre then relu == max of relu(pre) (relu is monotone); a group with no positive entry yields a 0.
    values, within = pre.view(n, k, size).max(dim=-1)
    return values.relu_(), within + torch.arange(0, d_sae, size, device=pre.device)


def _groupmax(pre: torch.Tensor, sae: SAE, inplace: bool) -> torch.Tensor:
    values, indices = _groupmax_sparse(pre, sae)
    out = pre.zero_() if inplace else torch.zeros_like(pre)
    return out.scatter_(-1, indices, values)


def _validate(cfg: SAEConfig) -> None:
    if cfg.k is not None and cfg.d_sae % cfg.k:
        raise ValueError(f"groupmax needs k to divide d_sae={cfg.d_sae}, got k={cfg.k}")


SPEC = ArchSpec(name="groupmax", activate=_groupmax, sparse=_groupmax_sparse, needs_k=True, validate=_validate)
