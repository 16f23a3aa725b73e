"""Gemma Scope (google/gemma-scope-*, Gemma 2): one folder per SAE or transcoder holding `params.npz` alone.

The archive holds W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc [d_sae], b_dec [d_out], threshold [d_sae]: a
JumpReLU whose input is not shifted by b_dec (z = jumprelu(x @ W_enc + b_enc)). There is no config file: the site
comes from the caller (`site = ...` in the config) or from the folder's path, as in the Hugging Face repos:
`<repo>/layer_L/width_W/average_l0_N`, with the repo named `gemma-scope-<size>-<pt|it>-<kind>` (in a Hugging Face
cache the repo folder is `models--google--gemma-scope-2b-pt-res`). The repo kind gives the hook, as SAELens' own
Gemma Scope loaders take it:
    res          blocks.L.resid.post      (hook_resid_post)
    mlp          blocks.L.mlp.out         (hook_mlp_out)
    att          blocks.L.attn.z          (attn.hook_z, the heads' concatenated outputs)
    transcoders  reads blocks.L.mlp.in (ln2.hook_normalized), writes blocks.L.mlp.out (hook_mlp_out)
A transcoder is told apart from an SAE by its repo name only (the files are alike). Refused: the embedding SAEs
(not a block site) and `scaling_factor` tensors other than all ones (fine-tuning scale, effect unknown here).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from autointerp.subject.sae.config import SAEConfig, SAEFormatError, check_expected
from autointerp.subject.sae.module import SAE, build_sae, check_finite
from autointerp.subject.sae.specs import DiskFormat

WEIGHTS_FILE = "params.npz"
_REPO = re.compile(r"gemma-scope-[0-9.]+b-(?:pt|it)-(res|mlp|att|transcoders)(?![a-z])")
_LAYER = re.compile(r"^layer_(\d+)$")
_KINDS: dict[str, tuple[str, str | None]] = {
    "res": ("resid.post", None),
    "mlp": ("mlp.out", None),
    "att": ("attn.z", None),
    "transcoders": ("mlp.in", "mlp.out"),
}
_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def path_sites(root: Path) -> tuple[str, str | None] | None:
    """(read site, write site or None) from a Gemma Scope folder path; None when the path does not say."""
    parts = Path(root).absolute().parts
    layers = [int(m.group(1)) for p in parts if (m := _LAYER.match(p))]
    repos = [m.group(1) for p in parts if (m := _REPO.search(p))]
    if repos and any(p == "embedding" for p in parts[-4:]):
        raise SAEFormatError(f"{root}: Gemma Scope embedding SAEs read no block site and are not supported")
    if not layers or not repos:
        return None
    read, write = _KINDS[repos[-1]]
    layer = layers[-1]
    return f"blocks.{layer}.{read}", None if write is None else f"blocks.{layer}.{write}"


def is_gemmascope_dir(root: Path) -> bool:
    return (root / WEIGHTS_FILE).is_file()


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise SAEFormatError(f"{path}: cannot read the npz archive: {e}") from None
    out = {}
    for key, a in arrays.items():
        name = "W_" + key[2:] if key.startswith("w_") else key  # some archives spell the weights w_enc / w_dec
        if a.dtype.kind != "f":
            raise SAEFormatError(f"{path}: array {key} has dtype {a.dtype}, expected floating point")
        out[name] = torch.from_numpy(a.astype(np.float32, copy=False))
    return out


def load_gemmascope(
    root: Path,
    *,
    expected_d_in: int | None = None,
    expected_site: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    family: str | None = None,  # noqa: ARG001 (sites come from the path or the caller)
) -> SAE:
    """Load one Gemma Scope folder; every problem raises SAEFormatError naming the file."""
    path = root / WEIGHTS_FILE
    tensors = _read_npz(path)
    check_finite(tensors, str(path))
    scale = tensors.pop("scaling_factor", None)
    if scale is not None and not bool(torch.all(scale == 1)):
        raise SAEFormatError(f"{path}: a scaling_factor other than 1 (fine-tuning scale) is not supported")
    missing = [n for n in _TENSORS if n not in tensors]
    if missing:
        raise SAEFormatError(f"{path}: missing array(s) {missing} (a Gemma Scope archive holds {list(_TENSORS)})")
    W_enc, W_dec = tensors["W_enc"], tensors["W_dec"]
    if W_enc.dim() != 2 or W_dec.dim() != 2:
        raise SAEFormatError(f"{path}: W_enc {tuple(W_enc.shape)} and W_dec {tuple(W_dec.shape)} must be matrices")
    d_in, d_sae = W_enc.shape
    d_out = W_dec.shape[1]
    sites = path_sites(root)
    if sites is None and expected_site is None:
        raise SAEFormatError(
            f"{path}: a Gemma Scope archive names no site and its path (…/gemma-scope-…-res|mlp|att|transcoders/"
            "layer_L/…) does not say it; give site = ... in the config"
        )
    read, write = sites if sites is not None else (None, None)
    if write is None and d_out != d_in:
        raise SAEFormatError(f"{path}: W_dec writes width {d_out} but W_enc reads {d_in}: not an SAE")
    try:
        cfg = SAEConfig(
            d_in=int(d_in),
            d_sae=int(d_sae),
            architecture="jumprelu",
            apply_b_dec_to_input=False,
            site=read,
            write_sites=() if write is None else (write,),
            d_out=None if write is None else int(d_out),
            raw={"format": "gemmascope", "path": str(root)},
        )
    except ValueError as e:
        raise SAEFormatError(f"{path}: {e}") from None
    cfg = check_expected(
        cfg, str(path), expected_site=expected_site, expected_d_in=expected_d_in, origin="from its folder path"
    )
    return build_sae(cfg, tensors, str(path), device=device, dtype=dtype)


FORMAT = DiskFormat(
    name="gemmascope",
    is_own=is_gemmascope_dir,
    load=load_gemmascope,
    layout=f"Gemma Scope: {WEIGHTS_FILE} (site from the config or the path …/gemma-scope-…-res/layer_L/…)",
)
