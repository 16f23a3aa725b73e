"""Read queries shared by the CLI and the review page. Return plain, JSON-ready dataclasses."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlmodel import col, func, select

from autointerp.store.blobs import unpack_f16, unpack_i32
from autointerp.store.dialect import among
from autointerp.store.engine import Store
from autointerp.store.tables import Context, Document, Explanation, Feature, Record

MAX_ROWS = 2**63 - 1  # the largest LIMIT either database binds (a bigger int overflows SQLite's 64-bit integer)


class FeatureNotFound(LookupError):
    pass


def check_limit(limit: int | None, offset: int = 0) -> None:
    """A page size of at least one row (None: all) and an offset of at least zero, both within MAX_ROWS."""
    from autointerp.store.search import QueryError

    if limit is not None and not 1 <= limit <= MAX_ROWS:
        raise QueryError(f"limit must be at least 1 (and at most {MAX_ROWS}), not {limit}")
    if not 0 <= offset <= MAX_ROWS:
        raise QueryError(f"offset must be at least 0 (and at most {MAX_ROWS}), not {offset}")


def distinct_values(store: Store, column: str) -> list[str]:
    """The values features have of 'site', 'source' or 'status', or explanations of 'explainer', sorted (no
    None): what an unknown one is answered with, and the review page's filter menus."""
    field = {"site": Feature.site, "source": Feature.source, "status": Feature.status,
             "explainer": Explanation.explainer}[column]  # fmt: skip
    with store.session() as s:
        return sorted(v for v in s.exec(select(field).distinct()).all() if v is not None)


@dataclass(frozen=True)
class FeatureSummary:
    id: str
    site: str
    source: str
    index: int
    model: str
    status: str
    max: float
    mean: float
    density: float
    n_tokens: int
    score: float | None = None  # best score of its explanations by the listing's score method (None: unscored)
    explanation: str | None = None  # the explanation that score belongs to

    @classmethod
    def of(cls, f: Feature, score: float | None = None, explanation: str | None = None) -> FeatureSummary:
        return cls(
            f.key,
            f.site,
            f.source,
            f.index,
            f.model_id,
            f.status,
            f.max_act,
            f.mean_act,
            f.density,
            f.n_tokens,
            score,
            explanation,
        )


@dataclass(frozen=True)
class RecordView:
    role: str
    split: str
    rank: int
    bin: int | None
    max_act: float
    context_idx: int
    document: str
    token_ids: list[int]  # the tokens the activations belong to: the last len(acts) of the context
    acts: list[float]


@dataclass(frozen=True)
class FeatureDetail:
    summary: FeatureSummary
    histogram: dict[str, Any]
    corpus_id: str
    records: list[RecordView] = field(default_factory=list)


def list_features(
    store: Store,
    *,
    site: str | None = None,
    source: str | None = None,
    status: str | None = None,
    sort: str = "max",
    limit: int | None = 50,
    offset: int = 0,
    score_method: str = "simulation",
    min_score: float | None = None,
    max_score: float | None = None,
    explainer: str | None = None,
    verdict: str | None = None,
) -> list[FeatureSummary]:
    """Features with their statistics and best `score_method` score (and that score's explanation), `limit` of
    them (None: all) after the first `offset`; sort 'score' puts unscored features last.

    With `explainer` or `verdict`, only features with an ok explanation of that explainer whose latest verdict is
    that one, and the best score is taken over those explanations; `min_score` / `max_score` bound it. The rows of
    the review page's keyset pages (store.browse), read from the first: an empty site, source or status filters
    nothing, as the CLI's flags."""
    from autointerp.store.browse import ListQuery, first_rows

    check_limit(limit, offset)
    q = ListQuery(
        site=site or None,
        source=source or None,
        status=status or None,
        explainer=explainer,
        method=score_method,
        min_score=min_score,
        max_score=max_score,
        verdict=verdict,
        sort=sort,
    )
    n = None if limit is None else min(offset + limit, MAX_ROWS)
    return [r.feature for r in first_rows(store, q, n)[offset:]]


