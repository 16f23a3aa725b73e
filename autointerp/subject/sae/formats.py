"""The on-disk formats we read, and the entry points that pick one: `load_sae` for one SAE directory, `sae_dirs` /
`load_saes` for a folder of several (a sparsify run: one subfolder per hookpoint), `stable_id`.

Detection: each format's `is_own` looks at the directory's file names (SAELens: sae_weights.safetensors, sparsify:
sae.safetensors, Gemma Scope: params.npz, Gemma Scope 2: params.safetensors, circuit-tracer: config.yaml); exactly
one may claim it. A format with `parts` (circuit-tracer) holds one SAE or transcoder per layer in one directory:
`load_sae` picks one by its read site (expected_site), `load_saes` and `sae_parts` give them all. A directory no
format claims is either a folder of SAEs (its subfolders, or their `seedN` subfolders, are claimed), which load_sae
refuses with the list, or a broken SAE, which the default format's loader diagnoses (missing cfg.json or weights).
Adding a format: a module with its `FORMAT` and its entry in FORMATS.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch

from autointerp.subject.sae import circuit_tracer, gemmascope, gemmascope2, saelens, sparsify
from autointerp.subject.sae.config import SAEConfig, SAEFormatError
from autointerp.subject.sae.module import SAE
from autointerp.subject.sae.specs import DiskFormat

FORMATS: dict[str, DiskFormat] = {
    saelens.FORMAT.name: saelens.FORMAT,
    sparsify.FORMAT.name: sparsify.FORMAT,
    gemmascope.FORMAT.name: gemmascope.FORMAT,
    gemmascope2.FORMAT.name: gemmascope2.FORMAT,
    circuit_tracer.FORMAT.name: circuit_tracer.FORMAT,
}
DEFAULT_FORMAT = saelens.FORMAT.name


def _owners(root: Path) -> list[DiskFormat]:
    return [f for f in FORMATS.values() if f.is_own(root)]


def _natural(p: Path) -> list[str | int]:
    # layers.2 before layers.10, as sparsify orders its hookpoints.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _subdirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir()), key=_natural)


def _inner_saes(root: Path) -> list[Path]:
    """SAE directories one level below `root`, or two for sparsify's `hookpoint/seedN` layout. Not deeper: a
    sparsify run's `best/` holds a second copy of the same hookpoints."""
    found = []
    for child in _subdirs(root):
        if _owners(child):
            found.append(child)
        else:
            found += [g for g in _subdirs(child) if sparsify.SEED_DIR.match(g.name) and _owners(g)]
    return found


def format_of(root: Path) -> DiskFormat:
    """The format of SAE directory `root` (see the module docstring)."""
    owners = _owners(root)
    if len(owners) > 1:
        raise SAEFormatError(f"{root}: ambiguous SAE directory, it holds the files of {[f.layout for f in owners]}")
    if owners:
        return owners[0]
    inner = _inner_saes(root) if root.is_dir() else []
    if inner:
        listed = ", ".join(str(p.relative_to(root)) for p in inner[:8]) + (", ..." if len(inner) > 8 else "")
        raise SAEFormatError(
            f"{root}: a folder of {len(inner)} SAEs ({listed}), not one SAE; load one of them, or all with load_saes"
        )
    return FORMATS[DEFAULT_FORMAT]


def load_sae(
    path: str | os.PathLike[str],
    *,
    expected_d_in: int | None = None,
    expected_site: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    family: str | None = None,
) -> SAE:
    """Load and validate one SAE (or transcoder) directory of any format in FORMATS; every problem raises
    SAEFormatError naming the file. `expected_site` is checked against the SAE's own (read) site, or gives it one,
    and picks the part of a directory of several; `expected_d_in` is checked against d_in. `family` (the model's
    config.model_type) maps Hugging Face module paths in cfg files (Gemma Scope 2) to sites."""
    root = Path(path)
    if not root.is_dir():
        layouts = "; ".join(f.layout for f in FORMATS.values())
        raise SAEFormatError(f"{root}: not a directory (expected an SAE directory: {layouts})")
    return format_of(root).load(
        root, expected_d_in=expected_d_in, expected_site=expected_site, device=device, dtype=dtype, family=family
    )


def sae_parts(root: Path, family: str | None = None) -> list[str] | None:
    """The read sites of the parts of a directory that holds one SAE or transcoder per layer (circuit-tracer);
    None for a directory that is one SAE."""
    if not root.is_dir():
        return None
    owners = _owners(root)
    fmt = owners[0] if len(owners) == 1 else None
    return fmt.parts(root, family) if fmt is not None and fmt.parts is not None else None


def sae_dirs(path: str | os.PathLike[str]) -> list[Path]:
    """The SAE directories `path` stands for: the SAEs of a folder of several (natural order), else `path` itself
    (also when it is no SAE at all, so that load_sae then says what is wrong with it)."""
    root = Path(path)
    if not root.is_dir() or _owners(root):
        return [root]
    return _inner_saes(root) or [root]


def load_saes(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    family: str | None = None,
) -> list[tuple[Path, SAE]]:
    """Every SAE under `path` (see sae_dirs; each part of a per-layer set) with its directory; each carries its own
    site in `cfg.site`."""
    out = []
    for p in sae_dirs(path):
        sites = sae_parts(p, family)
        for site in sites if sites is not None else [None]:
            out.append((p, load_sae(p, expected_site=site, device=device, dtype=dtype, family=family)))
    return out


# Transcoder fields left out of the content id at their defaults, so that every SAE keeps the id it had before
# transcoders existed.
_TRANSCODER_DEFAULTS = {
    f: getattr(SAEConfig(d_in=1, d_sae=1, architecture="relu"), f) for f in ("write_sites", "d_out", "skip")
}


def stable_id(sae_or_path: SAE | str | os.PathLike[str]) -> str:
    """Short content hash of the encoding-relevant cfg and the float32 weights.

    A directory and the SAE loaded from it get the same id; provenance-only cfg fields do not count.
    """
    sae = sae_or_path if isinstance(sae_or_path, SAE) else load_sae(sae_or_path)
    semantic = {
        k: v
        for k, v in asdict(sae.cfg).items()
        if k != "raw" and not (k in _TRANSCODER_DEFAULTS and v == _TRANSCODER_DEFAULTS[k])
    }
    h = hashlib.sha256(json.dumps(semantic, sort_keys=True).encode())
    for name, t in saelens.state_dict32(sae).items():
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]
