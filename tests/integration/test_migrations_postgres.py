"""The 4 -> 5 step (ALTER TABLE run ADD COLUMN) and the 5 -> 6 step (the checkpoint table; feature.n_tokens a bigint
on PostgreSQL) on a real PostgreSQL server (tests/conftest.py starts one), each beside SQLite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import SQLModel, select

from autointerp.store import SCHEMA_VERSION, open_store
from autointerp.store.migrations import schema_drift, widen_columns
from autointerp.store.runs import start_run, worker_name
from autointerp.store.tables import Feature, Run, SchemaVersion
from autointerp.store.views import drop_query_views, ensure_views


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_v4_to_v5_on_each_backend(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest, as_schema_v4: Any
) -> None:
    """On SQLite and on a real PostgreSQL server (tests/conftest.py starts one)."""
    for url in [f"sqlite:///{tmp_path}/m.sqlite" if backend == "sqlite" else request.getfixturevalue("postgres_db")]:
        store = open_store(url)
        with store.engine.begin() as conn:
            drop_query_views(conn)  # they read the tables (PostgreSQL refuses to drop those under a view)
        SQLModel.metadata.drop_all(store.engine)
        store.engine.dispose()
        as_schema_v4(url)
        store = open_store(url)
        assert schema_drift(store.engine) == []
        with store.session() as s:
            assert s.exec(select(SchemaVersion)).one().version == SCHEMA_VERSION
            (run,) = s.exec(select(Run)).all()
        assert run.key == "k" and run.worker is None and run.heartbeat_at is None
        run_id = start_run(store, "score", {}, total=2)
        with store.session() as s:
            new = s.get(Run, run_id)
        assert new is not None and new.worker == worker_name()
        if url.startswith("postgres"):
            with store.engine.begin() as conn:
                drop_query_views(conn)
            SQLModel.metadata.drop_all(store.engine)
        store.engine.dispose()


def _as_v5(url: str) -> None:
    """Today's schema made into version 5's: no checkpoint table, feature.n_tokens a 32-bit integer (PostgreSQL),
    and a feature row."""
    from autointerp.store.tables import Corpus, SubjectModel

    store = open_store(url)
    with store.session() as s:
        s.add(SubjectModel(id="m", family="gpt2", source="x", n_layers=1, d_model=4))
        s.add(Corpus(id="c", name="c", source="c", tokenizer="m", ctx_len=4, bos_token_id=1, n_docs=1, n_contexts=1,
                     seed=0))  # fmt: skip
        s.commit()
        s.add(Feature(key="m/s/neurons/0", model_id="m", site="s", source="neurons", index=0, max_act=1.5,
                      n_tokens=2**31 - 1, corpus_id="c"))  # fmt: skip
        s.commit()
    with store.engine.begin() as conn:
        conn.execute(text("DROP TABLE checkpoint"))
        if conn.dialect.name == "postgresql":  # a v5 database searched once has the views, which read n_tokens
            drop_query_views(conn)
            conn.execute(text("ALTER TABLE feature ALTER COLUMN n_tokens TYPE integer"))
            ensure_views(conn)
        conn.execute(text("UPDATE schema_version SET version = 5"))
    store.engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_v5_to_v6_on_each_backend(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    url = f"sqlite:///{tmp_path}/m.sqlite" if backend == "sqlite" else request.getfixturevalue("postgres_db")
    _as_v5(url)
    store = open_store(url)
    assert schema_drift(store.engine) == []
    with store.session() as s:
        assert s.exec(select(SchemaVersion)).one().version == SCHEMA_VERSION
        (f,) = s.exec(select(Feature)).all()
        assert (f.key, f.n_tokens, f.max_act) == ("m/s/neurons/0", 2**31 - 1, 1.5)
        f.n_tokens = 2**31 + 5  # past the 32-bit integer PostgreSQL had
        s.add(f)
        s.commit()
    with store.session() as s:
        assert s.exec(select(Feature)).one().n_tokens == 2**31 + 5
    with store.engine.begin() as conn:  # a second look finds nothing to change
        assert widen_columns(conn, Feature.__table__, ("n_tokens",)) == []  # type: ignore[attr-defined]
    store.engine.dispose()


def test_widen_columns_changes_postgresql_only(tmp_path: Path, postgres_db: str) -> None:
    for url in (f"sqlite:///{tmp_path}/m.sqlite", postgres_db):
        _as_v5(url)
        from sqlalchemy import create_engine

        engine = create_engine(url)
        with engine.begin() as conn:
            changed = widen_columns(conn, Feature.__table__, ("n_tokens",))  # type: ignore[attr-defined]
        assert changed == ([] if url.startswith("sqlite") else ["n_tokens"])
        engine.dispose()
