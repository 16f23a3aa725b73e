"""`autointerp search` and the list filters on a small real database (tiny-GPT-2 neurons collected by the real
collector, with explanations, scores and verdicts written through the store), on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from autointerp.query.search import search
from autointerp.store import open_store
from autointerp.store.engine import Store
from autointerp.store.explanations import write_explanations
from autointerp.store.queries import list_features
from autointerp.store.search import Filters, QueryError, ensure_query_schema, forget_query_schema, terms
from autointerp.store.tables import Explanation


def texts(result: Any) -> list[str]:
    return [h.explanation for h in result.hits]


def test_terms_drop_stop_words_and_repeats() -> None:
    assert terms("The Tax, the TAX and tax_policy!") == ["tax", "policy"]
    assert terms("the and of") == []


def test_exact_match_first_with_marked_snippet(seeded: tuple[Store, dict[str, int]]) -> None:
    store, _ids = seeded
    res = search(store, "tax policy")
    assert res.mode == "fulltext" and not res.fallback
    assert texts(res)[0] == "tax policy"
    assert res.hits[0].snippet == "<<tax>> <<policy>>"
    # any word, stemmed: taxes -> tax; "taxation" stems to another word; failed rows are not searched
    assert set(texts(res)) == {
        "tax policy", "taxes and tariffs on imported goods", "the word tax in budget debates",
        "foreign policy and diplomacy", 'the tokens "tax" and "taxes"',
    }  # fmt: skip
    tariffs = next(h for h in res.hits if h.explanation.startswith("taxes"))
    assert tariffs.snippet == "<<taxes>> and tariffs on imported goods"
    assert tariffs.scores == {"simulation": 0.6, "detection": 0.4} and tariffs.verdict == "unverified"
    assert res.hits[0].feature.endswith("/neurons/0") or "/neurons/" in res.hits[0].feature


def test_filters_combine(seeded: tuple[Store, dict[str, int]]) -> None:
    store, _ids = seeded
    good = Filters(method="simulation", min_score=0.5)
    assert set(texts(search(store, "tax policy", filters=good))) == {
        "tax policy", "taxes and tariffs on imported goods", "foreign policy and diplomacy",
    }  # fmt: skip
    both = Filters(method="simulation", min_score=0.5, verdict="verified")
    assert texts(search(store, "tax policy", filters=both)) == ["tax policy"]  # the tariffs one's latest: unverified
    assert texts(search(store, "tax", filters=Filters(explainer="tokens"))) == ['the tokens "tax" and "taxes"']
    low = Filters(method="simulation", max_score=0.5)
    assert set(texts(search(store, "tax", filters=low))) == {
        "the word tax in budget debates",
        'the tokens "tax" and "taxes"',
    }
    assert texts(search(store, "tax policy", filters=Filters(verdict="contradicted"))) == [
        "foreign policy and diplomacy"
    ]
    det = Filters(method="detection", min_score=0.5)
    assert texts(search(store, "tax", filters=det)) == ["tax policy"]
    site = search(store, "tax", filters=Filters(site="blocks.1.mlp.post", source="neurons"))
    assert len(site.hits) == 3 + 1
    nowhere = search(store, "tax", filters=Filters(site="blocks.9.mlp.post"))
    assert nowhere.hits == [] and nowhere.mode == "semantic" and nowhere.fallback
    assert search(store, "tax", filters=Filters(reviewed=True)).hits == []  # nothing reviewed yet
    assert len(search(store, "tax", filters=Filters(reviewed=False)).hits) == 4
    assert len(search(store, "tax", limit=2).hits) == 2


def test_semantic_search_and_fallback(seeded: tuple[Store, dict[str, int]]) -> None:
    store, _ids = seeded
    res = search(store, "finance and levies", limit=3)  # no explanation holds these words
    assert res.mode == "semantic" and res.fallback
    assert {"money, taxation and government revenue", "tax policy"} & set(texts(res))
    sem = search(store, "armed battles", semantic=True, limit=2)
    assert sem.mode == "semantic" and not sem.fallback
    assert texts(sem)[0] == "war and military conflict"
    assert sem.hits[0].relevance > sem.hits[1].relevance
    verified = search(store, "armed battles", semantic=True, filters=Filters(verdict="verified"))
    assert set(texts(verified)) == {"tax policy", 'the tokens "tax" and "taxes"'}


@pytest.mark.parametrize(
    ("query", "flt", "message"),
    [
        ("  ", Filters(), "empty query"),
        ("tax", Filters(method="vibes", min_score=0.1), "unknown score method 'vibes'"),
        ("tax", Filters(verdict="maybe"), "unknown verdict 'maybe'"),
        ("tax", Filters(min_score=0.8, max_score=0.2), "minimum 0.8 is above the maximum 0.2"),
    ],
)
def test_bad_queries_are_clear_errors(
    seeded: tuple[Store, dict[str, int]], query: str, flt: Filters, message: str
) -> None:
    with pytest.raises(QueryError, match=message):
        search(seeded[0], query, filters=flt)


def test_a_database_without_explanations_says_so(collected_db: str) -> None:
    with pytest.raises(QueryError, match="no explanations to search yet"):
        search(open_store(collected_db), "tax")


def test_the_index_follows_every_write(seeded: tuple[Store, dict[str, int]]) -> None:
    store, ids = seeded
    assert search(store, "collectors").mode == "semantic"  # no such word yet
    with store.session() as s:
        failed = s.exec(Explanation.__table__.select().where(Explanation.__table__.c.status == "failed")).one()  # type: ignore[attr-defined]
    retried = Explanation(feature_id=failed.feature_id, explainer="llm", model="fake:scripted", prompt="p",
                          prompt_hash="h", config_hash="c", status="ok", text="tax collectors")  # fmt: skip
    write_explanations(store, [retried])  # the retried failure becomes ok: an UPDATE of the row
    assert texts(search(store, "collectors")) == ["tax collectors"]
    added = Explanation(feature_id=failed.feature_id, explainer="tokens", model="", prompt="", prompt_hash="",
                        config_hash="c", status="ok", text="the tokens \"collectors\"")  # fmt: skip
    write_explanations(store, [added])  # a new row: an INSERT
    assert len(search(store, "collectors").hits) == 2
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"DELETE FROM score WHERE explanation_id = {ids['tax policy']}")
        conn.exec_driver_sql(f"DELETE FROM verdict WHERE explanation_id = {ids['tax policy']}")
        conn.exec_driver_sql(f"DELETE FROM explanation WHERE id = {ids['tax policy']}")
    assert "tax policy" not in texts(search(store, "tax policy"))
    if store.engine.dialect.name == "sqlite":  # the external-content index agrees with its table
        with store.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO explanation_fts(explanation_fts, rank) VALUES ('integrity-check', 1)")


def test_schema_is_idempotent_and_backfills(collected_db: str, seed: Any) -> None:
    store = open_store(collected_db)
    ids = seed(store)  # written before the index exists
    ensure_query_schema(store)
    forget_query_schema(store)
    ensure_query_schema(store)  # a second time finds everything there
    assert texts(search(store, "diplomacy")) == ["foreign policy and diplomacy"]
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT feature, verdict, simulation FROM feature_summary WHERE n_explanations > 0")
        summary = {r[0]: (r[1], r[2]) for r in rows}
        per = conn.exec_driver_sql(
            "SELECT explanation, method, scorer, value, verdict FROM explanation_scores "
            "WHERE explanation = 'tax policy'"
        ).all()
    assert len(summary) == 10
    assert sorted(per) == [
        ("tax policy", "detection", "s1", 0.9, "verified"),
        ("tax policy", "simulation", "s1", 0.8, "verified"),
    ]
    assert ids


def test_features_list_filters(seeded: tuple[Store, dict[str, int]]) -> None:
    store, _ids = seeded
    verified = list_features(store, verdict="verified", sort="score", limit=None)
    assert [r.explanation for r in verified] == ["tax policy"]  # feature 0: its verified explanations' best
    tokens = list_features(store, explainer="tokens", sort="score", limit=None)
    assert len(tokens) == 2 and tokens[0].score == 0.2
    ranged = list_features(store, min_score=0.5, max_score=0.75, sort="score", limit=None)
    assert [r.score for r in ranged] == [0.7, 0.6, 0.55]
    with pytest.raises(QueryError, match="unknown verdict"):
        list_features(store, verdict="sure")
    with pytest.raises(QueryError, match="above the maximum"):
        list_features(store, min_score=0.9, max_score=0.1)
    with pytest.raises(QueryError, match="unknown score method"):
        list_features(store, score_method="vibes")


def test_cli_search(seeded: tuple[Store, dict[str, int]], run_main: Any) -> None:
    url = seeded[0].url
    code, out, _ = run_main(["search", "tax policy", "--db", url, "--json", "--verdict", "verified"])
    assert code == 0
    got = json.loads(out)
    assert got["mode"] == "fulltext" and [h["explanation"] for h in got["hits"]][0] == "tax policy"
    code, out, _ = run_main(["search", "tax policy", "--db", url])
    assert code == 0 and "<<tax>> <<policy>>" in out and "by full text" in out
    for args, message in [
        (["search", "", "--db", url], "empty query"),
        (["search", "tax", "--db", url, "--method", "vibes", "--min-score", "1"], "unknown score method"),
        (["search", "tax", "--db", url, "--verdict", "maybe"], "unknown verdict"),
        (["search", "tax", "--db", url, "--min-score", "0.9", "--max-score", "0.1"], "above the maximum"),
        (["features", "list", "--db", url, "--verdict", "maybe"], "unknown verdict"),
    ]:
        code, out, err = run_main(args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)


def test_search_never_imports_torch(seeded: tuple[Store, dict[str, int]], tmp_path: Path) -> None:
    """Both paths, full text and semantic (the numpy encoder embeds the explanations and the query)."""
    probe = (
        "import json, sys\nfrom autointerp.cli import main\nsys.argv = ['autointerp', *json.loads(sys.argv[1])]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\nelse:\n    code = 0\n"
        "print('\\nPROBE ' + json.dumps({'code': code, 'heavy': sorted(m for m in ('torch', 'transformers') "
        "if m in sys.modules)}))\n"
    )
    for args in (["search", "tax policy"], ["search", "armed battles", "--semantic", "--json"]):
        argv = [*args, "--db", seeded[0].url]
        res = subprocess.run([sys.executable, "-c", probe, json.dumps(argv)], capture_output=True, text=True,
                             timeout=120)  # fmt: skip
        assert json.loads(res.stdout.rsplit("PROBE ", 1)[1]) == {"code": 0, "heavy": []}, res.stderr[-2000:]
