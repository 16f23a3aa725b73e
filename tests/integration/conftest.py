"""Fixtures of the integration tests: llama.cpp's server, and the small collection the crash tests kill and resume
(on SQLite and on PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def llama_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama.cpp's OpenAI-compatible server (llama-cpp-python[server], installed by `make test`) serving the shipped
    SmolLM2 GGUF on 127.0.0.1, started once for every test that needs it."""
    from autointerp.llm.llamacpp import ServerError, llama_server
    from autointerp.subject.files import _smollm2_gguf

    log = tmp_path_factory.mktemp("llama") / "server.log"
    try:
        with llama_server(_smollm2_gguf(), log=log) as url:
            yield url
    except ServerError as exc:  # not installed or did not start: a failure, not a skip
        pytest.fail(str(exc))


@dataclass(frozen=True)
class CrashCollection:
    """A small collection of a tiny GPT-2 over a corpus of 12 documents, collected once uninterrupted into
    `reference_db` (SQLite) in `n_batches` batches; a checkpoint every `checkpoint_every` batches."""

    corpus: Path
    model: Path
    reference_db: Path
    n_batches: int
    batch: int = 4
    ctx_len: int = 16
    checkpoint_every: int = 5  # batches per checkpoint: checkpoint_tokens / (batch * ctx_len)

    def config(self, dir: Path, db: str | None = None) -> Path:
        """The collection's config in `dir` (its database there too, unless `db` names another)."""
        return _crash_config(dir, self.corpus, self.model, db, self.batch, self.ctx_len, self.checkpoint_every)

    @staticmethod
    def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
        """Two dumps of a collection are the same: exactly, but for the float statistics. A resumed pass adds the same
        activations to its running sums in another grouping (the checkpoint's sum, then the rest), so they may part
        in the last digits (seen once: a mean at the 8th significant digit); they are compared to a relative
        tolerance of 1e-6. Everything chosen or counted (records, selections, densities, histograms) is exact."""
        assert {k: v for k, v in got.items() if k != "statistics"} == {
            k: v for k, v in want.items() if k != "statistics"
        }
        assert [row[0] for row in got["statistics"]] == [row[0] for row in want["statistics"]]
        for g, w in zip(got["statistics"], want["statistics"], strict=True):
            assert g[1:] == pytest.approx(w[1:], rel=1e-6, abs=1e-12), g[0]


def _crash_config(
    dir: Path, corpus: Path, model: Path, db: str | None, batch: int, ctx_len: int, checkpoint_every: int
) -> Path:
    dir.mkdir()
    cfg = dir / "cfg.toml"
    cfg.write_text(
        f"""db = "{db or f"sqlite:///{dir}/db.sqlite"}"
[model]
name = "{model}"
[corpus]
source = "{corpus}"
ctx_len = {ctx_len}
max_tokens = 3000
[collect]
sites = ["blocks.1.mlp.post"]
batch_size = {batch}
top_k = 6
n_quantiles = 3
per_quantile = 2
n_random = 3
checkpoint_tokens = {checkpoint_every * batch * ctx_len}
write_batch_features = 16
"""
    )
    return cfg


@pytest.fixture(scope="session")
def crash_collection(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path) -> CrashCollection:
    """The crash tests' collection, its uninterrupted run done once per session."""
    from autointerp.collect.run import run_collect
    from autointerp.config import load_config
    from autointerp.store import open_store

    root = tmp_path_factory.mktemp("crash")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"d{i}.txt").write_text(f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(200)))
    c = CrashCollection(corpus, tiny_gpt2_dir, root / "ref" / "db.sqlite", 0)
    cfg = load_config(c.config(root / "ref"))
    summary = run_collect(cfg, open_store(cfg.db))
    n_batches = -(-summary.n_tokens // ((c.ctx_len - 2) * c.batch))
    assert n_batches > 3 * c.checkpoint_every
    return CrashCollection(corpus, tiny_gpt2_dir, c.reference_db, n_batches)


def _collection_rows(url: str) -> dict[str, Any]:
    """What a collection writes, by natural keys, alike on both databases (JSON compared as values)."""
    import json

    from sqlalchemy import text

    from autointerp.store import open_store

    q = {
        "features": "select key, status, density, n_tokens, histogram, max_act, mean_act from feature order by 1",
        "records": "select f.key, c.idx, r.role, r.split, r.rank, r.bin, r.max_act, r.acts from record r "
        "join feature f on f.id = r.feature_id join context c on c.id = r.context_id order by 1, 2",
    }
    store = open_store(url)
    try:
        with store.engine.connect() as conn:
            out = {k: [tuple(r) for r in conn.execute(text(v))] for k, v in q.items()}
    finally:
        store.engine.dispose()
    out["features"] = [(*r[:4], json.loads(r[4]) if isinstance(r[4], str) else r[4], *r[5:]) for r in out["features"]]
    out["records"] = [(*r[:-1], bytes(r[-1])) for r in out["records"]]
    return out


@pytest.fixture(scope="session")
def collection_rows() -> Any:
    """url -> what a collection writes, by natural keys (the sharded and Ray tests compare it with the single pass)."""
    return _collection_rows


@pytest.fixture(scope="session")
def reference(crash_collection: CrashCollection) -> dict[str, Any]:
    """What the single uninterrupted pass of crash_collection wrote."""
    return _collection_rows(f"sqlite:///{crash_collection.reference_db}")
