"""The `score` stage: every ok explanation of the selected features, scored by each configured method on the test
split, one row per (explanation, method, scorer identity). A rerun skips rows that are final (ok or undefined) and
retries failed ones; results go in per feature, so an interrupted job loses at most one feature's scores."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlmodel import col, select

from autointerp.config import RunConfig
from autointerp.examples import Example
from autointerp.explain_job import _decoder
from autointerp.scorers import SCORERS, EvalSet, Scorer
from autointerp.store.engine import Store
from autointerp.store.queries import feature_detail, select_features
from autointerp.store.scores import scored_explanation_ids, write_scores
from autointerp.store.tables import Explanation, Feature, Score
from autointerp.wiring import make_client

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ScoreSummary:
    explanations: int
    rows: dict[str, dict[str, int]]  # method -> status -> count
    skipped: int
    llm_calls: int
    seconds: float


def build_scorers(cfg: RunConfig, store: Store, methods: Sequence[str] | None = None) -> list[Scorer]:
    """One scorer per method (registry SCORERS), sharing one LLM client (cache + usage) for the LLM-based ones."""
    client = None
    out: list[Scorer] = []
    for m in methods or cfg.score.methods:
        kind = SCORERS.get(m)
        if kind is None:
            raise ValueError(f"unknown scoring method {m!r}: choose from {', '.join(SCORERS)}")
        if kind.uses_llm and client is None:
            client = make_client(cfg, store, cfg.score.llm, stage="score")
        out.append(kind.build(cfg.score, client))
    return out


def test_records(records: Sequence[Any], max_per_role: int) -> list[Any]:
    """The test split, at most max_per_role per role (top by rank, quantile spread over bins, random)."""
    test = [r for r in records if r.split == "test"]
    out: list[Any] = []
    for role in ("top", "quantile", "random"):
        group = sorted((r for r in test if r.role == role), key=lambda r: (r.rank, -(r.bin or 0)))
        if role == "quantile":  # round robin over bins so every activation level is scored
            by_bin: dict[int, list[Any]] = {}
            for r in group:
                by_bin.setdefault(r.bin or 0, []).append(r)
            group = [
                lane[i]
                for i in range(max(map(len, by_bin.values()), default=0))
                for lane in by_bin.values()
                if i < len(lane)
            ]
        out += group[:max_per_role]
    return out


def run_score(
    cfg: RunConfig,
    store: Store,
    *,
    scorers: Sequence[Scorer] | None = None,
    progress: Progress | None = None,
) -> ScoreSummary:
    t0 = time.perf_counter()
    scorers = list(scorers) if scorers is not None else build_scorers(cfg, store)
    feats = select_features(store, cfg.score.features, limit=cfg.score.limit)
    fids = [f.id for f in feats if f.id is not None]
    with store.session() as s:
        expls = s.exec(
            select(Explanation)
            .where(col(Explanation.feature_id).in_(fids), Explanation.status == "ok")
            .order_by(col(Explanation.feature_id), col(Explanation.id))
        ).all()
    by_feature: dict[int, list[Explanation]] = {}
    for e in expls:
        by_feature.setdefault(e.feature_id, []).append(e)
    keys = [
        {
            "method": sc.method,
            "model": sc.identity.model,
            "prompt_hash": sc.identity.prompt_hash,
            "config_hash": sc.identity.config_hash,
        }
        for sc in scorers
    ]
    all_ids = [e.id for e in expls if e.id is not None]
    done = [scored_explanation_ids(store, k, all_ids) for k in keys]
    counts: dict[str, dict[str, int]] = {}
    skipped = 0
    todo_feats = [f for f in feats if f.id in by_feature]
    for n, f in enumerate(todo_feats, 1):
        assert f.id is not None
        sets = _test_sets(store, f, by_feature[f.id], cfg.score.max_per_role)
        rows: list[Score] = []
        for sc, key, finished in zip(scorers, keys, done, strict=True):
            todo = [ts for ts in sets if ts.explanation_id not in finished]
            skipped += len(sets) - len(todo)
            if not todo:
                continue
            ident = sc.identity
            for ts, o in zip(todo, sc.score(todo), strict=True):
                counts.setdefault(key["method"], {}).setdefault(o.status, 0)
                counts[key["method"]][o.status] += 1
                rows.append(
                    Score(
                        explanation_id=ts.explanation_id,
                        feature_id=ts.feature_id,
                        method=ident.method,
                        model=ident.model,
                        prompt=ident.prompt,
                        prompt_hash=ident.prompt_hash,
                        config_hash=ident.config_hash,
                        config=ident.config,
                        status=o.status,
                        value=o.value,
                        ci_low=o.ci_low,
                        ci_high=o.ci_high,
                        n=o.n,
                        n_failed=o.n_failed,
                        reason=o.reason,
                        details=o.details,
                    )
                )
        write_scores(store, rows)
        if progress is not None:
            progress("score", n, len(todo_feats))
    clients = {id(c): c for sc in scorers for c in (getattr(sc, "client", None), _sim_client(sc)) if c is not None}
    calls = sum(c.calls for c in clients.values())
    return ScoreSummary(len(expls), counts, skipped, calls, time.perf_counter() - t0)


def _sim_client(sc: Scorer) -> Any:
    return getattr(getattr(sc, "simulator", None), "client", None)


def _test_sets(store: Store, f: Feature, expls: list[Explanation], max_per_role: int) -> list[EvalSet]:
    assert f.id is not None
    detail = feature_detail(store, f.key)
    decode = _decoder(store, f.model_id)
    recs = test_records(detail.records, max_per_role)
    examples = tuple(
        Example(tuple(decode(r.token_ids)), tuple(float(a) for a in r.acts), r.role, float(r.max_act), r.context_idx)
        for r in recs
    )
    return [EvalSet(e.id, f.id, e.text or "", float(f.max_act), examples) for e in expls if e.id is not None and e.text]
