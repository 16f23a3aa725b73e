"""`autointerp search` and the list filters on PostgreSQL: the same hits, snippets, scores and pages as on SQLite,
for the same collected and seeded rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autointerp.query.search import search
from autointerp.store import open_store
from autointerp.store.engine import Store
from autointerp.store.queries import list_features
from autointerp.store.search import Filters


def texts(result: Any) -> list[str]:
    return [h.explanation for h in result.hits]


def test_same_results_on_postgresql(
    seeded: tuple[Store, dict[str, int]], seed: Any, postgres_db: str, collect_into: Any, tmp_path: Path
) -> None:
    lite = seeded[0]
    collect_into(postgres_db, tmp_path)
    pg = open_store(postgres_db)
    seed(pg)
    cases = [
        ("tax policy", Filters()),
        ("tax", Filters(method="simulation", min_score=0.5)),
        ("tax policy", Filters(method="simulation", min_score=0.5, verdict="verified")),
        ("policies of war", Filters()),
        ("tax", Filters(explainer="tokens")),
        ("tax", Filters(method="simulation", max_score=0.5)),
        ("armed battles", Filters()),  # no word matches: semantic on both
    ]
    for query, flt in cases:
        a, b = search(lite, query, filters=flt), search(pg, query, filters=flt)
        assert (a.mode, a.fallback) == (b.mode, b.fallback), query
        assert set(texts(a)) == set(texts(b)), (query, texts(a), texts(b))
        assert {h.explanation: h.snippet for h in a.hits} == {h.explanation: h.snippet for h in b.hits}, query
        assert [(h.feature, h.scores, h.verdict) for h in sorted(a.hits, key=lambda h: h.explanation)] == [
            (h.feature, h.scores, h.verdict) for h in sorted(b.hits, key=lambda h: h.explanation)
        ]
    assert texts(search(pg, "tax policy"))[0] == "tax policy"
    assert texts(search(pg, "armed battles", semantic=True)) == texts(search(lite, "armed battles", semantic=True))
    assert [r.explanation for r in list_features(pg, verdict="verified", sort="score", limit=None)] == ["tax policy"]
    combos = [
        {"sort": "score", "limit": 4}, {"sort": "score", "limit": 3, "offset": 5}, {"sort": "score", "offset": 12},
        {"sort": "max", "min_score": 0.5}, {"sort": "score", "max_score": 0.6},
        {"sort": "index", "verdict": "verified"},
        {"sort": "score", "explainer": "tokens"}, {"sort": "score", "min_score": 0.3, "max_score": 0.7, "limit": 2},
        {"sort": "density", "explainer": "llm", "min_score": 0.4, "offset": 1}, {"sort": "score", "limit": None},
    ]  # fmt: skip
    for kw in combos:  # the same page on both, sorted by score from the stream or by a statistic then scored
        a = [(r.id, r.score, r.explanation) for r in list_features(lite, **kw)]
        assert a == [(r.id, r.score, r.explanation) for r in list_features(pg, **kw)], kw
        assert a, kw
    with pg.engine.connect() as conn:
        n = conn.exec_driver_sql("SELECT count(*) FROM feature_summary WHERE n_explanations > 0").scalar_one()
    assert n == 10
