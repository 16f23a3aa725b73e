"""Readable token strings on the real SmolLM2 tokenizer: no BPE artefacts, multi-byte characters kept whole."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autointerp.subject.tokens import token_strings


@pytest.fixture(scope="module")
def tok(smol_tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


def test_artefacts_decoded(tok) -> None:  # type: ignore[no-untyped-def]
    text = "Hello world\n\tthe nation's café — 日本 🇺🇸!"
    ids = tok(text, add_special_tokens=False).input_ids
    pieces = token_strings(tok, ids)
    assert "".join(pieces) == text
    assert "\n" in pieces and "\t" in pieces and " café" in pieces
    assert not any(("Ġ" in p or "Ċ" in p or "Ã" in p) for p in pieces)
    assert token_strings(tok, [tok.bos_token_id]) == [tok.bos_token]


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40))
def test_concatenation_is_the_text(tok, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tok(text, add_special_tokens=False).input_ids
    assert "".join(token_strings(tok, ids)) == tok.decode(ids)
