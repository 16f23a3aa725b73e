"""The numpy all-MiniLM-L6-v2 (semantic search's encoder) against the torch Embedder the embedding scorer uses, and
the explanations' embeddings: computed once, only for the new rows."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest

from autointerp.query.embeddings import matrix, nearest, update_embeddings
from autointerp.query.encoder import EncoderError, NumpyEncoder, gelu
from autointerp.store import open_store
from autointerp.store.embeddings import read_embeddings
from autointerp.store.search import Filters

VARIED = [
    "tax policy",
    "",
    "The Senate passed the TAX bill on 12 March 1862.",
    "a b c " * 300,  # past 256 tokens: truncated the same way
    "Our nation's café owners pay 12 per cent!",
    "naïve résumé, 日本語のテキスト and 🙂 emoji",
    "  spaces   and\ttabs\nnewlines  ",
    "x",
    'the tokens "neither", "nor" and "no"',
    "[CLS] literal [SEP] special [PAD] tokens [UNK]",
    "def f(x): return x ** 2  # code",
    "ALL CAPS SHOUTING",
    "hyphen-ated words, e-mail and U.S.A.",
    "ﬁ ligature and ⅷ numeral",
]


def test_gelu_is_the_exact_one() -> None:
    x = np.linspace(-12, 12, 20001).astype(np.float32)
    want = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
    assert np.abs(gelu(x.copy()) - want).max() < 1e-6


@pytest.fixture(scope="module")
def numpy_encoder() -> NumpyEncoder:
    return NumpyEncoder(batch_size=3)  # small batches: rows of different lengths share one, padded


def test_equals_the_torch_embedder(numpy_encoder: NumpyEncoder) -> None:
    from autointerp.score.embed import Embedder

    torch_embedder = Embedder(batch_size=5)
    ours, theirs = numpy_encoder.encode(VARIED), torch_embedder.encode(VARIED)
    assert ours.shape == theirs.shape == (len(VARIED), 384) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    # the same token ids as transformers' tokenizer with the Embedder's settings
    ids = torch_embedder._tokenizer(VARIED, truncation=True, max_length=256)["input_ids"]
    assert [e.ids for e in numpy_encoder._tok.encode_batch(VARIED)] == [list(i) for i in ids]
    assert numpy_encoder.name == torch_embedder.name == "all-minilm-l6-v2"


def test_rows_do_not_depend_on_the_batch(numpy_encoder: NumpyEncoder) -> None:
    alone = np.stack([numpy_encoder.encode([t])[0] for t in VARIED[:6]])
    assert np.abs(alone - numpy_encoder.encode(VARIED[:6])).max() < 1e-6
    assert numpy_encoder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="not a single string"):
        numpy_encoder.encode("tax")  # type: ignore[arg-type]


def test_missing_model_files_are_named(tmp_path: Any) -> None:
    with pytest.raises(EncoderError, match="cannot load the embedding model"):
        NumpyEncoder(tmp_path).encode(["x"])


def test_encoding_imports_no_torch() -> None:
    code = (
        "import sys; from autointerp.query.encoder import NumpyEncoder; v = NumpyEncoder().encode(['tax']); "
        "assert v.shape == (1, 384); assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


class Counting:
    """The numpy encoder, counting what it is asked to embed."""

    def __init__(self) -> None:
        self.inner = NumpyEncoder()
        self.seen: list[str] = []

    @property
    def name(self) -> str:
        return self.inner.name

    def encode(self, texts: list[str]) -> np.ndarray:
        self.seen += texts
        return self.inner.encode(texts)


def test_a_second_explain_embeds_only_its_new_rows(collected_db: str) -> None:
    from autointerp.config import load_config
    from autointerp.explain.run import run_explain

    over: dict[str, Any] = {"db": collected_db, "explain.explainer": "tokens", "explain.min_examples": 1}
    store = open_store(collected_db)
    enc = Counting()
    run_explain(load_config(None, over | {"explain.limit": 5}), store)
    first = update_embeddings(store, enc)
    ids1, vecs1 = read_embeddings(store, enc.name)
    n_texts = len(enc.seen)
    assert first == len(ids1) > 0 and 0 < n_texts <= first  # identical texts are encoded once
    assert update_embeddings(store, enc) == 0 and len(enc.seen) == n_texts  # nothing new: no encoding
    run_explain(load_config(None, over | {"explain.limit": 12}), store)
    second = update_embeddings(store, enc)
    ids2, vecs2 = read_embeddings(store, enc.name)
    assert second == len(ids2) - len(ids1) > 0
    assert len(enc.seen) - n_texts <= second  # only the new rows' texts were encoded
    old = np.isin(ids2, ids1)
    assert (vecs2[old] == vecs1).all()  # the first rows' vectors were not rewritten
    with store.engine.connect() as conn:
        texts = dict(conn.exec_driver_sql("SELECT id, text FROM explanation WHERE status = 'ok'").all())
    np.testing.assert_allclose(vecs2, enc.inner.encode([texts[i] for i in ids2]), atol=1e-3)  # float16 copies
    # the cached matrix follows the table: extended with the new rows, not read again
    m = matrix(store, enc.name)
    assert m.ids.tolist() == ids2.tolist()
    hits, unseen = nearest(store, texts[int(ids2[-1])], Filters(), 1, enc)
    assert unseen == 0
    assert hits[0][0] == int(ids2[-1]) or texts[hits[0][0]] == texts[int(ids2[-1])]
    assert hits[0][1] > 0.99


class Spy:
    """A fake encoder (unit vectors from a hash of the text) that records every call; thread-safe."""

    name = "spy"

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.delay, self.fail = delay, fail
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            self.calls.append(list(texts))
        time.sleep(self.delay)  # an encoder takes time: concurrent callers overlap
        if self.fail:
            raise RuntimeError("encoder down")
        out = np.array([list(hashlib.sha256(t.encode()).digest()[:16]) for t in texts], np.float32).reshape(-1, 16)
        return (out + 1) / np.linalg.norm(out + 1, axis=1, keepdims=True)

    def encoded(self, *, but: str = "") -> Counter[str]:
        return Counter(t for call in self.calls for t in call if t != but)


@pytest.fixture()
def seeded_store(seeded: Any) -> Any:
    return seeded[0]


def _add_explanations(store: Any, texts: list[str]) -> None:
    from autointerp.store.explanations import write_explanations
    from autointerp.store.tables import Explanation, Feature

    with store.session() as s:
        fid = s.exec(Feature.__table__.select().limit(1)).first().id  # type: ignore[attr-defined]
    write_explanations(store, [Explanation(feature_id=fid, explainer="llm", model="fake:job", prompt="p",
                                           prompt_hash="h", config_hash=f"c{k}", status="ok", text=t)
                               for k, t in enumerate(texts)])  # fmt: skip


def test_concurrent_searches_embed_each_new_explanation_once(seeded_store: Any) -> None:
    """A job added explanations; then several searches at once (the review page's threads): one backfill embeds
    each new explanation once while the others wait or search what is there, never once per request."""
    from concurrent.futures import ThreadPoolExecutor

    from autointerp.query.search import search

    store = seeded_store
    spy = Spy()
    update_embeddings(store, spy)
    new = [f"new topic number {k}" for k in range(40)]
    _add_explanations(store, new)
    spy.calls.clear()
    spy.delay = 0.05
    n = 6
    barrier = threading.Barrier(n)

    def one(_k: int) -> Any:
        barrier.wait()
        return search(store, "tax", semantic=True, limit=5, encoder=spy)

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    assert all(r.mode == "semantic" for r in results)
    assert spy.encoded(but="tax") == Counter(new)  # each new explanation exactly once, nothing old again
    assert spy.encoded()["tax"] == n  # the queries themselves
    assert len(matrix(store, spy.name).ids) == 12 + len(new)


def test_a_claimed_row_is_left_to_its_claimer(seeded_store: Any) -> None:
    """Across processes: rows another backfill claimed are not embedded again; its claim, when its process died,
    is taken over after CLAIM_TTL; a failed encoder gives its claims back."""
    from sqlalchemy import text

    from autointerp.store.embeddings import CLAIM_TTL, claim_unembedded
    from autointerp.store.tables import utcnow

    store = seeded_store
    spy = Spy()
    other = claim_unembedded(store, spy.name, 3)  # what another process is embedding now
    assert len(other) == 3
    assert update_embeddings(store, spy) == 12 - 3
    assert not set(spy.encoded()) & {t for _i, t in other}
    assert set(matrix(store, spy.name).ids.tolist()).isdisjoint(i for i, _t in other)  # claims are not vectors
    assert update_embeddings(store, spy) == 0  # live claims count as done
    with store.engine.begin() as conn:  # the other process died long ago
        conn.execute(text("UPDATE explanation_embedding SET created_at = :t WHERE dim = 0"),
                     {"t": utcnow() - CLAIM_TTL * 2})  # fmt: skip
    assert update_embeddings(store, spy) == 3
    assert spy.encoded() == ok_texts(store) and len(matrix(store, spy.name).ids) == 12
    _add_explanations(store, ["one more"])
    with pytest.raises(RuntimeError, match="encoder down"):
        update_embeddings(store, Spy(fail=True))
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM explanation_embedding WHERE dim = 0").scalar() == 0
    assert update_embeddings(store, spy) == 1


def ok_texts(store: Any) -> Counter[str]:
    with store.engine.connect() as conn:
        return Counter(str(r[0]) for r in conn.exec_driver_sql("SELECT text FROM explanation WHERE status = 'ok'"))
