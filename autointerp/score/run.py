"""The score stage on the work loop: a unit is a feature with ok explanations; every one of them is scored by each
configured method on the test split, one row per (explanation, method, scorer identity).

A feature is finished when each of its explanations has a final row (ok or undefined) for every scorer; failed
rows are scored again. Results are committed per feature, so an interrupted job loses at most one feature's
scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from autointerp.config import RunConfig
from autointerp.jobs import Progress, Stage, Tally, make_client, run_stage
from autointerp.methods import METHODS
from autointerp.records import as_example, decoder, test_records
from autointerp.score.scorers import SCORERS, EvalSet, Scorer
from autointerp.store.engine import Store
from autointerp.store.explanations import ok_explanations
from autointerp.store.queries import feature_detail, select_features
from autointerp.store.scores import scored_by_identity, write_scores
from autointerp.store.tables import Explanation, Feature, Score


@dataclass(frozen=True)
class ScoreSummary:
    explanations: int
    rows: dict[str, dict[str, int]]  # method -> status -> count
    skipped: int
    llm_calls: int
    seconds: float
    run_id: int | None = None


def build_scorers(cfg: RunConfig, store: Store, methods: Sequence[str] | None = None) -> list[Scorer]:
    """One scorer per method (registry SCORERS), sharing one LLM client (cache + usage) for the LLM-based ones."""
    client = None
    out: list[Scorer] = []
    for m in methods or cfg.score.methods:
        kind = SCORERS.get(m)
        if kind is None:
            raise ValueError(f"unknown scoring method {m!r}: choose from {', '.join(SCORERS)}")
        if METHODS[m].needs_llm and client is None:
            client = make_client(cfg, store, cfg.score.llm, stage="score")
        out.append(kind.build(cfg.score, client))
    return out


def _eval_sets(store: Store, f: Feature, expls: list[Explanation], max_per_role: int) -> list[EvalSet]:
    assert f.id is not None
    decode = decoder(store, f.model_id)
    examples = tuple(as_example(r, decode) for r in test_records(feature_detail(store, f.key).records, max_per_role))
    return [EvalSet(e.id, f.id, e.text or "", float(f.max_act), examples) for e in expls if e.id is not None and e.text]


class ScoreStage(Stage[Feature]):
    name = "score"

    def __init__(self, cfg: RunConfig, store: Store, scorers: Sequence[Scorer]) -> None:
        self.cfg, self.store, self.scorers = cfg, store, list(scorers)
        self.by_feature: dict[int, list[Explanation]] = {}
        self.done: list[set[int]] = []
        self.skipped = 0

    def run_config(self) -> dict[str, Any]:
        return {sc.method: {**sc.identity.row_fields(), "method": sc.method} for sc in self.scorers}

    def units(self) -> Sequence[Feature]:
        feats = select_features(self.store, self.cfg.score.features, limit=self.cfg.score.limit)
        self.load(feats)
        return [f for f in feats if f.id in self.by_feature]

    def load(self, feats: Sequence[Feature]) -> None:
        """Read the features' ok explanations and which of them each scorer has finished (the job runner calls it
        again before each chunk: explanations may have arrived since)."""
        fids = [f.id for f in feats if f.id is not None]
        for fid in fids:
            self.by_feature.pop(fid, None)
        for e in ok_explanations(self.store, fids):
            self.by_feature.setdefault(e.feature_id, []).append(e)
        ids = [e.id for fid in fids for e in self.by_feature.get(fid, []) if e.id is not None]
        done = scored_by_identity(self.store, [sc.identity.key() for sc in self.scorers], ids)
        self.done = [old | new for old, new in zip(self.done or [set() for _ in done], done, strict=True)]

    @property
    def n_explanations(self) -> int:
        return sum(map(len, self.by_feature.values()))

    def unfinished(self, f: Feature) -> bool:
        """Some ok explanation of the feature lacks a final score of some scorer (after `load`)."""
        texts = [e.id for e in self.by_feature.get(f.id or -1, []) if e.id is not None and e.text]
        return any(e not in done for done in self.done for e in texts)

    def pending(self, units: Sequence[Feature]) -> list[Feature]:
        out = []
        for f in units:
            texts = [e.id for e in self.by_feature[f.id or -1] if e.id is not None and e.text]
            self.skipped += sum(e in done for done in self.done for e in texts)
            if self.unfinished(f):
                out.append(f)
        return out

    def run_chunk(self, chunk: Sequence[Feature], run_id: int, tally: Tally) -> dict[int, str]:
        outcomes: dict[int, str] = {}
        for f in chunk:
            assert f.id is not None
            if f.id not in self.by_feature:
                outcomes[f.id] = "skipped"  # no ok explanation (the explainer failed or skipped it): nothing to score
                continue
            sets = _eval_sets(self.store, f, self.by_feature[f.id], self.cfg.score.max_per_role)
            rows: list[Score] = []
            for sc, finished in zip(self.scorers, self.done, strict=True):
                todo = [ts for ts in sets if ts.explanation_id not in finished]
                if not todo:
                    continue
                for ts, o in zip(todo, sc.score(todo), strict=True):
                    tally.add(f"score:{sc.method}", o.status)
                    rows.append(Score(explanation_id=ts.explanation_id, feature_id=ts.feature_id, method=sc.method,
                                      **sc.identity.row_fields(), status=o.status, value=o.value, ci_low=o.ci_low,
                                      ci_high=o.ci_high, n=o.n, n_failed=o.n_failed, reason=o.reason,
                                      details=o.details, run_id=run_id))  # fmt: skip
            write_scores(self.store, rows)
            outcomes[f.id] = "failed" if any(r.status == "failed" for r in rows) else "ok"
        return outcomes


def _clients(scorers: Sequence[Scorer]) -> list[Any]:
    """The distinct LLM clients of the scorers (the simulation scorer's sits on its simulator)."""
    found = [getattr(sc, "client", None) for sc in scorers]
    found += [getattr(getattr(sc, "simulator", None), "client", None) for sc in scorers]
    return list({id(c): c for c in found if c is not None}.values())


def run_score(
    cfg: RunConfig,
    store: Store,
    *,
    scorers: Sequence[Scorer] | None = None,
    progress: Progress | None = None,
) -> ScoreSummary:
    scorers = list(scorers) if scorers is not None else build_scorers(cfg, store)
    stage = ScoreStage(cfg, store, scorers)
    clients = _clients(scorers)
    calls0 = sum(c.calls for c in clients)
    res = run_stage(store, stage, progress=progress)
    calls = sum(c.calls for c in _clients(scorers)) - calls0
    rows = {kind.split(":", 1)[1]: counts for kind, counts in res.rows.items() if kind.startswith("score:")}
    return ScoreSummary(stage.n_explanations, rows, stage.skipped, calls, res.seconds, res.run_id)
