"""Load the model under study: a Hugging Face directory, a GGUF file (with a cached safetensors copy), or a Hugging
Face id through the hub's cache (subject.files and subject.hub say where they are)."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autointerp.subject.files import DEFAULT_MODEL, ModelLoadError, file_digest, materialize, resolve
from autointerp.subject.sites import Layout, layout_for


def gguf_to_safetensors(gguf: Path, out: Path) -> None:
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


@dataclass
class Subject:
    """A loaded model under study with its tokenizer and architecture adapter."""

    name: str
    source: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    layout: Layout
    weights_hash: str

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers(self.model)

    @property
    def d_model(self) -> int:
        return int(self.layout.text_config(self.model).hidden_size)  # a multimodal config keeps it in text_config

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


# transformers' loading (lazy imports, meta-device initialization) is not thread-safe: one load at a time.
_LOAD_LOCK = threading.Lock()


def load_subject(spec: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: str = "float32") -> Subject:
    with _LOAD_LOCK:
        return _load_subject(spec, device, dtype)


def _load_subject(spec: str, device: str, dtype: str) -> Subject:
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
    digest = file_digest(weights[0]) if weights else ""
    return Subject(
        name=resolved.name,
        source=resolved.source or str(resolved.path),
        model=model,
        tokenizer=tok,
        layout=layout_for(model),
        weights_hash=digest,
    )
