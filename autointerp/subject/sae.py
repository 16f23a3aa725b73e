"""Sparse autoencoders in SAELens directory format (`cfg.json` + `sae_weights.safetensors`).

The loader accepts ReLU ("standard"), TopK and JumpReLU SAEs written by old (<= 5) and new (6.x) SAELens and
refuses, with an error naming the file, any cfg value that would change the encoding in a way not implemented
here. Encoding follows SAELens exactly:

    sae_in = normalize(x) - b_dec * apply_b_dec_to_input
    pre    = sae_in @ W_enc + b_enc            (times ||W_dec row|| if rescale_acts_by_decoder_norm)
    relu     -> relu(pre)
    topk     -> top-k entries of `pre`, then relu (SAELens order), zeros elsewhere
    jumprelu -> relu(pre) * (pre > threshold)

The result of `encode` is the feature activation stored by the collector.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from autointerp.subject import names

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"

Architecture = Literal["relu", "topk", "jumprelu"]
Normalization = Literal["none", "expected_average_only_in", "constant_norm_rescale"]


class SAEFormatError(ValueError):
    """An SAE file or config that cannot be used; the message names the path and the problem."""


# ----------------------------------------------------------------------------------------------------
# Site names


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


def _layer_of(site: str) -> int:
    return names.layer_of(site)


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class SAEConfig:
    d_in: int
    d_sae: int
    architecture: Architecture
    k: int | None = None
    """Number of active latents per token (TopK only)."""
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

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}")
        if self.architecture not in _ACTIVATIONS:
            raise ValueError(f"unknown architecture {self.architecture!r}")
        if self.architecture == "topk":
            if self.k is None or not 0 < self.k <= self.d_sae:
                raise ValueError(f"topk needs 0 < k <= d_sae={self.d_sae}, got k={self.k}")
        elif self.k is not None:
            raise ValueError(f"k is only meaningful for topk, got k={self.k} for {self.architecture}")
        if self.normalize_activations == "expected_average_only_in":
            f = self.norm_scaling_factor
            if f is None or not (math.isfinite(f) and f > 0):
                raise ValueError(f"expected_average_only_in needs a positive norm_scaling_factor, got {f}")
        elif self.normalize_activations not in ("none", "constant_norm_rescale"):
            raise ValueError(f"unsupported normalize_activations {self.normalize_activations!r}")
        if self.rescale_acts_by_decoder_norm and self.architecture == "jumprelu":
            # Whether the threshold applies before or after the rescale is not fixed by any format we know.
            raise ValueError("rescale_acts_by_decoder_norm is not supported for jumprelu")
        if self.site is not None:
            object.__setattr__(self, "site", tl_hook_to_site(self.site))


# Old SAELens `architecture` values that we map; "standard" defers to the activation function.
_CFG_ARCHITECTURES: dict[str, Architecture | None] = {
    "standard": None,
    "topk": "topk",
    "jumprelu": "jumprelu",
}
_REFUSED_ARCHITECTURES: dict[str, str] = {
    "gated": "gated SAEs (separate gate and magnitude paths) are not supported",
    "batchtopk": "BatchTopK training SAEs are not supported; save them as jumprelu inference SAEs",
    "matryoshka_batchtopk": "Matryoshka BatchTopK training SAEs are not supported; save them as jumprelu",
    "transcoder": "transcoders are not supported",
    "skip_transcoder": "transcoders are not supported",
    "jumprelu_transcoder": "transcoders are not supported",
    "temporal": "temporal SAEs are not supported",
}
_CFG_ACTIVATIONS: dict[str, Architecture] = {"relu": "relu", "topk": "topk"}
# Provenance-only cfg keys copied into `metadata` on save.
_PROVENANCE_KEYS = (
    "context_size",
    "dataset_path",
    "prepend_bos",
    "neuronpedia_id",
    "model_class_name",
    "sae_lens_training_version",
)


def _meta(raw: Mapping[str, Any]) -> dict[str, Any]:
    # SAELens 6 nests hook/model names in `metadata` (some 6.0 builds call it `meta`).
    for key in ("metadata", "meta"):
        value = raw.get(key)
        if isinstance(value, dict):
            return value
    return {}


def _pick(raw: Mapping[str, Any], key: str, where: str) -> Any:
    """A value that may sit at the top level (old SAELens) or in metadata (new); both must agree."""
    top, nested = raw.get(key), _meta(raw).get(key)
    if top is not None and nested is not None and top != nested:
        raise SAEFormatError(f"{where}: {key} is {top!r} at top level but {nested!r} in metadata")
    return top if top is not None else nested


def _int_field(raw: Mapping[str, Any], key: str, where: str) -> int:
    if key not in raw:
        raise SAEFormatError(f"{where}: missing key {key!r}")
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or value <= 0:
        raise SAEFormatError(f"{where}: {key} must be a positive integer, got {value!r}")
    return int(value)


def _bool_field(raw: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SAEFormatError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _parse_architecture(raw: Mapping[str, Any], where: str) -> Architecture:
    arch_name = raw.get("architecture", "standard")
    act_name = raw.get("activation_fn_str", raw.get("activation_fn"))
    if not isinstance(arch_name, str):
        raise SAEFormatError(f"{where}: architecture must be a string, got {arch_name!r}")
    if arch_name in _REFUSED_ARCHITECTURES:
        raise SAEFormatError(f"{where}: architecture {arch_name!r}: {_REFUSED_ARCHITECTURES[arch_name]}")
    if arch_name not in _CFG_ARCHITECTURES:
        raise SAEFormatError(f"{where}: unknown architecture {arch_name!r}; supported: {sorted(_CFG_ARCHITECTURES)}")
    if act_name is not None and act_name not in _CFG_ACTIVATIONS:
        raise SAEFormatError(
            f"{where}: unknown activation function {act_name!r}; supported: {sorted(_CFG_ACTIVATIONS)}"
        )
    arch = _CFG_ARCHITECTURES[arch_name]
    if arch is None:
        return _CFG_ACTIVATIONS[act_name] if act_name is not None else "relu"
    # TopK applies relu after selection and JumpReLU multiplies relu(pre) by the mask, so "relu" is consistent
    # with both; "topk" is not consistent with jumprelu.
    if arch == "jumprelu" and act_name == "topk":
        raise SAEFormatError(f"{where}: architecture 'jumprelu' contradicts activation function 'topk'")
    return arch


def _parse_k(raw: Mapping[str, Any], arch: Architecture, d_sae: int, where: str) -> int | None:
    kwargs = raw.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise SAEFormatError(f"{where}: activation_fn_kwargs must be an object, got {kwargs!r}")
    top, nested = raw.get("k"), kwargs.get("k")
    if arch != "topk":
        return None
    if top is not None and nested is not None and top != nested:
        raise SAEFormatError(f"{where}: k is {top!r} but activation_fn_kwargs.k is {nested!r}")
    k = top if top is not None else nested
    if k is None:
        raise SAEFormatError(f"{where}: topk SAE without k (expected `k` or `activation_fn_kwargs.k`)")
    if isinstance(k, bool) or not isinstance(k, int | float) or int(k) != k or not 0 < k <= d_sae:
        raise SAEFormatError(f"{where}: k must be an integer in 1..d_sae={d_sae}, got {k!r}")
    return int(k)


def _parse_normalization(raw: Mapping[str, Any], where: str) -> tuple[Normalization, float | None]:
    norm = raw.get("normalize_activations", "none")
    if norm is None or norm is False:  # very old SAELens used a bool
        norm = "none"
    if norm == "none":
        return "none", None
    if norm == "constant_norm_rescale":
        return "constant_norm_rescale", None
    if norm == "expected_average_only_in":
        # SAELens folds this constant into the weights when it saves an inference SAE (then writes "none");
        # if it is still set, the constant must be in the cfg or the encoding is unknown.
        factor = raw.get("norm_scaling_factor")
        if isinstance(factor, int | float) and not isinstance(factor, bool) and math.isfinite(factor) and factor > 0:
            return "expected_average_only_in", float(factor)
        raise SAEFormatError(
            f"{where}: normalize_activations 'expected_average_only_in' without a positive "
            f"'norm_scaling_factor' in the cfg: the input scale is unknown (fold it into the weights first)"
        )
    raise SAEFormatError(
        f"{where}: unsupported normalize_activations {norm!r}; supported: "
        "'none', 'constant_norm_rescale', 'expected_average_only_in' (with norm_scaling_factor)"
    )


def _refuse_unsupported(raw: Mapping[str, Any], where: str) -> None:
    meta = _meta(raw)
    head = raw.get("hook_head_index", meta.get("hook_head_index"))
    if head is not None:
        raise SAEFormatError(f"{where}: per-head SAEs (hook_head_index={head!r}) are not supported")
    reshape = raw.get("reshape_activations", "none")
    if reshape not in (None, "none"):
        raise SAEFormatError(f"{where}: reshape_activations={reshape!r} is not supported")
    if raw.get("finetuning_scaling_factor"):
        raise SAEFormatError(f"{where}: finetuning_scaling_factor=true is not supported")
    for key in ("d_out", "hook_name_out"):
        if raw.get(key) is not None:
            raise SAEFormatError(f"{where}: {key!r} present: transcoders are not supported")


def parse_sae_cfg(raw: Mapping[str, Any], *, where: str = "<cfg>") -> SAEConfig:
    """A SAELens cfg dict (any version we know) as an SAEConfig, or SAEFormatError naming `where`."""
    if not isinstance(raw, Mapping):
        raise SAEFormatError(f"{where}: cfg must be a JSON object, got {type(raw).__name__}")
    _refuse_unsupported(raw, where)
    arch = _parse_architecture(raw, where)
    d_in = _int_field(raw, "d_in", where)
    d_sae = _int_field(raw, "d_sae", where)
    k = _parse_k(raw, arch, d_sae, where)
    norm, factor = _parse_normalization(raw, where)
    rescale = _bool_field(raw, "rescale_acts_by_decoder_norm", False, where)
    if rescale and arch == "jumprelu":
        raise SAEFormatError(f"{where}: rescale_acts_by_decoder_norm is not supported for jumprelu SAEs")
    hook = _pick(raw, "hook_name", where)
    site = None
    if hook is not None:
        try:
            site = tl_hook_to_site(str(hook))
        except SAEFormatError as e:
            raise SAEFormatError(f"{where}: {e}") from None
    model_name = _pick(raw, "model_name", where)
    return SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture=arch,
        k=k,
        apply_b_dec_to_input=_bool_field(raw, "apply_b_dec_to_input", True, where),
        site=site,
        model_name=None if model_name is None else str(model_name),
        normalize_activations=norm,
        norm_scaling_factor=factor,
        rescale_acts_by_decoder_norm=rescale,
        raw=dict(raw),
    )


# ----------------------------------------------------------------------------------------------------
# Activation functions (registry: architecture -> function of the pre-activations, may work in place)


def _relu(pre: torch.Tensor, sae: SAE, inplace: bool) -> torch.Tensor:  # noqa: ARG001
    return pre.relu_() if inplace else pre.relu()


def _topk(pre: torch.Tensor, sae: SAE, inplace: bool) -> torch.Tensor:
    k = sae.cfg.k
    assert k is not None
    # SAELens order: select the k largest pre-activations, then relu them.
    values, indices = torch.topk(pre, k, dim=-1, sorted=False)
    # Reuse the pre-activation buffer as the output: one [N, d_sae] allocation instead of two.
    out = pre.zero_() if inplace else torch.zeros_like(pre)
    return out.scatter_(-1, indices, values.relu_())


def _jumprelu(pre: torch.Tensor, sae: SAE, inplace: bool) -> torch.Tensor:
    assert sae.threshold is not None
    mask = pre > sae.threshold
    return pre.relu_().mul_(mask) if inplace else pre.relu() * mask


_ACTIVATIONS: dict[str, Callable[[torch.Tensor, SAE, bool], torch.Tensor]] = {
    "relu": _relu,
    "topk": _topk,
    "jumprelu": _jumprelu,
}


# ----------------------------------------------------------------------------------------------------
# Module


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
        _check_tensors(cfg, tensors, "<in-memory SAE>")
        self.cfg = cfg
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

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"SAE for {self.cfg.site or 'unknown site'} expects d_in={self.cfg.d_in}, got {x.shape}")
        W_enc = self.W_enc
        x = x.to(device=W_enc.device, dtype=W_enc.dtype)
        x, out_scale = self._normalize_in(x)
        # (x - b_dec) @ W_enc + b_enc == x @ W_enc + (b_enc - b_dec @ W_enc): saves an [N, d_in] temporary.
        bias = self.b_enc - self.b_dec @ W_enc if self.cfg.apply_b_dec_to_input else self.b_enc
        lead = x.shape[:-1]
        pre = torch.addmm(bias, x.reshape(-1, self.cfg.d_in), W_enc)
        inplace = not pre.requires_grad
        if self.cfg.rescale_acts_by_decoder_norm:
            norms = self.W_dec.norm(dim=-1)
            pre = pre.mul_(norms) if inplace else pre * norms
        z = _ACTIVATIONS[self.cfg.architecture](pre, self, inplace)
        return z.reshape(*lead, self.cfg.d_sae), out_scale

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
        """TopK only: ([N, k] values >= 0, [N, k] latent indices) of `encode(x)` for x [N, d_in], without
        materializing the [N, d_sae] output (the collector's hot path)."""
        if self.cfg.architecture != "topk" or self.cfg.k is None:
            raise ValueError("encode_sparse needs a TopK SAE")
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"SAE expects d_in={self.cfg.d_in}, got {tuple(x.shape)}")
        W_enc = self.W_enc
        x, _ = self._normalize_in(x.to(device=W_enc.device, dtype=W_enc.dtype))
        bias = self.b_enc - self.b_dec @ W_enc if self.cfg.apply_b_dec_to_input else self.b_enc
        pre = torch.addmm(bias, x.reshape(-1, self.cfg.d_in), W_enc)
        if self.cfg.rescale_acts_by_decoder_norm:
            pre.mul_(self.W_dec.norm(dim=-1))
        values, indices = torch.topk(pre, self.cfg.k, dim=-1, sorted=False)
        return values.relu_(), indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, out_scale = self._encode(x)
        x_hat = self._decode(z)
        if not (isinstance(out_scale, float) and out_scale == 1.0):
            x_hat = x_hat / out_scale
        return x_hat.to(device=x.device, dtype=x.dtype)


