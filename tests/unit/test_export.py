"""`autointerp export`: every score in the database is in the export and every exported score is in the database;
pages change nothing; the Neuronpedia records. The same export from PostgreSQL:
tests/integration/test_export_postgres.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from autointerp.query.export import export_to_file, neuronpedia_layer
from autointerp.store.engine import Store
from autointerp.store.search import QueryError


@pytest.fixture()
def seeded(seeded: tuple[Store, dict[str, int]]) -> Store:
    """The seeded store alone."""
    return seeded[0]


def test_round_trip(seeded: Store, export_lines: Any, db_scores: Any, exported_scores: Any) -> None:
    objs = export_lines(seeded)
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


def test_reviews_are_exported(seeded: Store, export_lines: Any) -> None:
    from autointerp.store.reviews import decide

    with seeded.engine.connect() as conn:
        eid = conn.exec_driver_sql("SELECT id FROM explanation WHERE text = 'tax policy'").scalar_one()
    decide(seeded, eid, "ann", "edit", "tax policy and tariffs", note="broader")
    (tax,) = [e for o in export_lines(seeded) for e in o["explanations"] if e["text"] == "tax policy"]
    assert [(r["reviewer"], r["decision"], r["text"], r["note"]) for r in tax["reviews"]] == [
        ("ann", "edit", "tax policy and tariffs", "broader")
    ]
    human = [e for o in export_lines(seeded) for e in o["explanations"] if e["explainer"] == "human"]
    assert [e["text"] for e in human] == ["tax policy and tariffs"]  # the edit is an explanation of its own


def test_pages_selectors_and_min_score(seeded: Store, export_lines: Any) -> None:
    assert export_lines(seeded, page=3) == export_lines(seeded)
    explained = export_lines(seeded, selector="explained")
    assert len(explained) == 10 and all(o["explanations"] for o in explained)
    good = export_lines(seeded, min_score=0.5)
    assert sorted(e["text"] for o in good for e in o["explanations"] if e["explainer"] == "llm") == [
        "foreign policy and diplomacy", "money, taxation and government revenue", "tax policy",
        "taxes and tariffs on imported goods",
    ]  # fmt: skip
    one = export_lines(seeded, selector="neurons/3")
    assert [o["index"] for o in one] == [3]
    with pytest.raises(QueryError, match="unknown score method"):
        export_lines(seeded, method="vibes")
    with pytest.raises(QueryError, match="unknown export format"):
        export_lines(seeded, fmt="xml")


def test_neuronpedia_records(seeded: Store, tmp_path: Path, export_lines: Any) -> None:
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
    assert len(export_lines(seeded, fmt="neuronpedia", min_score=0.5)) == 4
    assert neuronpedia_layer("blocks.12.resid.post", "ab12") == "12-resid-post-ab12"
    assert not list(tmp_path.glob(".np.jsonl.*"))  # the temporary file was renamed


def test_cli(seeded: Store, tmp_path: Path, run_main: Any, exported_scores: Any) -> None:
    out = tmp_path / "all.jsonl"
    code, _o, err = run_main(["export", "--db", seeded.url, "--out", str(out)])
    assert code == 0 and "exported" in err and exported_scores([json.loads(x) for x in out.read_text().splitlines()])
    code, stdout, _e = run_main(["export", "--db", seeded.url, "--format", "neuronpedia"])
    assert code == 0 and len(stdout.splitlines()) == 12
    code, _o, err = run_main(["export", "--db", seeded.url, "--format", "xml"])
    assert code == 2 and "unknown export format" in err
    assert sys.stdout is not None
