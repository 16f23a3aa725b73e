"""`autointerp export`: every score in the database is in the export and every exported score is in the database;
pages change nothing; the Neuronpedia records; the same export from PostgreSQL."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from test_search import seed

from autointerp.query.export import export, export_to_file, neuronpedia_layer
from autointerp.store import open_store
from autointerp.store.engine import Store
from autointerp.store.search import QueryError

SCORE_KEYS = ("method", "model", "prompt_hash", "config_hash", "status", "value", "ci_low", "ci_high", "n", "n_failed")


def lines(store: Store, **kw: Any) -> list[dict[str, Any]]:
    buf = io.StringIO()
    export(store, buf, **kw)
    return [json.loads(x) for x in buf.getvalue().splitlines()]


def db_scores(store: Store) -> set[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT f.key, e.text, " + ", ".join(f"s.{k}" for k in SCORE_KEYS) + " FROM score s "
            "JOIN explanation e ON e.id = s.explanation_id JOIN feature f ON f.id = s.feature_id"
        ).all()
    return {tuple(r) for r in rows}


def exported_scores(objs: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    return {
        (o["id"], e["text"], *(s[k] for k in SCORE_KEYS)) for o in objs for e in o["explanations"] for s in e["scores"]
    }


@pytest.fixture()
def seeded(collected_db: str) -> Store:
    store = open_store(collected_db)
    seed(store)
    return store


def test_round_trip(seeded: Store) -> None:
    objs = lines(seeded)
    with seeded.engine.connect() as conn:
        n_ok = conn.exec_driver_sql("SELECT count(*) FROM feature WHERE status = 'ok'").scalar_one()
        ok_texts = sorted(r[0] for r in conn.exec_driver_sql("SELECT text FROM explanation WHERE status = 'ok'"))
    assert len(objs) == n_ok and [o["id"] for o in objs] == sorted(
        (o["id"] for o in objs), key=lambda k: int(k.rsplit("/", 1)[1])
    )
    assert exported_scores(objs) == db_scores(seeded) and len(db_scores(seeded)) == 9
    assert sorted(e["text"] for o in objs for e in o["explanations"]) == ok_texts  # failed ones left out
    by_text = {e["text"]: (o, e) for o in objs for e in o["explanations"]}
    feat, tariffs = by_text["taxes and tariffs on imported goods"]
    assert tariffs["verdict"]["verdict"] == "unverified"  # the latest of its two
    assert tariffs["explainer"] == "llm" and tariffs["model"] == "fake:scripted" and tariffs["prompt_hash"] == "h"
    sim = next(s for s in tariffs["scores"] if s["method"] == "simulation" and s["model"] == "s1")
    assert (sim["value"], sim["ci_low"], sim["ci_high"], sim["n"]) == (0.6, pytest.approx(0.5), pytest.approx(0.7), 30)
    assert set(feat["statistics"]) == {"max_act", "mean_act", "density", "n_tokens", "histogram"}
    assert isinstance(feat["statistics"]["histogram"], dict)
    assert by_text["tax policy"][0]["verdict"] == "verified"  # feature 0: its best explanation's
    assert tariffs["reviews"] == []  # not reviewed yet


def test_reviews_are_exported(seeded: Store) -> None:
    from autointerp.store.reviews import decide

    with seeded.engine.connect() as conn:
        eid = conn.exec_driver_sql("SELECT id FROM explanation WHERE text = 'tax policy'").scalar_one()
    decide(seeded, eid, "ann", "edit", "tax policy and tariffs", note="broader")
    (tax,) = [e for o in lines(seeded) for e in o["explanations"] if e["text"] == "tax policy"]
    assert [(r["reviewer"], r["decision"], r["text"], r["note"]) for r in tax["reviews"]] == [
        ("ann", "edit", "tax policy and tariffs", "broader")
    ]
    human = [e for o in lines(seeded) for e in o["explanations"] if e["explainer"] == "human"]
    assert [e["text"] for e in human] == ["tax policy and tariffs"]  # the edit is an explanation of its own


def test_pages_selectors_and_min_score(seeded: Store) -> None:
    assert lines(seeded, page=3) == lines(seeded)
    explained = lines(seeded, selector="explained")
    assert len(explained) == 10 and all(o["explanations"] for o in explained)
    good = lines(seeded, min_score=0.5)
    assert sorted(e["text"] for o in good for e in o["explanations"] if e["explainer"] == "llm") == [
        "foreign policy and diplomacy", "money, taxation and government revenue", "tax policy",
        "taxes and tariffs on imported goods",
    ]  # fmt: skip
    one = lines(seeded, selector="neurons/3")
    assert [o["index"] for o in one] == [3]
    with pytest.raises(QueryError, match="unknown score method"):
        lines(seeded, method="vibes")
    with pytest.raises(QueryError, match="unknown export format"):
        lines(seeded, fmt="xml")


def test_neuronpedia_records(seeded: Store, tmp_path: Path) -> None:
    out = tmp_path / "np.jsonl"
    summary = export_to_file(seeded, out, fmt="neuronpedia")
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert summary.records == len(recs) == 12 and summary.features == 10
    assert all(set(r) == {"modelId", "layer", "index", "description", "explanationModelName", "typeName"} for r in recs)
    tax = next(r for r in recs if r["description"] == "tax policy")
    assert tax["layer"] == "1-mlp-post-neurons" and tax["index"] == "0" and tax["typeName"] == "autointerp-llm"
    assert tax["explanationModelName"] == "fake:scripted"
    tokens = next(r for r in recs if r["typeName"] == "autointerp-tokens")
    assert tokens["explanationModelName"] == "autointerp-tokens"
    assert len(lines(seeded, fmt="neuronpedia", min_score=0.5)) == 4
    assert neuronpedia_layer("blocks.12.resid.post", "ab12") == "12-resid-post-ab12"
    assert not list(tmp_path.glob(".np.jsonl.*"))  # the temporary file was renamed


def test_cli(
    seeded: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli_helper import run_main as run_cli

    out = tmp_path / "all.jsonl"
    code, _o, err = run_cli(["export", "--db", seeded.url, "--out", str(out)], monkeypatch, capsys)
    assert code == 0 and "exported" in err and exported_scores([json.loads(x) for x in out.read_text().splitlines()])
    code, stdout, _e = run_cli(["export", "--db", seeded.url, "--format", "neuronpedia"], monkeypatch, capsys)
    assert code == 0 and len(stdout.splitlines()) == 12
    code, _o, err = run_cli(["export", "--db", seeded.url, "--format", "xml"], monkeypatch, capsys)
    assert code == 2 and "unknown export format" in err
    assert sys.stdout is not None


def test_same_export_from_postgresql(seeded: Store, postgres_db: str, collect_into: Any, tmp_path: Path) -> None:
    collect_into(postgres_db, tmp_path)
    pg = open_store(postgres_db)
    seed(pg)

    def comparable(objs: list[dict[str, Any]]) -> list[Any]:
        drop = {"id", "created_at"}
        return [
            {**{k: v for k, v in o.items() if k != "explanations"},
             "explanations": [{k: v for k, v in e.items() if k not in drop | {"scores", "verdict"}}
                              | {"scores": [{k: v for k, v in s.items() if k != "id"} for s in e["scores"]],
                                 "verdict": e["verdict"] and {k: v for k, v in e["verdict"].items() if k not in drop}}
                              for e in o["explanations"]]}
            for o in objs
        ]  # fmt: skip

    a, b = comparable(lines(seeded)), comparable(lines(pg))
    assert a == b
    assert exported_scores(lines(pg)) == db_scores(pg)
