"""Readable per-token strings: BPE artefacts (Ġ, Ċ, byte tokens) decoded, multi-byte characters kept whole.

Byte-level BPE tokens (GPT-2, Llama 3, SmolLM) are mapped back to their bytes; a UTF-8 character split across
tokens is shown on the token that completes it (the earlier pieces show as empty strings), so the strings of a
context concatenate to exactly its decoded text. SentencePiece tokens use '▁' for spaces and <0xNN> for bytes.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    # The byte <-> printable-character table of byte-level BPE (printable bytes map to themselves).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


@lru_cache(maxsize=1 << 17)  # a vocabulary's worth: pages of records decode the same pieces again and again
def _token_bytes(piece: str, special: bool) -> bytes:
    if special:
        return piece.encode()
    m = _BYTE_TOKEN.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    table = _byte_decoder()
    if piece and all(ch in table for ch in piece) and "▁" not in piece:
        return bytes(table[ch] for ch in piece)
    return piece.replace("▁", " ").encode()


def token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    pieces = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [dec.decode(_token_bytes(p, p in special)) for p in pieces]


class FastTokenizer:
    """The part of a tokenizer that `token_strings` needs, read from a tokenizer.json with the `tokenizers`
    library: decoding stored contexts then imports neither torch nor transformers. Its strings equal those of
    transformers' tokenizer for the same file (tested over SmolLM2's whole vocabulary)."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        added = self._tok.get_added_tokens_decoder().values()
        self.all_special_tokens = sorted(t.content for t in added if t.special)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.id_to_token(int(i)) or "" for i in ids]

    def __len__(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def count(self, text: str) -> int:
        """Tokens of a text (no special tokens added): what a dry run counts prompts with."""
        return len(self._tok.encode(text, add_special_tokens=False).ids)
