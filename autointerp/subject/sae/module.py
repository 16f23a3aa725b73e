"""The inference SAE module, whatever format it was read from. Encoding:

    sae_in = normalize(x) - b_dec * apply_b_dec_to_input
    pre    = sae_in @ W_enc + b_enc            (times ||W_dec row|| if rescale_acts_by_decoder_norm)
    z      = the architecture's activation of `pre` (see registry.py)

The result of `encode` is the feature activation stored by the collector.

Transcoders (cfg.write_sites) encode their read site the same way (never subtracting b_dec, an output bias) and
decode into their write site: decode(z) = z @ W_dec + b_dec, and `forward` adds the skip connection x @ W_skip where
the cfg has one. A cross-layer transcoder's layer writes several sites: W_dec [d_sae, n_write, d_out], b_dec
[n_write, d_out] and decode gives [..., n_write, d_out] (its part of each later layer's output).
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
    W_skip: torch.Tensor | None

    def __init__(
        self,
        cfg: SAEConfig,
        *,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        threshold: torch.Tensor | None = None,
        W_skip: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        if threshold is not None:
            tensors["threshold"] = threshold
        if W_skip is not None:
            tensors["W_skip"] = W_skip
        check_tensors(cfg, tensors, "<in-memory SAE>")
        self.cfg = cfg
        self._spec = SAE_ARCHITECTURES[cfg.architecture]
        for name in TENSOR_NAMES:
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
        lead, out = z.shape[:-1], self.cfg.out_width
        flat = z.reshape(-1, self.cfg.d_sae)
        if W_dec.dim() == 3:  # a cross-layer transcoder's layer: one output per write site
            n = self.cfg.n_write
            y = torch.addmm(self.b_dec.reshape(-1), flat, W_dec.reshape(self.cfg.d_sae, n * out))
            return y.reshape(*lead, n, out)
        return torch.addmm(self.b_dec, flat, W_dec).reshape(*lead, out)

    def direction(self, index: int, write: int = 0) -> torch.Tensor:
        """[out_width] latent `index`'s decoder row at its `write`-th write site (0 for SAEs and transcoders)."""
        return self.W_dec[index, write] if self.W_dec.dim() == 3 else self.W_dec[index]

    def skip_out(self, x: torch.Tensor) -> torch.Tensor | None:
        """x @ W_skip (the skip connection's part of `forward`), None without one."""
        if self.W_skip is None:
            return None
        x = x.to(device=self.W_skip.device, dtype=self.W_skip.dtype)
        return (x.reshape(-1, self.cfg.d_in) @ self.W_skip).reshape(*x.shape[:-1], self.cfg.out_width)

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
        """The reconstruction of x (an SAE) or the prediction of the write site (a transcoder: decode(encode(x)) +
        the skip connection), in the input's dtype and device."""
        z, out_scale = self._encode(x)
        x_hat = self._decode(z)
        if not (isinstance(out_scale, float) and out_scale == 1.0):
            x_hat = x_hat / out_scale
        skip = self.skip_out(x)
        if skip is not None:
            x_hat = x_hat + skip
        return x_hat.to(device=x.device, dtype=x.dtype)


TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip")


def check_tensors(cfg: SAEConfig, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Exactly the tensors `cfg` needs, of the right shapes, floating point and finite; else SAEFormatError."""
    out = cfg.out_width
    multi = (cfg.n_write,) if cfg.n_write > 1 else ()
    expected = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, *multi, out),
        "b_dec": (*multi, out),
    }
    if SAE_ARCHITECTURES[cfg.architecture].needs_threshold:
        expected["threshold"] = (cfg.d_sae,)
    if cfg.skip:
        expected["W_skip"] = (cfg.d_in, out)
    what = f"{cfg.architecture} {'transcoder' if cfg.is_transcoder else 'SAE'}"
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise SAEFormatError(f"{where}: missing tensor(s) {missing} for a {what}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise SAEFormatError(
            f"{where}: unexpected tensor(s) {extra} for a {what} (their effect on the encoding is unknown)"
        )
    dims = f"d_in={cfg.d_in}, d_sae={cfg.d_sae}" + (f", d_out={out}" if cfg.is_transcoder else "")
    dims += f", {cfg.n_write} write sites" if multi else ""
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise SAEFormatError(f"{where}: {name} has shape {tuple(t.shape)}, expected {shape} ({dims})")
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
