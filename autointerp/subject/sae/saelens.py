"""SAELens directory format: `cfg.json` + `sae_weights.safetensors`.

The loader accepts ReLU ("standard"), TopK and JumpReLU SAEs written by old (<= 5) and new (6.x) SAELens and
refuses, with an error naming the file, any cfg value that would change the encoding in a way not implemented
here. Encoding follows SAELens exactly (see module.py; TopK selects on the pre-activations, then applies relu).
`save_sae` writes this format, whatever format the SAE was read from.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from autointerp.subject import names
from autointerp.subject.sae.config import (
    Normalization,
    SAEConfig,
    SAEFormatError,
    check_expected,
    read_cfg_json,
    site_to_tl_hook,
)
from autointerp.subject.sae.module import SAE, build_sae, check_finite
from autointerp.subject.sae.registry import SAE_ARCHITECTURES, SAEArchitecture
from autointerp.subject.sae.specs import DiskFormat

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"

# SAELens `architecture` and `activation_fn_str` values -> ours, from the registry. "standard" (old SAELens)
# defers to the activation function.
_STANDARD = "standard"
_BY_ARCHITECTURE: dict[str, SAEArchitecture] = {
    s.saelens_architecture: cast(SAEArchitecture, s.name)
    for s in SAE_ARCHITECTURES.values()
    if s.saelens_architecture is not None
}
_BY_ACTIVATION: dict[str, SAEArchitecture] = {
    s.saelens_activation: cast(SAEArchitecture, s.name)
    for s in SAE_ARCHITECTURES.values()
    if s.saelens_activation is not None
}
_REFUSED_ARCHITECTURES: dict[str, str] = {
    "gated": "gated SAEs (separate gate and magnitude paths) are not supported",
    "batchtopk": "BatchTopK training SAEs are not supported; save them as jumprelu inference SAEs",
    "matryoshka_batchtopk": "Matryoshka BatchTopK training SAEs are not supported; save them as jumprelu",
    "temporal": "temporal SAEs are not supported",
}
# SAELens transcoder architectures -> (our architecture, skip connection). SAELens writes W_skip [d_out, d_in].
_TRANSCODERS: dict[str, tuple[SAEArchitecture, bool]] = {
    "transcoder": ("relu", False),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
_TRANSCODER_NAMES = {v: k for k, v in _TRANSCODERS.items()}
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


# ----------------------------------------------------------------------------------------------------
# Config


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


def _parse_architecture(raw: Mapping[str, Any], where: str) -> SAEArchitecture:
    arch_name = raw.get("architecture", _STANDARD)
    act_name = raw.get("activation_fn_str", raw.get("activation_fn"))
    if not isinstance(arch_name, str):
        raise SAEFormatError(f"{where}: architecture must be a string, got {arch_name!r}")
    if arch_name in _TRANSCODERS:
        if act_name not in (None, "relu"):
            raise SAEFormatError(f"{where}: architecture {arch_name!r} contradicts activation function {act_name!r}")
        return _TRANSCODERS[arch_name][0]
    if arch_name in _REFUSED_ARCHITECTURES:
        raise SAEFormatError(f"{where}: architecture {arch_name!r}: {_REFUSED_ARCHITECTURES[arch_name]}")
    if arch_name not in _BY_ARCHITECTURE:
        raise SAEFormatError(f"{where}: unknown architecture {arch_name!r}; supported: {sorted(_BY_ARCHITECTURE)}")
    if act_name is not None and act_name not in _BY_ACTIVATION:
        raise SAEFormatError(f"{where}: unknown activation function {act_name!r}; supported: {sorted(_BY_ACTIVATION)}")
    if arch_name == _STANDARD:
        return _BY_ACTIVATION[act_name] if act_name is not None else "relu"
    arch = _BY_ARCHITECTURE[arch_name]
    # TopK applies relu after selection and JumpReLU multiplies relu(pre) by the mask, so "relu" is consistent
    # with both; another architecture's activation function (jumprelu + "topk") is not.
    if act_name not in (None, "relu", SAE_ARCHITECTURES[arch].saelens_activation):
        raise SAEFormatError(f"{where}: architecture {arch_name!r} contradicts activation function {act_name!r}")
    return arch


def _parse_k(raw: Mapping[str, Any], arch: SAEArchitecture, d_sae: int, where: str) -> int | None:
    kwargs = raw.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise SAEFormatError(f"{where}: activation_fn_kwargs must be an object, got {kwargs!r}")
    top, nested = raw.get("k"), kwargs.get("k")
    if not SAE_ARCHITECTURES[arch].needs_k:
        return None
    if top is not None and nested is not None and top != nested:
        raise SAEFormatError(f"{where}: k is {top!r} but activation_fn_kwargs.k is {nested!r}")
    k = top if top is not None else nested
    if k is None:
        raise SAEFormatError(f"{where}: {arch} SAE without k (expected `k` or `activation_fn_kwargs.k`)")
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
    if raw.get("architecture") not in _TRANSCODERS:
        for key in ("d_out", "hook_name_out"):
            if _pick(raw, key, where) is not None:
                raise SAEFormatError(
                    f"{where}: {key!r} present but architecture {raw.get('architecture')!r} is no transcoder; "
                    f"transcoders have architecture {sorted(_TRANSCODERS)}"
                )
    head_out = _pick(raw, "hook_head_index_out", where)
    if head_out is not None:
        raise SAEFormatError(f"{where}: per-head transcoders (hook_head_index_out={head_out!r}) are not supported")


def _site(hook: Any, key: str, family: str | None, where: str) -> str:
    try:
        return names.hook_to_site(str(hook), family)
    except names.SiteError as e:
        raise SAEFormatError(f"{where}: {key} {hook!r}: {e}") from None


def parse_sae_cfg(raw: Mapping[str, Any], *, where: str = "<cfg>", family: str | None = None) -> SAEConfig:
    """A SAELens cfg dict (any version we know; SAEs and the transcoder architectures) as an SAEConfig, or
    SAEFormatError naming `where`. A transcoder reads `hook_name` and writes `hook_name_out`."""
    if not isinstance(raw, Mapping):
        raise SAEFormatError(f"{where}: cfg must be a JSON object, got {type(raw).__name__}")
    _refuse_unsupported(raw, where)
    arch = _parse_architecture(raw, where)
    d_in = _int_field(raw, "d_in", where)
    d_sae = _int_field(raw, "d_sae", where)
    k = _parse_k(raw, arch, d_sae, where)
    norm, factor = _parse_normalization(raw, where)
    rescale = _bool_field(raw, "rescale_acts_by_decoder_norm", False, where)
    if rescale and not SAE_ARCHITECTURES[arch].supports_rescale:
        raise SAEFormatError(f"{where}: rescale_acts_by_decoder_norm is not supported for {arch} SAEs")
    hook = _pick(raw, "hook_name", where)
    site = None if hook is None else _site(hook, "hook_name", family, where)
    model_name = _pick(raw, "model_name", where)
    transcoder: dict[str, Any] = {}
    if raw.get("architecture") in _TRANSCODERS:
        hook_out = _pick(raw, "hook_name_out", where)
        if hook_out is None:
            raise SAEFormatError(f"{where}: a {raw['architecture']} without hook_name_out: where it writes is unknown")
        if _bool_field(raw, "apply_b_dec_to_input", False, where):
            raise SAEFormatError(f"{where}: apply_b_dec_to_input=true on a transcoder (SAELens refuses it too)")
        if norm != "none":
            raise SAEFormatError(f"{where}: normalize_activations {norm!r} is not supported for transcoders")
        transcoder = {
            "write_sites": (_site(hook_out, "hook_name_out", family, where),),
            "d_out": _int_field(raw, "d_out", where),
            "skip": _TRANSCODERS[raw["architecture"]][1],
        }
    return SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture=arch,
        k=k,
        # A transcoder's b_dec is an output bias: never subtracted from its input.
        apply_b_dec_to_input=not transcoder and _bool_field(raw, "apply_b_dec_to_input", True, where),
        site=site,
        model_name=None if model_name is None else str(model_name),
        normalize_activations=norm,
        norm_scaling_factor=factor,
        rescale_acts_by_decoder_norm=rescale,
        raw=dict(raw),
        **transcoder,
    )


# ----------------------------------------------------------------------------------------------------
# Files


def is_saelens_dir(root: Path) -> bool:
    return (root / WEIGHTS_FILE).is_file()


def load_saelens(
    root: Path,
    *,
    expected_d_in: int | None = None,
    expected_site: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    family: str | None = None,
) -> SAE:
    """Load and validate a SAELens-format directory; every problem raises SAEFormatError naming the file."""
    cfg_path, weights_path = root / CFG_FILE, root / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise SAEFormatError(f"{cfg_path}: missing config file")
    if not weights_path.is_file():
        raise SAEFormatError(f"{weights_path}: missing weights file")
    raw = read_cfg_json(cfg_path)
    cfg = parse_sae_cfg(raw, where=str(cfg_path), family=family)
    cfg = check_expected(cfg, str(cfg_path), expected_site=expected_site, expected_d_in=expected_d_in)
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise SAEFormatError(f"{weights_path}: cannot read safetensors file: {e}") from None
    check_finite(tensors, str(weights_path))  # by the names in the file, before log_threshold is exponentiated
    needs_threshold = SAE_ARCHITECTURES[cfg.architecture].needs_threshold
    if needs_threshold and "threshold" not in tensors and "log_threshold" in tensors:
        # SAELens training checkpoints keep the threshold in log space.
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if cfg.skip and "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T  # SAELens: [d_out, d_in], x @ W_skip.T
    return build_sae(cfg, tensors, str(weights_path), device=device, dtype=dtype)


FORMAT = DiskFormat(
    name="saelens",
    is_own=is_saelens_dir,
    load=load_saelens,
    layout=f"SAELens: {CFG_FILE} + {WEIGHTS_FILE}",
)


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
    spec = SAE_ARCHITECTURES[cfg.architecture]
    if spec.saelens_architecture is None:
        raise SAEFormatError(f"{cfg.architecture} SAEs have no SAELens cfg (SAELens has no such architecture)")
    architecture = spec.saelens_architecture
    if cfg.is_transcoder:
        name = _TRANSCODER_NAMES.get((cfg.architecture, cfg.skip))
        if name is None or cfg.n_write > 1:
            raise SAEFormatError(
                f"a {cfg.architecture} transcoder writing {cfg.n_write} site(s) has no SAELens cfg "
                f"(SAELens transcoders: {sorted(_TRANSCODERS)}, one write site)"
            )
        architecture = name
    elif cfg.skip:
        raise SAEFormatError("an SAE with a skip connection has no SAELens cfg")
    metadata: dict[str, Any] = {}
    for key in _PROVENANCE_KEYS:
        value = _meta(cfg.raw).get(key, cfg.raw.get(key))
        if value is not None:
            metadata[key] = value
    hook = site_to_tl_hook(cfg.site) if cfg.site is not None else None
    metadata.update(
        hook_name=hook,
        hook_layer=names.layer_of(cfg.site) if cfg.site is not None else None,
        model_name=cfg.model_name,
        autointerp_site=cfg.site,
    )
    if cfg.is_transcoder:
        metadata["hook_name_out"] = site_to_tl_hook(cfg.write_sites[0])
        metadata["autointerp_write_sites"] = list(cfg.write_sites)
    out: dict[str, Any] = {
        "architecture": architecture,
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
        "activation_fn_str": spec.saelens_activation or "relu",
    }
    if cfg.k is not None:
        out["k"] = cfg.k
        out["activation_fn_kwargs"] = {"k": cfg.k}
    if cfg.norm_scaling_factor is not None:
        out["norm_scaling_factor"] = cfg.norm_scaling_factor
    if cfg.is_transcoder:
        out["d_out"] = cfg.out_width
    return out


def state_dict32(sae: SAE) -> dict[str, torch.Tensor]:
    """The SAE's tensors under our names (SAELens' but for W_skip, stored [d_in, d_out]), float32 on the CPU (what
    stable_id hashes; save_sae transposes W_skip to SAELens' [d_out, d_in])."""
    keys = ["W_enc", "b_enc", "W_dec", "b_dec"] + [n for n in ("threshold", "W_skip") if getattr(sae, n) is not None]
    return {n: getattr(sae, n).detach().to(device="cpu", dtype=torch.float32).contiguous() for n in keys}


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def save_sae(sae: SAE, path: str | os.PathLike[str]) -> Path:
    """Write `sae` as a SAELens directory (weights, then cfg, each atomically); returns the directory."""
    text = json.dumps(sae_cfg_dict(sae.cfg), indent=2)  # first: it refuses what SAELens cannot describe
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    state = state_dict32(sae)
    if "W_skip" in state:
        state["W_skip"] = state["W_skip"].T.contiguous()  # SAELens' layout
    _atomic_write(root / WEIGHTS_FILE, lambda p: save_file(state, str(p)))
    _atomic_write(root / CFG_FILE, lambda p: _write_text(p, text))
    return root