def resolve_feature(store: Store, ident: str) -> Feature:
    """Find a feature by its full id (MODEL/SITE/SOURCE/INDEX) or a unique suffix of it ("neurons/12", or "12" when
    a single feature has index 12). A bare number is an index, never a row number: row numbers are not ids."""
    with store.session() as s:
        exact = s.exec(select(Feature).where(Feature.key == ident)).first()
        if exact is not None:
            return exact
        # ASCII case ignored on both databases, so an id resolves on both alike
        like = store.dialect.endswith_ci(col(Feature.key), "/" + ident)
        found = s.exec(select(Feature).where(like).limit(3)).all()
    if len(found) == 1:
        return found[0]
    if not found:
        raise FeatureNotFound(f"no feature {ident!r} (ids look like MODEL/SITE/SOURCE/INDEX; see `features list`)")
    more = ", ..." if len(found) > 2 else ""
    raise FeatureNotFound(
        f"feature id {ident!r} is ambiguous: {', '.join(f.key for f in found[:2])}{more}; give more of the id"
    )


_ROLE_ORDER = {"top": 0, "quantile": 1, "random": 2}


def feature_detail(store: Store, ident: str) -> FeatureDetail:
    f = resolve_feature(store, ident)
    with store.session() as s:
        rows = s.exec(
            select(Record, Context, Document)
            .join(Context, col(Record.context_id) == col(Context.id))
            .join(
                Document,
                (col(Document.corpus_id) == col(Context.corpus_id)) & (col(Document.idx) == col(Context.doc_idx)),
            )
            .where(Record.feature_id == f.id)
        ).all()
    records = []
    for rec, ctx, doc in rows:
        ids = unpack_i32(ctx.tokens)
        acts = unpack_f16(rec.acts)
        records.append(
            RecordView(
                role=rec.role,
                split=rec.split,
                rank=rec.rank,
                bin=rec.bin,
                max_act=float(rec.max_act),
                context_idx=ctx.idx,
                document=doc.name,
                token_ids=ids[len(ids) - len(acts) :].tolist(),
                acts=acts.astype(np.float64).tolist(),  # float16 values are exact in float64
            )
        )
    records.sort(key=lambda r: (_ROLE_ORDER.get(r.role, 9), -1 if r.bin is None else -r.bin, r.rank))
    return FeatureDetail(FeatureSummary.of(f), f.histogram, f.corpus_id, records)


