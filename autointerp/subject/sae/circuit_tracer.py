"""circuit-tracer's transcoders (safety-research/circuit-tracer): a folder with `config.yaml` and one part per layer.

config.yaml: `model_name`; `feature_input_hook` and `feature_output_hook`, TransformerLens hook names without the
`blocks.L.` prefix (`hook_resid_mid`, `ln2.hook_normalized`, `mlp.hook_in`, `hook_mlp_out`, `mlp.hook_out`;
circuit-tracer's `mlp.hook_in` / `mlp.hook_out` are the MLP's input and output, i.e. hook_mlp_in / hook_mlp_out);
then either
- a transcoder set (per-layer transcoders): `transcoders`, a list of {id, layer, filepath}; each file a local path
  (relative to the folder, or absolute), either a safetensors file in circuit-tracer's layout (W_enc [d_sae, d_in],
  W_dec [d_out, d_sae], b_enc [d_sae], b_dec [d_out], optional W_skip [d_out, d_in] used as x @ W_skip.T, optional
  threshold [d_sae] for JumpReLU) or a Gemma Scope `params.npz` (see gemmascope.py). Layer L reads the input hook
  at L and writes the output hook at L. `hf://ORG/REPO/FILE[?revision=REV]` paths (circuit-tracer's published sets)
  are taken from the local Hugging Face cache, never downloaded: a file not there is refused, naming it;
- a cross-layer transcoder (no `transcoders` list): `W_enc_{l}.safetensors` holding W_enc_{l} [d_sae, d_in],
  b_enc_{l} [d_sae], b_dec_{l} [d_out], optional threshold_{l} [d_sae]; `W_dec_{l}.safetensors` holding W_dec_{l}
  [d_sae, n_layers - l, d_out], for l = 0 .. n_layers - 1. A latent of layer l reads the input hook at l and writes
  the output hook at every layer l' >= l (W_dec_{l}[:, l' - l]); the reconstruction at l' is the sum of those
  writes plus b_dec_{l'}. Our part for layer l carries b_dec_{l} at its first write site and zero at the others,
  so the parts' decodes sum to the CLT's reconstruction.
Encoding (both): z = act(x @ W_enc.T + b_enc), act relu, or JumpReLU with the threshold (which circuit-tracer applies
as pre * (pre > threshold): equal to ours for the non-negative thresholds we accept).

The folder is one source per layer: `parts` lists their read sites, and `load` picks one by its read site.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from autointerp.subject import names
from autointerp.subject.sae import gemmascope
from autointerp.subject.sae.config import SAEConfig, SAEFormatError, check_expected, tl_hook_to_site
from autointerp.subject.sae.module import SAE, build_sae, check_finite
from autointerp.subject.sae.specs import DiskFormat

CFG_FILE = "config.yaml"
_ENC = re.compile(r"^W_enc_(\d+)\.safetensors$")
# circuit-tracer's own hook names on its replacement MLP -> TransformerLens names.
_ALIASES = {"mlp.hook_in": "hook_mlp_in", "mlp.hook_out": "hook_mlp_out"}


def is_circuit_tracer_dir(root: Path) -> bool:
    return (root / CFG_FILE).is_file()


def _config(root: Path) -> dict[str, Any]:
    import yaml  # a dependency of transformers and huggingface_hub; only this format needs it

    path = root / CFG_FILE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SAEFormatError(f"{path}: cannot read it as YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SAEFormatError(f"{path}: expected a mapping, got {type(raw).__name__}")
    for key in ("feature_input_hook", "feature_output_hook"):
        if not isinstance(raw.get(key), str):
            raise SAEFormatError(f"{path}: missing or non-string key {key!r}")
    return raw


def _site(raw: dict[str, Any], key: str, layer: int, family: str | None, where: str) -> str:
    hook = _ALIASES.get(raw[key], raw[key])
    try:
        return names.hook_to_site(f"blocks.{layer}.{hook}", family)
    except names.SiteError as e:
        raise SAEFormatError(f"{where}: {key} {raw[key]!r}: {e}") from None


def _clt_layers(root: Path) -> int:
    """The number of layers of a CLT folder (its W_enc_{l} files must be 0 .. n-1)."""
    layers = sorted(int(m.group(1)) for p in root.iterdir() if (m := _ENC.match(p.name)))
    if not layers:
        raise SAEFormatError(
            f"{root / CFG_FILE}: no `transcoders` list and no W_enc_0.safetensors: neither a transcoder set nor a "
            "cross-layer transcoder"
        )
    if layers != list(range(len(layers))):
        raise SAEFormatError(f"{root}: the W_enc_{{l}}.safetensors files are layers {layers}, not 0..{len(layers) - 1}")
    return len(layers)


def _set_entries(root: Path, raw: dict[str, Any]) -> dict[int, Path]:
    """layer -> file of a transcoder set."""
    where = str(root / CFG_FILE)
    entries = raw["transcoders"]
    if not isinstance(entries, list) or not entries:
        raise SAEFormatError(f"{where}: `transcoders` must be a non-empty list of {{id, layer, filepath}}")
    out: dict[int, Path] = {}
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("layer"), int) or not isinstance(e.get("filepath"), str):
            raise SAEFormatError(f"{where}: each transcoder needs an integer `layer` and a `filepath`, got {e!r}")
        if e["layer"] in out:
            raise SAEFormatError(f"{where}: two transcoders for layer {e['layer']}")
        if e["filepath"].startswith("hf://"):
            out[e["layer"]] = _cached(e["filepath"], f"{where}: layer {e['layer']}")
            continue
        path = Path(e["filepath"])
        out[e["layer"]] = path if path.is_absolute() else root / path
    return dict(sorted(out.items()))


def _cached(uri: str, where: str) -> Path:
    """The local copy of `hf://ORG/REPO/FILE[?revision=REV]` in the Hugging Face cache (offline: nothing is
    fetched); SAEFormatError naming it when it is not there."""
    from huggingface_hub import try_to_load_from_cache

    rest, _, query = uri.removeprefix("hf://").partition("?")
    revision = query.removeprefix("revision=") if query.startswith("revision=") else None
    bits = rest.split("/", 2)
    if len(bits) < 3 or not all(bits) or (query and revision is None):
        raise SAEFormatError(f"{where}: {uri!r} is not hf://ORG/REPO/FILE[?revision=REV]")
    found = try_to_load_from_cache(f"{bits[0]}/{bits[1]}", bits[2], revision=revision)
    if not isinstance(found, str):
        raise SAEFormatError(
            f"{where}: {uri} is not in the local Hugging Face cache (autointerp downloads nothing here: fetch the "
            "repo first, e.g. `huggingface-cli download`, or give local file paths)"
        )
    return Path(found)


def parts(root: Path, family: str | None = None) -> list[str]:
    """The read sites of the folder's per-layer parts, in layer order."""
    raw = _config(root)
    layers = list(_set_entries(root, raw)) if "transcoders" in raw else list(range(_clt_layers(root)))
    return [_site(raw, "feature_input_hook", layer, family, str(root / CFG_FILE)) for layer in layers]


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SAEFormatError(f"{path}: missing weights file")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise SAEFormatError(f"{path}: cannot read safetensors file: {e}") from None
    check_finite(tensors, str(path))
    return tensors


