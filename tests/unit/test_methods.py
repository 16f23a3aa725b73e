"""The registry of score methods (autointerp.methods) and of explainers: what each method says, that the scorer
registry agrees with it, and that a scorer added by its class and one registry line alone is run, stored, listed,
shown, searched, exported, put in the views and counted on the agreement page, with nothing else edited."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from autointerp import methods
from autointerp.config import ConfigError, ExplainConfig, ScoreConfig, config_hash, load_config
from autointerp.explain.explainers import EXPLAINERS, Explainer, ExplainerId, Outcome
from autointerp.explain.run import build_explainer
from autointerp.intervene.judge import Evidence, best_correlational
from autointerp.llm.client import LLMClient
from autointerp.methods import METHODS, Method
from autointerp.records import FeatureExamples
from autointerp.review.agreement import agreement
from autointerp.review.pages import score_range
from autointerp.score.scorers import SCORERS, EvalSet, ScoreOutcome, Scorer, ScorerId
from autointerp.store import open_store
from autointerp.store.engine import Store
from autointerp.store.reviews import decide, latest_decisions, queue_order
from autointerp.store.search import QueryError, check_method


# ---------------------------------------------------------------------------------------------- the registry
def test_each_method_says_what_it_is() -> None:
    assert methods.names() == ("simulation", "detection", "fuzzing", "embedding", "intervention")
    assert methods.scored() == ("simulation", "detection", "fuzzing", "embedding")
    assert methods.evidence() == ("simulation", "detection", "fuzzing")  # what a verdict may rest on, best first
    assert methods.non_causal() == ("simulation", "detection", "fuzzing", "embedding")  # what the queue compares
    assert [methods.short(m) for m in methods.names()] == ["sim", "det", "fuzz", "emb", "causal"]
    assert methods.short("retired") == "retired"  # a method of an old database is shown by its name
    assert methods.get("simulation").edges == (-1.0, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert methods.get("detection").edges == (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert methods.needs_llm(["embedding"]) is False and methods.needs_llm(["embedding", "fuzzing"]) is True
    with pytest.raises(methods.UnknownMethod, match="unknown score method 'simulaton': choose from simulation, "):
        methods.get("simulaton")


def test_a_method_name_must_be_a_plain_column_name_and_its_range_hold_chance() -> None:
    with pytest.raises(ValueError, match="lower-case letters"):
        Method("drop table", "classification", 0.0, 1.0, 0.5, "x", False)
    with pytest.raises(ValueError, match="lo <= chance < hi"):
        Method("odd", "classification", 0.0, 1.0, 1.0, "x", False)
    assert Method("zero", "classification", 0.0, 1.0, 0.0, "z", False).edges == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def test_scorer_registry_agrees_with_the_methods() -> None:
    assert list(SCORERS) == list(methods.scored()) and len(SCORERS) == 4
    for name in methods.scored():
        assert issubclass(SCORERS[name], Scorer) and SCORERS[name].method == name
    assert "intervention" not in SCORERS  # described, but the intervene stage writes its rows
    assert SCORERS.get("nope") is None


def test_a_registry_line_that_names_the_wrong_class_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = Method("wrong", "classification", 0.0, 1.0, 0.5, "w", False, "autointerp.score.scorers:FuzzingScorer")
    monkeypatch.setitem(METHODS, "wrong", bad)
    with pytest.raises(TypeError, match="not a Scorer class with method 'wrong'"):
        SCORERS["wrong"]


def test_config_accepts_the_registry_s_scored_methods_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ScoreConfig().methods == list(methods.scored())
    for bad in ("intervention", "constant"):
        with pytest.raises(ConfigError, match=r"score\.methods\.1: unknown score method"):
            load_config(None, {"score.methods": ["simulation", bad]})
    monkeypatch.setitem(METHODS, "constant", _CONSTANT)
    assert load_config(None, {"score.methods": ["constant"]}).score.methods == ["constant"]
    assert "constant" in ScoreConfig().methods  # a registered scorer runs by default


def test_verdict_evidence_follows_the_tiers(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclass
    class S:
        method: str
        value: float | None
        status: str = "ok"
        id: int = 0

    rows = [S("detection", 0.9, id=1), S("embedding", 0.99, id=2), S("simulation", 0.2, id=3)]
    assert best_correlational(rows) == Evidence("simulation", 0.2, 3)
    assert best_correlational([S("embedding", 0.99), S("intervention", 0.9)]) is None
    # a method registered in the first tier is evidence with no edit to the judge
    monkeypatch.setitem(METHODS, "oracle", Method("oracle", "correlation", -1.0, 1.0, 0.0, "orc", False, evidence=0))
    assert best_correlational([*rows, S("oracle", 0.5, id=9)]) == Evidence("oracle", 0.5, 9)
    monkeypatch.setitem(METHODS, "oracle", Method("oracle", "correlation", -1.0, 1.0, 0.0, "orc", False, evidence=2))
    assert best_correlational([S("oracle", 0.5, id=9), S("fuzzing", 0.6, id=4)]) == Evidence("fuzzing", 0.6, 4)


def test_unknown_method_in_a_query_names_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(QueryError, match="unknown score method 'constant': choose simulation, detection"):
        check_method("constant")
    monkeypatch.setitem(METHODS, "constant", _CONSTANT)
    check_method("constant")


# ---------------------------------------------------------------------------------------------- explainers
class _EchoExplainer(Explainer):
    """A test-only explainer: registered by one line in EXPLAINERS, built by build_explainer with no edit there."""

    name = "echo"
    needs_llm = False

    def __init__(self, cfg: ExplainConfig, store: Store) -> None:
        self.cfg, self.store = cfg, store

    @classmethod
    def build(cls, cfg: ExplainConfig, store: Store, client: LLMClient | None) -> Explainer:
        assert client is None  # no LLM client is made for an explainer that needs none
        return cls(cfg, store)

    @property
    def identity(self) -> ExplainerId:
        return ExplainerId("", "", "", config_hash({}), {}, self.name)

    def explain(self, features: Sequence[FeatureExamples]) -> list[Outcome]:
        return [Outcome("ok", text=f"feature {fx.key}") for fx in features]


def test_explainers_are_built_through_their_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    cfg = load_config(None, {"db": f"sqlite:///{tmp_path}/x.sqlite"})
    store = open_store(cfg.db)
    with pytest.raises(ValueError, match="unknown explainer 'echo': choose one of llm, tokens"):
        build_explainer(cfg, store, kind="echo")
    monkeypatch.setitem(EXPLAINERS, "echo", _EchoExplainer)
    ex = build_explainer(cfg, store, kind="echo")
    assert isinstance(ex, _EchoExplainer) and ex.store is store
    assert type(build_explainer(cfg, store, kind="tokens")).__name__ == "TokenExplainer"


# ---------------------------------------------------------------------------------------------- a new scorer
class ConstantScorer(Scorer):
    """The whole of a test-only scorer: a fixed score per explanation (0.5 to 0.9 by its id), no LLM."""

    method = "constant"

    def __init__(self, cfg: ScoreConfig) -> None:
        self.cfg = cfg

    @classmethod
    def build(cls, cfg: ScoreConfig, client: LLMClient | None) -> Scorer:
        assert client is None  # the method needs no LLM: the stage makes no client
        return cls(cfg)

    @property
    def identity(self) -> ScorerId:
        return ScorerId("constant", "", "", config_hash({"v": 1}), {"v": 1}, self.method)

    def score(self, items: Sequence[EvalSet]) -> list[ScoreOutcome]:
        return [ScoreOutcome("ok", 0.5 + (ts.explanation_id % 5) / 10, 0.4, 0.95, n=len(ts.records)) for ts in items]


# The registry line: the only edit outside the scorer's own code (a range of -1 to 1, so that its agreement bins
# differ from the 0-1 default).
_CONSTANT = Method("constant", "correlation", -1.0, 1.0, 0.0, "const", False, ConstantScorer)


def test_a_new_scorer_needs_its_class_and_its_registry_line_only(
    collected_db: str, monkeypatch: pytest.MonkeyPatch, run_main: Any
) -> None:
    monkeypatch.setitem(METHODS, "constant", _CONSTANT)

    def cli(*args: str) -> str:
        """Standard output (and the stage summaries, printed on standard error) of `autointerp ARGS`."""
        code, out, err = run_main([*args, "--db", collected_db])
        assert code == 0, out + err
        return out + err if args[0] in ("explain", "score") else out

    cli("explain", "--explainer", "tokens", "--features", "all", "--limit", "6")
    assert "constant: 6 ok" in cli("score", "--method", "constant")
    store = open_store(collected_db)
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT explanation_id, value FROM score WHERE method = 'constant'").all()
        expl = conn.exec_driver_sql("SELECT id FROM explanation WHERE status = 'ok'").all()
    assert len(rows) == len(expl) == 6
    best = max(v for _e, v in rows)

    listed = json.loads(cli("features", "list", "--method", "constant", "--sort", "score", "--json"))
    assert listed[0]["score"] == pytest.approx(best)
    above = json.loads(cli("features", "list", "--method", "constant", "--min-score", "0.75", "--json"))
    assert 0 < len(above) < 6
    assert "constant" in cli("features", "show", listed[0]["id"])
    assert "const 0." in cli("search", "token")  # the short label of the method, from its line

    with store.engine.connect() as conn:  # the views get a column for it (made again: their definition changed)
        col = conn.exec_driver_sql("SELECT max(constant) FROM feature_summary").scalar_one()
        n = conn.exec_driver_sql("SELECT count(*) FROM explanation_scores WHERE method = 'constant'").scalar_one()
    assert col == pytest.approx(best) and n == 6

    exported = [json.loads(line) for line in cli("export", "--method", "constant", "--min-score", "0.75").splitlines()]
    assert {f["id"] for f in exported} == {f["id"] for f in above}
    for f in exported:
        assert max(s["value"] for e in f["explanations"] for s in e["scores"] if s["method"] == "constant") >= 0.75

    for k, (eid, _v) in enumerate(sorted(rows)):
        decide(store, int(eid), "ann", "accept" if k % 2 else "reject")
    figures = {m.method: m for m in agreement(latest_decisions(store), n_boot=50).methods}
    assert figures["constant"].n == 6
    assert [b.lo for b in figures["constant"].bins] == list(_CONSTANT.edges[:-1])
    assert score_range("constant") == (-1.0, 1.0)  # the review page's score bars
    assert queue_order(store, "lowest", "constant")[0] == min(rows, key=lambda r: (r[1], r[0]))[0]