def _sample_order(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def explained_ids(store: Store, explainer: str | None = None) -> set[int]:
    """Ids of the features that have an ok explanation (of `explainer`, if given)."""
    from autointerp.store.tables import Explanation

    q = select(Explanation.feature_id).where(Explanation.status == "ok")
    if explainer is not None:
        q = q.where(Explanation.explainer == explainer)
    with store.session() as s:
        return set(s.exec(q).all())


def select_features(
    store: Store, selector: str | None, *, limit: int | None = None, seed: int = 0, explainer: str | None = None
) -> list[Feature]:
    """Features named by a selector, in a stable order, at most `limit`.

    'all': every feature with status ok. 'explained': those with an ok explanation (of `explainer`, if given).
    'sample': every feature with status ok, in a seeded order that alternates between sources (neurons and each
    SAE), so a small sample holds both. Otherwise a comma-separated list whose items are feature ids (or unique
    suffixes), sites (blocks.12.mlp.post) or sources (neurons, an SAE id). Dead features are left out of 'all',
    'sample', sites and sources; named one by one, they are kept (the stage then skips them with the reason).
    """
    selector = (selector or "all").strip()
    with store.session() as s:
        ok = s.exec(select(Feature).where(Feature.status == "ok").order_by(col(Feature.id))).all()
    if selector == "explained":
        have = explained_ids(store, explainer)
        chosen = [f for f in ok if f.id in have]
    elif selector in ("all", "sample"):
        chosen = list(ok)
        if selector == "sample":
            groups: dict[str, list[Feature]] = {}
            for f in sorted(ok, key=lambda f: _sample_order(f.key, seed)):
                groups.setdefault(f.source, []).append(f)
            lanes = [groups[k] for k in sorted(groups)]
            chosen = [lane[i] for i in range(max(map(len, lanes), default=0)) for lane in lanes if i < len(lane)]
    else:
        chosen, seen = [], set()
        for item in (x.strip() for x in selector.split(",") if x.strip()):
            group = [f for f in ok if item in (f.site, f.source)]
            for f in group or [resolve_feature(store, item)]:
                if f.id not in seen:
                    seen.add(f.id)
                    chosen.append(f)
    return chosen[:limit] if limit is not None else chosen


def select_explained(
    store: Store, selector: str, *, explainer: str | None = None, limit: int | None = None, seed: int = 0
) -> tuple[list[Feature], dict[int, list[Any]], int]:
    """The selected features that have an ok explanation (of `explainer`, if given), at most `limit`; their ok
    explanations (store.explanations.ExplanationView); and how many selected features had none."""
    from autointerp.store.explanations import explanations_for

    if selector.strip() == "explained":
        chosen, without = select_features(store, "explained", explainer=explainer), 0
    else:
        have = explained_ids(store, explainer)
        chosen = select_features(store, selector, seed=seed)
        without = sum(f.id not in have for f in chosen)
        chosen = [f for f in chosen if f.id in have]
    chosen = chosen[:limit] if limit is not None else chosen
    ids = [f.id for f in chosen if f.id is not None]
    by_feature = {
        fid: [e for e in es if e.status == "ok" and (explainer is None or e.explainer == explainer)]
        for fid, es in explanations_for(store, ids).items()
    }
    return chosen, by_feature, without


def model_source(store: Store, model_id: str) -> str | None:
    """Where a stored subject model was loaded from (None for a model the database does not know)."""
    from autointerp.store.tables import SubjectModel

    with store.session() as s:
        row = s.get(SubjectModel, model_id)
    return row.source if row is not None else None


def sae_path(store: Store, sae_id: str) -> str | None:
    """The directory of a stored SAE (None for an SAE id the database does not know)."""
    from autointerp.store.tables import SAERow

    with store.session() as s:
        row = s.get(SAERow, sae_id)
    return row.path if row is not None else None


def sae_cfg(store: Store, sae_id: str) -> dict[str, Any] | None:
    """The cfg JSON of a stored SAE or transcoder (None for an id the database does not know)."""
    from autointerp.store.tables import SAERow

    with store.session() as s:
        row = s.get(SAERow, sae_id)
    return row.cfg if row is not None and isinstance(row.cfg, dict) else None


def sae_origins(store: Store) -> list[tuple[str, str, dict[str, Any]]]:
    """(SAE id, model id, origin) of every stored SAE fetched by a hub name (its cfg's `origin`: repo, revision,
    SAELens release, id and Neuronpedia id)."""
    from autointerp.store.tables import SAERow

    with store.session() as s:
        rows = s.exec(select(SAERow.id, SAERow.model_id, SAERow.cfg)).all()
    return [(i, m, c["origin"]) for i, m, c in rows if isinstance(c, dict) and isinstance(c.get("origin"), dict)]


def corpus_token_ids(store: Store, corpus_id: str) -> np.ndarray:
    """Every recorded token id of a corpus's contexts (BOS positions left out), concatenated."""
    with store.session() as s:
        blobs = s.exec(select(Context.tokens).where(Context.corpus_id == corpus_id)).all()
    return np.concatenate([unpack_i32(b)[1:] for b in blobs]) if blobs else np.zeros(0, np.int64)


def feature_by_key(store: Store, key: str) -> Feature:
    with store.session() as s:
        return s.exec(select(Feature).where(Feature.key == key)).one()


def features_by_ids(store: Store, ids: Sequence[int]) -> list[Feature]:
    """The features with these row ids, in the order given."""
    with store.session() as s:
        rows = {f.id: f for f in s.exec(select(Feature).where(among(store, col(Feature.id), ids))).all()}
    return [rows[i] for i in ids if i in rows]


def common_errors(store: Store, limit: int = 5) -> list[dict[str, Any]]:
    """The most common failure messages of result rows (explanations, scores, interventions), with counts; the
    messages cut at 160 characters and grouped on their first 80."""
    from autointerp.store.tables import Explanation, InterventionRow, Score

    found: dict[tuple[str, str], int] = {}
    with store.session() as s:
        for where, column, status in (
            ("explain", Explanation.error, Explanation.status),
            ("score", Score.reason, Score.status),
            ("intervene", InterventionRow.error, InterventionRow.status),
        ):
            rows = s.exec(
                select(column, func.count()).where(status == "failed", col(column).is_not(None)).group_by(column)
            ).all()
            for message, n in rows:
                key = (where, str(message)[:80])
                found[key] = found.get(key, 0) + int(n)
    top = sorted(found.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    return [{"where": w, "message": m, "count": n} for (w, m), n in top]
