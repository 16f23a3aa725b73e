"""The inference SAE module, whatever format it was read from. Encoding:

    sae_in = normalize(x) - b_dec * apply_b_dec_to_input
    pre    = sae_in @ W_enc + b_enc            (times ||W_dec row|| if rescale_acts_by_decoder_norm)
    z      = the architecture's activation of `pre` (see registry.py)

The result of `encode` is the feature activation stored by the collector.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import cast

import torch

from autointerp.subject.sae.config import SAEConfig, SAEFormatError
from autointerp.subject.sae.registry import SAE_ARCHITECTURES


class SAE(torch.nn.Module):
    """An inference SAE. Weights are buffers (no gradients tracked); move or cast with `.to()` once.

    Inputs of any dtype/device are cast to the weights' dtype and device; `encode` returns that dtype,
    `forward` returns the input's dtype and device so it can replace the activation in the model.
    """

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor | None

    def __init__(
        self,
        cfg: SAEConfig,
        *,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        threshold: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        if threshold is not None:
            tensors["threshold"] = threshold
        check_tensors(cfg, tensors, "<in-memory SAE>")
        self.cfg = cfg
        self._spec = SAE_ARCHITECTURES[cfg.architecture]
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            t = tensors.get(name)
            self.register_buffer(name, None if t is None else t.detach())

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def _normalize_in(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """The cfg's input normalization: the normalized input and the factor to divide outputs by."""
        norm = self.cfg.normalize_activations
        if norm == "constant_norm_rescale":
            coeff = math.sqrt(self.cfg.d_in) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return x * coeff, coeff
        if norm == "expected_average_only_in":
            factor = cast(float, self.cfg.norm_scaling_factor)
            return x * factor, factor
        return x, 1.0

    def output_scale(self, x: torch.Tensor) -> torch.Tensor | float:
        """What `forward` divides the decoder's output by to return to the units of the input x: the cfg's input
        normalization factor (a float, or a [..., 1] tensor per token for constant_norm_rescale)."""
        return self._normalize_in(x.to(device=self.W_enc.device, dtype=self.W_enc.dtype))[1]

    def _pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """[..., d_in] -> ([N, d_sae] pre-activations, output scale)."""
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"SAE for {self.cfg.site or 'unknown site'} expects d_in={self.cfg.d_in}, got {x.shape}")
        W_enc = self.W_enc
        x = x.to(device=W_enc.device, dtype=W_enc.dtype)
        x, out_scale = self._normalize_in(x)
        # (x - b_dec) @ W_enc + b_enc == x @ W_enc + (b_enc - b_dec @ W_enc): saves an [N, d_in] temporary.
        bias = self.b_enc - self.b_dec @ W_enc if self.cfg.apply_b_dec_to_input else self.b_enc
        pre = torch.addmm(bias, x.reshape(-1, self.cfg.d_in), W_enc)
        if self.cfg.rescale_acts_by_decoder_norm:
            norms = self.W_dec.norm(dim=-1)
            pre = pre * norms if pre.requires_grad else pre.mul_(norms)
        return pre, out_scale

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        pre, out_scale = self._pre(x)
        z = self._spec.activate(pre, self, not pre.requires_grad)
        return z.reshape(*x.shape[:-1], self.cfg.d_sae), out_scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., d_sae] feature activations (see the module docstring)."""
        return self._encode(x)[0]

    def feature_activations(self, x: torch.Tensor) -> torch.Tensor:
        """The user-facing latent activation; identical to `encode` (decoder-norm scaling included)."""
        return self._encode(x)[0]

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        W_dec = self.W_dec
        z = z.to(device=W_dec.device, dtype=W_dec.dtype)
        if self.cfg.rescale_acts_by_decoder_norm:
            z = z / W_dec.norm(dim=-1)
        lead = z.shape[:-1]
        return torch.addmm(self.b_dec, z.reshape(-1, self.cfg.d_sae), W_dec).reshape(*lead, self.cfg.d_in)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] -> [..., d_in] reconstruction in input units.

        With `constant_norm_rescale` the per-token input norm is not known here, so the result is in
        normalized units (norm ~ sqrt(d_in)); `forward` undoes the per-token scale.
        """
        x_hat = self._decode(z)
        if self.cfg.normalize_activations == "expected_average_only_in":
            x_hat = x_hat / cast(float, self.cfg.norm_scaling_factor)
        return x_hat

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For architectures with k active slots a token (TopK, GroupMax): ([N, k] values >= 0, [N, k] latent
        indices) of `encode(x)` for x [N, d_in], without materializing the [N, d_sae] output (the collector's hot
        path)."""
        if self._spec.sparse is None:
            raise ValueError(f"encode_sparse needs a TopK or GroupMax SAE, not {self.cfg.architecture}")
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"SAE expects d_in={self.cfg.d_in}, got {tuple(x.shape)}")
        return self._spec.sparse(self._pre(x)[0], self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, out_scale = self._encode(x)
        x_hat = self._decode(z)
        if not (isinstance(out_scale, float) and out_scale == 1.0):
            x_hat = x_hat / out_scale
        return x_hat.to(device=x.device, dtype=x.dtype)


def check_tensors(cfg: SAEConfig, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Exactly the tensors `cfg` needs, of the right shapes, floating point and finite; else SAEFormatError."""
    expected = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    if SAE_ARCHITECTURES[cfg.architecture].needs_threshold:
        expected["threshold"] = (cfg.d_sae,)
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise SAEFormatError(f"{where}: missing tensor(s) {missing} for a {cfg.architecture} SAE")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise SAEFormatError(
            f"{where}: unexpected tensor(s) {extra} for a {cfg.architecture} SAE "
            "(their effect on the encoding is unknown)"
        )
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise SAEFormatError(
                f"{where}: {name} has shape {tuple(t.shape)}, expected {shape} (d_in={cfg.d_in}, d_sae={cfg.d_sae})"
            )
        if not t.is_floating_point():
            raise SAEFormatError(f"{where}: {name} has dtype {t.dtype}, expected a floating point tensor")
    check_finite(tensors, where)


def check_finite(tensors: Mapping[str, torch.Tensor], where: str, *, after: str = "") -> None:
    """SAEFormatError naming the first floating point tensor that holds a NaN or an infinity (`after`: what made
    it so, e.g. a cast). Loaders call it on the tensors as the file names them."""
    for name, t in tensors.items():
        if not t.is_floating_point() or bool(torch.isfinite(t).all()):
            continue
        bad = ~torch.isfinite(t)
        first = tuple(bad.nonzero()[0].tolist())
        raise SAEFormatError(
            f"{where}: tensor {name} contains {int(bad.sum())} non-finite value(s) (NaN or inf){after}, "
            f"the first {t[first].item()} at index {list(first)}"
        )


def build_sae(
    cfg: SAEConfig, tensors: Mapping[str, torch.Tensor], where: str, *, device: str | torch.device, dtype: torch.dtype
) -> SAE:
    """Check the tensors as read (errors name `where`), then move and cast them into an SAE (refused if the cast
    overflows: float32 weights beyond float16's range become inf)."""
    check_tensors(cfg, tensors, where)
    cast = {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}
    if any(t.dtype != dtype for t in tensors.values()):
        check_finite(cast, where, after=f" after the cast to {str(dtype).removeprefix('torch.')}")
    return SAE(cfg, **cast)
