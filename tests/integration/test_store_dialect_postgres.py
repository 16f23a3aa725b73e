"""The writes of the intervene stage through the shared upsert, on a real PostgreSQL server and on in-memory SQLite:
a failed intervention is replaced, an ok one wins, a verdict follows its evidence, text PostgreSQL cannot hold is
stored as it can."""

from __future__ import annotations

import pytest

from autointerp.store import open_store
from autointerp.store.engine import Store
from autointerp.store.tables import InterventionRow, SubjectModel, Verdict
from autointerp.store.writes import FeatureRow, upsert_model, write_features


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    return "sqlite://" if request.param == "sqlite" else str(request.getfixturevalue("postgres_db"))


def _one_feature(url: str) -> tuple[Store, int]:
    from autointerp.store.queries import resolve_feature
    from autointerp.store.tables import Corpus

    store = open_store(url)
    model = SubjectModel(id="m", family="llama", source="x", n_layers=2, d_model=8)
    upsert_model(store, model, {"blocks.0.mlp.post": 4})
    with store.session() as s:
        s.add(Corpus(id="c", name="c", source="c", tokenizer="m", ctx_len=4, bos_token_id=1, n_docs=1, n_contexts=0,
                     seed=0))  # fmt: skip
        s.commit()
    write_features(store, [FeatureRow("m", "blocks.0.mlp.post", "neurons", 1, "ok", 1.0, 0.0, 0.5, 10, {}, "c", None)])
    fid = resolve_feature(store, "neurons/1").id
    assert fid is not None
    return store, fid


def test_intervention_and_verdict_writes_are_upserts(db_url: str) -> None:
    """An intervention: a failed row is replaced, an ok one wins; a verdict follows its evidence, and the same
    verdict again keeps its time. Text PostgreSQL cannot hold (NUL) is stored as it can, as for every upsert."""
    from autointerp.store.explanations import write_explanations
    from autointerp.store.interventions import interventions_of, write_intervention, write_verdict
    from autointerp.store.tables import Explanation

    store, fid = _one_feature(db_url)
    iv = dict(feature_id=fid, mode="add", config_hash="h")
    failed = write_intervention(store, InterventionRow(**iv, status="failed", error="judge said a\x00b"))
    assert failed.error == ("judge said a\ufffdb" if store.dialect.postgresql else "judge said a\x00b")
    ok = write_intervention(store, InterventionRow(**iv, status="ok", strength=2.0))
    assert ok.id == failed.id and ok.status == "ok" and ok.error is None
    again = write_intervention(store, InterventionRow(**iv, status="failed", error="later"))
    assert again.status == "ok" and interventions_of(store, [fid], "h")[fid].strength == 2.0

    write_explanations(store, [Explanation(feature_id=fid, explainer="tokens", model="", prompt="", prompt_hash="h",
                                           config_hash="c", status="ok", text="t")])  # fmt: skip
    with store.session() as s:
        eid = s.exec(Explanation.__table__.select()).first().id  # type: ignore[attr-defined, union-attr]
    v = dict(explanation_id=eid, feature_id=fid, config_hash="v")
    first = write_verdict(store, Verdict(**v, verdict="unverified", reason="x"))
    same = write_verdict(store, Verdict(**v, verdict="unverified", reason="x"))
    assert same.id == first.id and same.created_at == first.created_at
    changed = write_verdict(store, Verdict(**v, verdict="verified", reason="y\x00"))
    assert changed.id == first.id and changed.verdict == "verified" and changed.created_at > first.created_at
    with store.session() as s:
        assert len(s.exec(Verdict.__table__.select()).all()) == 1  # type: ignore[attr-defined]