def _take(tensors: dict[str, torch.Tensor], names_: dict[str, str], optional: set[str], where: Path) -> dict:
    missing = [k for k in names_ if k not in tensors and k not in optional]
    extra = sorted(set(tensors) - set(names_))
    if missing or extra:
        problem = f"missing tensor(s) {missing}" if missing else f"unexpected tensor(s) {extra}"
        raise SAEFormatError(f"{where}: {problem} (expected {sorted(names_)})")
    return {ours: tensors[theirs] for theirs, ours in names_.items() if theirs in tensors}


def _check_threshold(tensors: dict[str, torch.Tensor], where: Path) -> None:
    t = tensors.get("threshold")
    if t is not None and bool((t < 0).any()):
        raise SAEFormatError(f"{where}: negative JumpReLU thresholds (circuit-tracer does not apply relu there)")


def _mat(t: torch.Tensor, name: str, where: Path) -> torch.Tensor:
    if t.dim() != 2:
        raise SAEFormatError(f"{where}: {name} has shape {tuple(t.shape)}, expected a matrix")
    return t


def _load_set_layer(
    file: Path, read: str, write: str, layer: int, raw: dict[str, Any]
) -> tuple[SAEConfig, dict[str, torch.Tensor], str]:
    where = file
    if file.name.endswith(".npz"):
        tensors = gemmascope._read_npz(file)
        tensors.pop("scaling_factor", None)
        tensors = _take(tensors, {k: k for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}, set(), where)
    else:
        tensors = _take(
            _safetensors(file),
            {k: k for k in ("W_enc", "W_dec", "b_enc", "b_dec", "W_skip", "threshold")},
            {"W_skip", "threshold"},
            where,
        )
        tensors["W_enc"] = _mat(tensors["W_enc"], "W_enc", where).T  # [d_sae, d_in] -> ours
        tensors["W_dec"] = _mat(tensors["W_dec"], "W_dec", where).T  # [d_out, d_sae] -> ours
        if "W_skip" in tensors:
            tensors["W_skip"] = _mat(tensors["W_skip"], "W_skip", where).T  # x @ W_skip.T
    _check_threshold(tensors, where)
    d_in, d_sae = _mat(tensors["W_enc"], "W_enc", where).shape
    cfg = SAEConfig(
        d_in=int(d_in),
        d_sae=int(d_sae),
        architecture="jumprelu" if "threshold" in tensors else "relu",
        apply_b_dec_to_input=False,
        site=read,
        model_name=raw.get("model_name") if isinstance(raw.get("model_name"), str) else None,
        write_sites=(write,),
        d_out=int(_mat(tensors["W_dec"], "W_dec", where).shape[1]),
        skip="W_skip" in tensors,
        raw=_provenance(raw, layer, "transcoder_set"),
    )
    return cfg, tensors, str(where)


