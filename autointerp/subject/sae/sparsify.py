"""EleutherAI sparsify's on-disk format (PyPI `eai-sparsify`; learnt from `SparseCoder.save_to_disk` and
`load_from_disk` of release 1.3.3 and its history back to the `sae` package).

A training run writes one folder per hookpoint under `{save_dir}/{run_name}/` (`layers.6/`, `layers.6.mlp/`; with
several init seeds `layers.6/seed0/`, ...; the best checkpoints again under `best/`), each holding
- `cfg.json`: the SparseCoderConfig fields plus `d_in`: activation ("topk" | "groupmax"), k, num_latents (0 means
  d_in * expansion_factor), normalize_decoder, multi_topk, skip_connection, transcode (`signed` in files of the
  older `sae` package);
- `sae.safetensors`: encoder.weight [d_sae, d_in], encoder.bias [d_sae], W_dec [d_sae, d_in], b_dec [d_in], and
  W_skip [d_in, d_in] with skip_connection.
The hookpoint is only in the folder name. The run root also holds the trainer's `config.json`, from which we take
the model name (provenance only), and optimizer state, which we ignore.

sparsify encodes z = topk(relu(encoder(x - b_dec))) as (values, indices), i.e. our TopK on
W_enc = encoder.weight.T, b_enc = encoder.bias with apply_b_dec_to_input; groupmax keeps the max of each of k
contiguous latent groups instead. The latent we record is that pre-decoder value (no decoder-norm rescale).
normalize_decoder and multi_topk only act in training (unit decoder rows after each step; an auxiliary loss on the
top 4k, whose reconstruction sparsify's forward then also returns, while `encode` stays top-k), so they are
accepted. Refused, with the file and the field named: signed=true (current sparsify drops the flag and encodes such
files unsigned, unlike how they were trained), any other activation, and any key we do not know.

skip_connection=true: a W_skip [d_in, d_in] tensor, forward adds x @ W_skip.T (ours: W_skip.T).
Transcoders (transcode=true): sparsify encodes the module's *input* without subtracting b_dec and decodes into its
*output*: at `layers.L` (the block) it reads blocks.L.resid.pre and writes blocks.L.resid.post; at `layers.L.mlp`
(the usual place) it reads blocks.L.mlp.in (the MLP's normalized input) and writes blocks.L.mlp.out; at the MLP's
down projection it reads blocks.L.mlp.post and writes blocks.L.mlp.out; at the attention module it writes
blocks.L.attn.out from its normalized input, which is no site of ours (refused), and from the output projection
it reads blocks.L.attn.z.

Hookpoint (module name under the HF base model, as sparsify's trainer names them) -> site, see `hookpoint_site`:
    layers.L | h.L                                         -> blocks.L.resid.post   (the block's output)
    layers.L.mlp | h.L.mlp, and the MLP's down projection  -> blocks.L.mlp.out
        (mlp.down_proj, mlp.c_proj, mlp.dense_4h_to_h)
    layers.L.mlp.act | h.L.mlp.act (gpt2, gpt_neox)        -> blocks.L.mlp.post     (the down projection's input)
    layers.L.self_attn | h.L.attn | layers.L.attention,    -> blocks.L.attn.out
        and their output projections (o_proj, c_proj, dense)
A `model.`, `transformer.` or `gpt_neox.` prefix is dropped. Refused: other modules of a block (e.g. the
layernorms, or `mlp.act_fn`, which in gated MLPs is act(gate) without the `* up`) and the embeddings and final norm
(not the residual stream in every family). A folder name that is no module path (a renamed folder) gives no site;
the caller must then give one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from autointerp.subject.sae.config import SAEConfig, SAEFormatError, check_expected, read_cfg_json
from autointerp.subject.sae.module import SAE, build_sae, check_finite
from autointerp.subject.sae.registry import SAEArchitecture
from autointerp.subject.sae.specs import DiskFormat

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
RUN_CONFIG_FILE = "config.json"
SEED_DIR = re.compile(r"^seed\d+$")

_ACTIVATIONS: dict[str, SAEArchitecture] = {"topk": "topk", "groupmax": "groupmax"}
_TRAINING_ONLY = ("normalize_decoder", "multi_topk")
_FLAGS = ("transcode", "skip_connection")
_REFUSED_FLAGS = {
    "signed": "signed SAEs are not supported (top-k by magnitude without relu; sparsify itself now ignores the flag)",
}
_KNOWN_KEYS = {
    "d_in",
    "activation",
    "k",
    "num_latents",
    "expansion_factor",
    *_TRAINING_ONLY,
    *_FLAGS,
    *_REFUSED_FLAGS,
}
_TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")

_PREFIXES = ("model.", "transformer.", "gpt_neox.")
_BLOCK_MODULE = re.compile(r"^(?:layers|h)\.(\d+)(?:\.(.+))?$")
_MODULE_KIND: dict[str | None, str] = {
    None: "resid.post",
    "mlp": "mlp.out",
    "mlp.down_proj": "mlp.out",
    "mlp.c_proj": "mlp.out",
    "mlp.dense_4h_to_h": "mlp.out",
    "mlp.act": "mlp.post",
    "self_attn": "attn.out",
    "attn": "attn.out",
    "attention": "attn.out",
    "self_attn.o_proj": "attn.out",
    "attn.c_proj": "attn.out",
    "attention.dense": "attn.out",
}
# A transcoder at the module of kind K reads the module's input: the site before it.
_INPUT_OF: dict[str, str] = {"resid.post": "resid.pre", "mlp.out": "mlp.in"}
_DOWN_PROJ = {"mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h"}
_OUT_PROJ = {"self_attn.o_proj", "attn.c_proj", "attention.dense"}
# On Gemma 2/3 what the MLP and the attention add to the residual is their post-norm's output: the `mlp` /
# `self_attn` modules' own outputs (where sparsify hooks) are no autointerp site there, so they are refused.
_POST_NORMED_FAMILIES = {"gemma2", "gemma3", "gemma3_text"}
_BEFORE_POST_NORM = {"mlp", "mlp.down_proj", "self_attn", "self_attn.o_proj"}
_OUTSIDE_BLOCKS = {"embed_tokens", "embed_in", "wte", "wpe", "norm", "ln_f", "final_layer_norm"}


def hookpoint_site(hookpoint: str) -> str | None:
    """Our site for a sparsify hookpoint (see the module docstring); None for a name that is no module path."""
    name = hookpoint
    for prefix in _PREFIXES:
        name = name.removeprefix(prefix)
    m = _BLOCK_MODULE.match(name)
    if m is None:
        if name in _OUTSIDE_BLOCKS:
            raise SAEFormatError(f"hookpoint {hookpoint!r}: the embeddings and the final norm are not autointerp sites")
        return None
    layer, module = int(m.group(1)), m.group(2)
    if module not in _MODULE_KIND:
        known = ", ".join(f"L.{k}" if k else "L" for k in _MODULE_KIND)
        hint = " (in gated MLPs it is act(gate) alone; mlp.post is act(gate) * up)" if module == "mlp.act_fn" else ""
        raise SAEFormatError(
            f"hookpoint {hookpoint!r}: no autointerp site is the output of module {module!r}{hint}; "
            f"supported under layers.L / h.L: {known}"
        )
    return f"blocks.{layer}.{_MODULE_KIND[module]}"


def transcoder_sites(hookpoint: str) -> tuple[str, str] | None:
    """(read site, write site) of a sparsify transcoder at `hookpoint` (see the module docstring); None for a name
    that is no module path."""
    write = hookpoint_site(hookpoint)
    if write is None:
        return None
    layer, kind = write.split(".", 2)[1:]
    name = hookpoint
    for prefix in _PREFIXES:
        name = name.removeprefix(prefix)
    module = _BLOCK_MODULE.match(name)
    sub = module.group(2) if module is not None else None
    if sub in _DOWN_PROJ:
        return f"blocks.{layer}.mlp.post", write
    if sub in _OUT_PROJ:
        return f"blocks.{layer}.attn.z", write
    if kind in _INPUT_OF:
        return f"blocks.{layer}.{_INPUT_OF[kind]}", write
    raise SAEFormatError(
        f"hookpoint {hookpoint!r}: a transcoder there reads the module's input, which is no autointerp site; "
        "supported: layers.L, layers.L.mlp, the MLP's down projection, the attention output projection"
    )


def check_family(hookpoint: str, family: str | None, where: str) -> None:
    """Refuse a hookpoint whose module output is not the site it names on `family` (Gemma 2/3's post-norms)."""
    if family not in _POST_NORMED_FAMILIES:
        return
    name = hookpoint
    for prefix in _PREFIXES:
        name = name.removeprefix(prefix)
    m = _BLOCK_MODULE.match(name)
    if m is not None and m.group(2) in _BEFORE_POST_NORM:
        raise SAEFormatError(
            f"{where}: hookpoint {hookpoint!r} on a {family} model is the {m.group(2)} module's output before its "
            "post-norm, which is not what reaches the residual stream (mlp.out / attn.out are the post-norms' "
            "outputs); no autointerp site is that tensor"
        )


def _hookpoint_dir(root: Path) -> Path:
    # abspath, not resolve: the folder's own name matters, not a symlink target's; "." gets a name.
    root = Path(os.path.abspath(root))
    return root.parent if SEED_DIR.match(root.name) else root


def hookpoint_of(root: Path) -> str:
    """The hookpoint a sparsify SAE folder was trained on: its name, or its parent's for a `seedN` folder."""
    return _hookpoint_dir(root).name


def _run_model(root: Path) -> str | None:
    """The model name in the trainer's config.json at the run root; provenance only, so unreadable means unknown."""
    try:
        run_cfg = json.loads((_hookpoint_dir(root).parent / RUN_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    is_sparsify_run = isinstance(run_cfg, dict) and isinstance(run_cfg.get("sae"), dict)
    model = run_cfg.get("model") if is_sparsify_run else None
    return model if isinstance(model, str) else None


def _int(raw: Mapping[str, Any], key: str, where: str, *, minimum: int) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SAEFormatError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _flag(raw: Mapping[str, Any], key: str, where: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise SAEFormatError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def parse_sparsify_cfg(
    raw: Any, *, where: str = "<cfg>", hookpoint: str | None = None, model_name: str | None = None
) -> SAEConfig:
    """A sparsify cfg.json dict as an SAEConfig (site from `hookpoint`), or SAEFormatError naming `where`."""
    if not isinstance(raw, dict):
        raise SAEFormatError(f"{where}: cfg must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _KNOWN_KEYS)
    if unknown:
        raise SAEFormatError(
            f"{where}: unknown sparsify cfg key(s) {unknown} (their effect on the encoding is unknown); "
            f"known: {sorted(_KNOWN_KEYS)}"
        )
    for key, why in _REFUSED_FLAGS.items():
        if _flag(raw, key, where):
            raise SAEFormatError(f"{where}: {key}=true: {why}")
    for key in (*_TRAINING_ONLY, *_FLAGS):
        _flag(raw, key, where)
    transcode = _flag(raw, "transcode", where)
    for key in ("d_in", "k"):
        if key not in raw:
            raise SAEFormatError(f"{where}: missing key {key!r}")
    d_in = _int(raw, "d_in", where, minimum=1)
    activation = raw.get("activation", "topk")  # sparsify's default when the key is absent
    if activation not in _ACTIVATIONS:
        raise SAEFormatError(f"{where}: unknown activation {activation!r}; supported: {sorted(_ACTIVATIONS)}")
    num_latents = _int(raw, "num_latents", where, minimum=0) if "num_latents" in raw else 0
    if num_latents:
        d_sae = num_latents
    else:
        if "expansion_factor" not in raw:
            raise SAEFormatError(f"{where}: num_latents is 0 or absent and there is no expansion_factor")
        d_sae = d_in * _int(raw, "expansion_factor", where, minimum=1)
    k = _int(raw, "k", where, minimum=1)
    if k > d_sae:
        raise SAEFormatError(f"{where}: k={k} exceeds the number of latents {d_sae}")
    if activation == "groupmax" and d_sae % k:
        raise SAEFormatError(f"{where}: k={k} does not divide the {d_sae} latents into groupmax groups")
    site: str | None = None
    write_sites: tuple[str, ...] = ()
    if hookpoint is not None:
        try:
            if transcode:
                sites = transcoder_sites(hookpoint)
                if sites is not None:
                    site, write_sites = sites[0], (sites[1],)
            else:
                site = hookpoint_site(hookpoint)
        except SAEFormatError as e:
            raise SAEFormatError(f"{where}: {e}") from None
    if transcode and not write_sites:
        raise SAEFormatError(
            f"{where}: a transcoder in folder {hookpoint!r}, which is no hookpoint: where it reads and writes is "
            "unknown (keep the folder named after its hookpoint)"
        )
    return SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture=_ACTIVATIONS[activation],
        k=k,
        apply_b_dec_to_input=not transcode,  # sparsify subtracts b_dec from SAE inputs only
        site=site,
        write_sites=write_sites,
        skip=_flag(raw, "skip_connection", where),
        model_name=model_name,
        # sparsify never writes these two keys; they record what the folder name and run config told us.
        raw={**raw, "format": "sparsify", "hookpoint": hookpoint},
    )


def _our_tensors(tensors: dict[str, torch.Tensor], cfg: SAEConfig, where: str) -> dict[str, torch.Tensor]:
    """sparsify's tensor names and layout -> ours (W_enc is the transposed encoder.weight, W_skip transposed)."""
    if "W_skip" in tensors and not cfg.skip:
        raise SAEFormatError(f"{where}: tensor W_skip present but {CFG_FILE} says skip_connection=false")
    names = (*_TENSORS, "W_skip") if cfg.skip else _TENSORS
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SAEFormatError(f"{where}: missing tensor(s) {missing} (expected {list(_TENSORS)})")
    extra = sorted(set(tensors) - set(names))
    if extra:
        raise SAEFormatError(f"{where}: unexpected tensor(s) {extra} (their effect on the encoding is unknown)")
    for name, shape in (("encoder.weight", (cfg.d_sae, cfg.d_in)), ("encoder.bias", (cfg.d_sae,))):
        if tuple(tensors[name].shape) != shape:
            raise SAEFormatError(
                f"{where}: {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                f"(from {CFG_FILE}: d_in={cfg.d_in}, {cfg.d_sae} latents from num_latents / expansion_factor)"
            )
    ours = {
        "W_enc": tensors["encoder.weight"].T,
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    if cfg.skip:
        ours["W_skip"] = tensors["W_skip"].T
    return ours


def is_sparsify_dir(root: Path) -> bool:
    return (root / WEIGHTS_FILE).is_file()


def load_sparsify(
    root: Path,
    *,
    expected_d_in: int | None = None,
    expected_site: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    family: str | None = None,
) -> SAE:
    """Load and validate one sparsify hookpoint folder; every problem raises SAEFormatError naming the file."""
    cfg_path, weights_path = root / CFG_FILE, root / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise SAEFormatError(f"{cfg_path}: missing config file")
    if not weights_path.is_file():
        raise SAEFormatError(f"{weights_path}: missing weights file")
    raw = read_cfg_json(cfg_path)
    hookpoint = hookpoint_of(root)
    check_family(hookpoint, family, str(root))
    cfg = parse_sparsify_cfg(raw, where=str(cfg_path), hookpoint=hookpoint, model_name=_run_model(root))
    origin = f"from its hookpoint folder {hookpoint!r}"
    cfg = check_expected(cfg, str(cfg_path), expected_site=expected_site, expected_d_in=expected_d_in, origin=origin)
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise SAEFormatError(f"{weights_path}: cannot read safetensors file: {e}") from None
    check_finite(tensors, str(weights_path))  # by sparsify's names (encoder.weight, ...), before they become ours
    return build_sae(cfg, _our_tensors(tensors, cfg, str(weights_path)), str(weights_path), device=device, dtype=dtype)


FORMAT = DiskFormat(
    name="sparsify",
    is_own=is_sparsify_dir,
    load=load_sparsify,
    layout=f"sparsify: {CFG_FILE} + {WEIGHTS_FILE} in a folder named after its hookpoint",
)
