"""Gemma Scope 2 (google/gemma-scope-2-*, Gemma 3): one folder per SAE or transcoder holding `config.json` and
`params.safetensors` (layout as SAELens' gemma_3 loader reads it).

config.json: `architecture` "jump_relu"; `hf_hook_point_in`, the Hugging Face module path it reads
(`model.layers.L.output`, `model.layers.L.pre_feedforward_layernorm.output`, `model.layers.L.self_attn.o_proj.input`,
...); `hf_hook_point_out`, where a transcoder writes (`model.layers.L.post_feedforward_layernorm.output`); absent or
equal to the input for an SAE; `affine_connection`: whether the transcoder has a skip connection. Other keys
(model_name, width, l0, ...) are provenance. Module paths mean different tensors in different families, so they are
mapped with the model's family (subject.names.hook_to_site).

params.safetensors: w_enc [d_in, d_sae], w_dec [d_sae, d_out], b_enc [d_sae], b_dec [d_out], threshold [d_sae] and,
with the skip connection, affine_skip_connection [d_in, d_out]: out = decode(z) + x @ affine_skip_connection. The
encoding is JumpReLU on x @ w_enc + b_enc (no b_dec subtracted). The cross-layer transcoder files of Gemma Scope 2
(`clt/...`, one safetensors per layer) are not this layout and are not read here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from autointerp.subject import names
from autointerp.subject.sae.config import SAEConfig, SAEFormatError, check_expected, read_cfg_json
from autointerp.subject.sae.module import SAE, build_sae, check_finite
from autointerp.subject.sae.specs import DiskFormat

CFG_FILE = "config.json"
WEIGHTS_FILE = "params.safetensors"
_ARCHITECTURE = "jump_relu"
_TENSORS = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}
_SKIP = "affine_skip_connection"


def is_gemmascope2_dir(root: Path) -> bool:
    return (root / WEIGHTS_FILE).is_file()


def _site(raw: dict[str, Any], key: str, family: str | None, where: str) -> str:
    hook = raw[key]
    if not isinstance(hook, str):
        raise SAEFormatError(f"{where}: {key} must be a string, got {hook!r}")
    try:
        return names.hook_to_site(hook, family)
    except names.SiteError as e:
        fam = "" if family else " (the model family is needed to map a Hugging Face module path)"
        raise SAEFormatError(f"{where}: {key} {hook!r}: {e}{fam}") from None


def load_gemmascope2(
    root: Path,
    *,
    expected_d_in: int | None = None,
    expected_site: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    family: str | None = None,
) -> SAE:
    """Load one Gemma Scope 2 folder; every problem raises SAEFormatError naming the file."""
    cfg_path, weights_path = root / CFG_FILE, root / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise SAEFormatError(f"{cfg_path}: missing config file (Gemma Scope 2: {CFG_FILE} + {WEIGHTS_FILE})")
    raw = read_cfg_json(cfg_path)
    where = str(cfg_path)
    if not isinstance(raw, dict):
        raise SAEFormatError(f"{where}: cfg must be a JSON object, got {type(raw).__name__}")
    if raw.get("architecture") != _ARCHITECTURE:
        raise SAEFormatError(f"{where}: architecture {raw.get('architecture')!r}; expected {_ARCHITECTURE!r}")
    if "hf_hook_point_in" not in raw:
        raise SAEFormatError(f"{where}: missing key 'hf_hook_point_in' (where it reads)")
    read = _site(raw, "hf_hook_point_in", family, where)
    write = None
    if raw.get("hf_hook_point_out") not in (None, raw["hf_hook_point_in"]):
        write = _site(raw, "hf_hook_point_out", family, where)
    affine = raw.get("affine_connection", False)
    if not isinstance(affine, bool):
        raise SAEFormatError(f"{where}: affine_connection must be true or false, got {affine!r}")
    try:
        file = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise SAEFormatError(f"{weights_path}: cannot read safetensors file: {e}") from None
    check_finite(file, str(weights_path))
    if affine != (_SKIP in file):
        raise SAEFormatError(
            f"{weights_path}: {CFG_FILE} says affine_connection={str(affine).lower()} but the tensor {_SKIP} is "
            f"{'missing' if affine else 'present'}"
        )
    missing = [n for n in _TENSORS if n not in file]
    extra = sorted(set(file) - set(_TENSORS) - {_SKIP})
    if missing or extra:
        problem = f"missing tensor(s) {missing}" if missing else f"unexpected tensor(s) {extra}"
        raise SAEFormatError(f"{weights_path}: {problem} (Gemma Scope 2: {sorted(_TENSORS)} and {_SKIP})")
    tensors = {ours: file[theirs] for theirs, ours in _TENSORS.items()}
    if affine:
        tensors["W_skip"] = file[_SKIP]  # [d_in, d_out], used as x @ it: our layout
    if tensors["W_enc"].dim() != 2 or tensors["W_dec"].dim() != 2:
        raise SAEFormatError(f"{weights_path}: w_enc and w_dec must be matrices")
    d_in, d_sae = tensors["W_enc"].shape
    d_out = tensors["W_dec"].shape[1]
    try:
        cfg = SAEConfig(
            d_in=int(d_in),
            d_sae=int(d_sae),
            architecture="jumprelu",
            apply_b_dec_to_input=False,
            site=read,
            model_name=raw.get("model_name") if isinstance(raw.get("model_name"), str) else None,
            write_sites=() if write is None else (write,),
            d_out=None if write is None else int(d_out),
            skip=affine,
            raw={**raw, "format": "gemmascope2"},
        )
    except ValueError as e:
        raise SAEFormatError(f"{weights_path}: {e}") from None
    cfg = check_expected(cfg, where, expected_site=expected_site, expected_d_in=expected_d_in)
    return build_sae(cfg, tensors, str(weights_path), device=device, dtype=dtype)


FORMAT = DiskFormat(
    name="gemmascope2",
    is_own=is_gemmascope2_dir,
    load=load_gemmascope2,
    layout=f"Gemma Scope 2: {CFG_FILE} + {WEIGHTS_FILE}",
)