def _load_clt_layer(
    root: Path, layer: int, n_layers: int, read: str, writes: tuple[str, ...], raw: dict[str, Any]
) -> tuple[SAEConfig, dict[str, torch.Tensor], str]:
    enc_path, dec_path = root / f"W_enc_{layer}.safetensors", root / f"W_dec_{layer}.safetensors"
    enc = _take(
        _safetensors(enc_path),
        {f"W_enc_{layer}": "W_enc", f"b_enc_{layer}": "b_enc", f"b_dec_{layer}": "b_dec", f"threshold_{layer}": "t"},
        {f"threshold_{layer}"},
        enc_path,
    )
    dec = _take(_safetensors(dec_path), {f"W_dec_{layer}": "W_dec"}, set(), dec_path)["W_dec"]
    W_enc = _mat(enc["W_enc"], f"W_enc_{layer}", enc_path).T
    d_in, d_sae = W_enc.shape
    n_write = n_layers - layer
    if dec.dim() != 3 or dec.shape[:2] != (d_sae, n_write):
        raise SAEFormatError(
            f"{dec_path}: W_dec_{layer} has shape {tuple(dec.shape)}, expected [{d_sae}, {n_write}, d_out] "
            f"(d_sae, the {n_layers} - {layer} layers it writes, d_out)"
        )
    b_dec = enc["b_dec"]
    if n_write > 1:
        b_dec = torch.cat([b_dec[None], torch.zeros(n_write - 1, *b_dec.shape, dtype=b_dec.dtype)])
    tensors = {"W_enc": W_enc, "b_enc": enc["b_enc"], "W_dec": dec if n_write > 1 else dec[:, 0], "b_dec": b_dec}
    if "t" in enc:
        tensors["threshold"] = enc["t"]
    _check_threshold(tensors, enc_path)
    cfg = SAEConfig(
        d_in=int(d_in),
        d_sae=int(d_sae),
        architecture="jumprelu" if "threshold" in tensors else "relu",
        apply_b_dec_to_input=False,
        site=read,
        model_name=raw.get("model_name") if isinstance(raw.get("model_name"), str) else None,
        write_sites=writes,
        d_out=int(dec.shape[-1]),
        raw={**_provenance(raw, layer, "clt"), "n_layers": n_layers},
    )
    return cfg, tensors, str(dec_path)


def _provenance(raw: dict[str, Any], layer: int, kind: str) -> dict[str, Any]:
    keep: dict[str, Any] = {k: raw[k] for k in ("model_name", "feature_input_hook", "feature_output_hook") if k in raw}
    return {**keep, "format": "circuit_tracer", "kind": kind, "layer": layer}


def load_circuit_tracer(
    root: Path,
    *,
    expected_d_in: int | None = None,
    expected_site: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    family: str | None = None,
) -> SAE:
    """Load the part of a circuit-tracer folder that reads `expected_site`; SAEFormatError naming the file."""
    raw = _config(root)
    where = str(root / CFG_FILE)
    reads = parts(root, family)
    if expected_site is None:
        raise SAEFormatError(f"{where}: a folder of {len(reads)} per-layer transcoders; give the read site of one")
    want = tl_hook_to_site(expected_site)
    if want not in reads:
        raise SAEFormatError(f"{where}: no part reads {want}; its parts read {', '.join(reads)}")
    index = reads.index(want)
    try:
        if "transcoders" in raw:
            layer, file = list(_set_entries(root, raw).items())[index]
            write = _site(raw, "feature_output_hook", layer, family, where)
            cfg, tensors, tensors_where = _load_set_layer(file, want, write, layer, raw)
        else:
            n = len(reads)
            writes = tuple(_site(raw, "feature_output_hook", lo, family, where) for lo in range(index, n))
            cfg, tensors, tensors_where = _load_clt_layer(root, index, n, want, writes, raw)
    except ValueError as e:
        if isinstance(e, SAEFormatError):
            raise
        raise SAEFormatError(f"{where}: layer {index}: {e}") from None
    cfg = check_expected(cfg, where, expected_site=expected_site, expected_d_in=expected_d_in)
    return build_sae(cfg, tensors, tensors_where, device=device, dtype=dtype)


FORMAT = DiskFormat(
    name="circuit_tracer",
    is_own=is_circuit_tracer_dir,
    load=load_circuit_tracer,
    layout=f"circuit-tracer: {CFG_FILE} + per-layer transcoder files or W_enc_{{l}} / W_dec_{{l}}.safetensors",
    parts=parts,
)