def _check_tensors(cfg: SAEConfig, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    expected = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    if cfg.architecture == "jumprelu":
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
        if not bool(torch.isfinite(t).all()):
            raise SAEFormatError(f"{where}: {name} contains non-finite values (NaN or inf)")


# ----------------------------------------------------------------------------------------------------
# Files


def load_sae(
    path: str | os.PathLike[str],
    *,
    expected_d_in: int | None = None,
    expected_site: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SAE:
    """Load and validate a SAELens-format directory; every problem raises SAEFormatError naming the file."""
    root = Path(path)
    if not root.is_dir():
        raise SAEFormatError(f"{root}: not a directory (expected {CFG_FILE} and {WEIGHTS_FILE} inside)")
    cfg_path, weights_path = root / CFG_FILE, root / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise SAEFormatError(f"{cfg_path}: missing config file")
    if not weights_path.is_file():
        raise SAEFormatError(f"{weights_path}: missing weights file")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFormatError(f"{cfg_path}: invalid JSON: {e}") from None
    cfg = parse_sae_cfg(raw, where=str(cfg_path))

    if expected_site is not None:
        want = tl_hook_to_site(expected_site)
        if cfg.site is None:
            cfg = replace(cfg, site=want)
        elif cfg.site != want:
            raise SAEFormatError(f"{cfg_path}: SAE was trained on site {cfg.site}, but it is attached to {want}")
    if expected_d_in is not None and expected_d_in != cfg.d_in:
        raise SAEFormatError(
            f"{cfg_path}: d_in={cfg.d_in} does not match the width {expected_d_in} of site "
            f"{cfg.site or expected_site or '(unknown)'}"
        )

    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise SAEFormatError(f"{weights_path}: cannot read safetensors file: {e}") from None
    if cfg.architecture == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:
        # SAELens training checkpoints keep the threshold in log space.
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    _check_tensors(cfg, tensors, str(weights_path))
    tensors = {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}
    return SAE(cfg, **tensors)


def _atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sae_cfg_dict(cfg: SAEConfig) -> dict[str, Any]:
    """The cfg.json we write: SAELens 6 layout plus top-level names that older readers look for."""
    metadata: dict[str, Any] = {}
    for key in _PROVENANCE_KEYS:
        value = _meta(cfg.raw).get(key, cfg.raw.get(key))
        if value is not None:
            metadata[key] = value
    hook = site_to_tl_hook(cfg.site) if cfg.site is not None else None
    metadata.update(
        hook_name=hook,
        hook_layer=_layer_of(cfg.site) if cfg.site is not None else None,
        model_name=cfg.model_name,
        autointerp_site=cfg.site,
    )
    out: dict[str, Any] = {
        "architecture": "standard" if cfg.architecture == "relu" else cfg.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations,
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": cfg.rescale_acts_by_decoder_norm,
        "metadata": metadata,
        "hook_name": hook,
        "hook_layer": metadata["hook_layer"],
        "model_name": cfg.model_name,
        "activation_fn_str": "topk" if cfg.architecture == "topk" else "relu",
    }
    if cfg.k is not None:
        out["k"] = cfg.k
        out["activation_fn_kwargs"] = {"k": cfg.k}
    if cfg.norm_scaling_factor is not None:
        out["norm_scaling_factor"] = cfg.norm_scaling_factor
    return out


def _state(sae: SAE) -> dict[str, torch.Tensor]:
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if sae.threshold is not None else [])
    return {n: getattr(sae, n).detach().to(device="cpu", dtype=torch.float32).contiguous() for n in names}


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def save_sae(sae: SAE, path: str | os.PathLike[str]) -> Path:
    """Write `sae` as a SAELens directory (weights, then cfg, each atomically); returns the directory."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    state = _state(sae)
    _atomic_write(root / WEIGHTS_FILE, lambda p: save_file(state, str(p)))
    text = json.dumps(sae_cfg_dict(sae.cfg), indent=2)
    _atomic_write(root / CFG_FILE, lambda p: _write_text(p, text))
    return root


def stable_id(sae_or_path: SAE | str | os.PathLike[str]) -> str:
    """Short content hash of the encoding-relevant cfg and the float32 weights.

    A directory and the SAE loaded from it get the same id; provenance-only cfg fields do not count.
    """
    sae = sae_or_path if isinstance(sae_or_path, SAE) else load_sae(sae_or_path)
    semantic = {k: v for k, v in asdict(sae.cfg).items() if k != "raw"}
    h = hashlib.sha256(json.dumps(semantic, sort_keys=True).encode())
    for name, t in _state(sae).items():
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]
