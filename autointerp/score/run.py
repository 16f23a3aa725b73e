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

from autointerp.config import RunConfig, config_hash
from autointerp.jobs import Progress, Stage, Tally, make_client
from autointerp.jobs.loop import Job
from autointerp.jobs.stage import TYPICAL_EXPLANATION
from autointerp.llm.client import LLMClient
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


class ScoreStage(Stage):
    """A unit is a feature with ok explanations, for one set of scorers (their identities hashed together)."""

    name = "score"
    label = "score"

    def __init__(self, cfg: RunConfig, store: Store, scorers: Sequence[Scorer]) -> None:
        self.cfg, self.store, self.scorers = cfg, store, list(scorers)
        self.identity = config_hash({sc.method: sc.identity.key() for sc in self.scorers})
        self.llm = cfg.score.llm if self.clients() else None
        self.by_feature: dict[int, list[Explanation]] = {}
        self.done: list[set[int]] = []
        self.skipped = 0  # (explanation, scorer) pairs already final when planned

    @classmethod
    def build(cls, cfg: RunConfig, store: Store) -> list[Stage]:
        return [cls(cfg, store, build_scorers(cfg, store))]

    @classmethod
    def select(cls, cfg: RunConfig, store: Store) -> list[Feature]:
        return select_features(store, cfg.score.features, limit=cfg.score.limit)

    def clients(self) -> list[LLMClient]:
        return list({id(c): c for sc in self.scorers for c in sc.clients()}.values())

    def run_config(self) -> dict[str, Any]:
        return {sc.method: {**sc.identity.row_fields(), "method": sc.method} for sc in self.scorers}

    def prepare(self, features: Sequence[Feature]) -> None:
        """Read the features' ok explanations and which of them each scorer has finished (again before each
        chunk: explanations may have arrived since planning)."""
        fids = [f.id for f in features if f.id is not None]
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

    def _texts(self, f: Feature) -> list[int]:
        return [e.id for e in self.by_feature.get(f.id or -1, []) if e.id is not None and e.text]

    def pending(self, features: Sequence[Feature]) -> set[int]:
        self.prepare(features)
        out = set()
        for f in features:
            texts = self._texts(f)
            self.skipped += sum(e in done for done in self.done for e in texts)
            if f.id is not None and any(e not in done for done in self.done for e in texts):
                out.add(f.id)
        return out

    def _eval_sets(self, f: Feature) -> list[EvalSet]:
        assert f.id is not None
        decode = decoder(self.store, f.model_id)
        recs = test_records(feature_detail(self.store, f.key).records, self.cfg.score.max_per_role)
        examples = tuple(as_example(r, decode) for r in recs)
        return [EvalSet(e.id, f.id, e.text or "", float(f.max_act), examples)
                for e in self.by_feature.get(f.id, []) if e.id is not None and e.text]  # fmt: skip

    def run_chunk(self, features: Sequence[Feature], run_id: int, tally: Tally) -> dict[int, str]:
        outcomes: dict[int, str] = {}
        for f in features:
            assert f.id is not None
            if f.id not in self.by_feature:
                outcomes[f.id] = "skipped"  # no ok explanation (the explainer failed or skipped it): nothing to score
                continue
            sets = self._eval_sets(f)
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

    def sample_requests(self, features: Sequence[Feature], client: Any) -> None:
        """Every scorer built on the recording client scores each feature's explanations (a typical text stands in
        for those not written yet)."""
        scorers = [type(sc).build(self.cfg.score, client) for sc in self.scorers if sc.clients()]
        for f in features:
            assert f.id is not None
            decode = decoder(self.store, f.model_id)
            recs = test_records(feature_detail(self.store, f.key).records, self.cfg.score.max_per_role)
            examples = tuple(as_example(r, decode) for r in recs)
            n_expl = max(1, len(self.by_feature.get(f.id, [])) or len(self.cfg.run.explainers))
            for k in range(n_expl):
                ts = EvalSet(-1 - k, f.id, TYPICAL_EXPLANATION, float(f.max_act), examples)
                for sc in scorers:
                    sc.score([ts])


def run_score(
    cfg: RunConfig,
    store: Store,
    *,
    scorers: Sequence[Scorer] | None = None,
    progress: Progress | None = None,
) -> ScoreSummary:
    """`autointerp score`: a job with one part, over score.features (at most score.limit)."""
    stage = ScoreStage(cfg, store, scorers if scorers is not None else build_scorers(cfg, store))
    res = Job(cfg, store, parts=[stage], features=stage.select(cfg, store), progress=progress).run()
    part = res.parts[stage.label]
    rows = {kind.split(":", 1)[1]: counts for kind, counts in part.rows.items() if kind.startswith("score:")}
    return ScoreSummary(stage.n_explanations, rows, stage.skipped, res.spent.calls, res.seconds, part.run_id)
