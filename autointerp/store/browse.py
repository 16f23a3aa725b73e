"""The review page's feature list: filters, sorts and keyset pages that stay fast at 100k+ features.

A page is asked for by a cursor (the last row's sort value and id), never an offset: page 1,000 costs what page 1
costs. Sorted by a statistic, the feature table is read along an index on (statistic, id). Sorted by score, the
(method, value) score index is read best first, keeping a feature's best row only (no better row of the same
feature exists, which the (method, feature, value) index answers), then the unscored features by id. The indexes
are made with the query schema when the store is opened for writing: a reader never writes, so the list also
works on a read-only database.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from autointerp.store.engine import Store
from autointerp.store.queries import FeatureSummary
from autointerp.store.search import Filters, QueryError, filter_sql

SORTS = {"max": ("max_act", "desc"), "density": ("density", "desc"), "mean": ("mean_act", "desc"),
         "index": ('"index"', "asc"), "score": ("", "desc")}  # fmt: skip
REVIEW_STATES = {"reviewed": None, "unreviewed": None, "accepted": ("accept",), "rejected": ("reject",),
                 "edited": ("edit",), "flagged": ("flag",)}  # fmt: skip
_MAX_ID = 2**63 - 1


@dataclass(frozen=True)
class ListQuery:
    site: str | None = None
    source: str | None = None
    status: str | None = None
    explainer: str | None = None
    method: str = "simulation"
    min_score: float | None = None
    max_score: float | None = None
    verdict: str | None = None
    review: str | None = None  # one of REVIEW_STATES
    sort: str = "score"

    def checked(self) -> ListQuery:
        Filters(method=self.method, min_score=self.min_score, max_score=self.max_score, verdict=self.verdict).checked()
        if self.sort not in SORTS:
            raise QueryError(f"unknown sort {self.sort!r}: choose {', '.join(SORTS)}")
        if self.review is not None and self.review not in REVIEW_STATES:
            raise QueryError(f"unknown review state {self.review!r}: choose {', '.join(REVIEW_STATES)}")
        return self


@dataclass(frozen=True)
class ListRow:
    feature: FeatureSummary
    db_id: int
    decisions: dict[str, int] = field(default_factory=dict)  # review decisions on its explanations, by kind


@dataclass(frozen=True)
class Page:
    rows: list[ListRow]
    next_cursor: str | None  # None on the last page


def _parse(cursor: str | None) -> tuple[str, float, int] | None:
    if not cursor:
        return None
    try:
        kind, value, ident = cursor.split(":", 2)
        number, row = float(value), int(ident)
        if kind not in ("c", "s", "u") or not math.isfinite(number) or not 0 <= row <= _MAX_ID:
            raise ValueError(kind)
        return kind, number, row
    except ValueError:
        raise QueryError(f"bad page cursor {cursor!r}: follow the page links") from None


def list_page(store: Store, q: ListQuery, cursor: str | None = None, limit: int = 50) -> Page:
    """One page of features matching `q`, after `cursor` (from the previous page's `next_cursor`)."""
    q = q.checked()
    if not 1 <= limit <= 500:
        raise QueryError(f"page size must be 1 to 500, not {limit}")
    at = _parse(cursor)
    with store.engine.connect() as conn:
        conds: list[str] = ["1 = 1"]
        p: dict[str, Any] = {"m": q.method}
        for name in ("site", "source", "status"):
            if getattr(q, name) is not None:
                conds.append(f"f.{name} = :{name}")
                p[name] = getattr(q, name)
        if q.review is not None:
            kinds = REVIEW_STATES[q.review]
            sub = "SELECT feature_id FROM review" + ("" if kinds is None else " WHERE decision = :rv")
            conds.append(f"f.id {'NOT ' if q.review == 'unreviewed' else ''}IN ({sub})")
            if kinds is not None:
                p["rv"] = kinds[0]
        expl_cond = ""
        if q.explainer is not None or q.verdict is not None:
            where, fp = filter_sql(Filters(explainer=q.explainer, verdict=q.verdict), e="e", feat=None)
            p.update(fp)
            expl_cond = f"SELECT e.id FROM explanation e WHERE {where}"
            conds.append(f"f.id IN (SELECT e.feature_id FROM explanation e WHERE {where})")
        on_feature = " AND ".join(conds)
        counted = "{s}.method = :m AND {s}.value IS NOT NULL" + (
            f" AND {{s}}.explanation_id IN ({expl_cond})" if expl_cond else "")  # fmt: skip
        bounded = q.min_score is not None or q.max_score is not None
        picked: list[tuple[int, float | None, str]] = []  # feature id, best score, cursor of the row
        if q.sort != "score":
            column, direction = SORTS[q.sort]
            extra = ""
            if bounded:
                best = f"(SELECT max(s.value) FROM score s WHERE s.feature_id = f.id AND {counted.format(s='s')})"
                if q.min_score is not None:
                    extra += f" AND {best} >= :lo"
                    p["lo"] = q.min_score
                if q.max_score is not None:
                    extra += f" AND {best} <= :hi"
                    p["hi"] = q.max_score
            if at is not None:
                cmp = "<" if direction == "desc" else ">"
                extra += f" AND (f.{column} {cmp} :cv OR (f.{column} = :cv AND f.id > :cid))"
                p |= {"cv": at[1], "cid": at[2]}
            sql = (f"SELECT f.id, f.{column} FROM feature f WHERE {on_feature}{extra} "
                   f"ORDER BY f.{column} {direction.upper()}, f.id LIMIT {limit + 1}")  # fmt: skip
            picked = [(int(i), None, f"c:{float(v)!r}:{int(i)}") for i, v in conn.execute(text(sql), p)]
        else:
            if at is None or at[0] == "s":
                extra = ""
                if q.min_score is not None:
                    extra += " AND s.value >= :lo"
                    p["lo"] = q.min_score
                if q.max_score is not None:
                    extra += " AND s.value <= :hi"
                    p["hi"] = q.max_score
                if at is not None:
                    extra += " AND (s.value < :cv OR (s.value = :cv AND s.feature_id > :cid))"
                    p |= {"cv": at[1], "cid": at[2]}
                sql = (
                    f"SELECT s.feature_id, s.value FROM score s JOIN feature f ON f.id = s.feature_id "
                    f"WHERE {counted.format(s='s')} AND {on_feature}{extra} AND NOT EXISTS (SELECT 1 FROM score t "
                    f"WHERE t.feature_id = s.feature_id AND {counted.format(s='t')} AND (t.value > s.value OR "
                    f"(t.value = s.value AND t.id < s.id))) ORDER BY s.value DESC, s.feature_id LIMIT {limit + 1}"
                )
                picked = [(int(i), float(v), f"s:{float(v)!r}:{int(i)}") for i, v in conn.execute(text(sql), p)]
            if not bounded and len(picked) <= limit:  # then the features without a score, by id
                after = at[2] if at is not None and at[0] == "u" else -1
                sql = (f"SELECT f.id FROM feature f WHERE {on_feature} AND f.id > :uid AND f.id NOT IN "
                       f"(SELECT s.feature_id FROM score s WHERE {counted.format(s='s')}) "
                       f"ORDER BY f.id LIMIT {limit + 1 - len(picked)}")  # fmt: skip
                picked += [(int(i), None, f"u:0:{int(i)}") for (i,) in conn.execute(text(sql), p | {"uid": after})]
        more = len(picked) > limit
        picked = picked[:limit]
        rows = _rows(conn, picked, counted, p)
    return Page(rows, picked[-1][2] if more and picked else None)


def _rows(conn: Any, picked: list[tuple[int, float | None, str]], counted: str, p: dict[str, Any]) -> list[ListRow]:
    """The page's features with their best score and its explanation, and their review counts."""
    ids = [i for i, _v, _c in picked]
    if not ids:
        return []
    marks = ", ".join(str(i) for i in ids)  # ints read from the database
    cols = 'id, key, site, source, "index", model_id, status, max_act, mean_act, density, n_tokens'
    feats = {int(r[0]): r for r in conn.exec_driver_sql(f"SELECT {cols} FROM feature WHERE id IN ({marks})")}
    best: dict[int, tuple[float, str]] = {}
    sql = (f"SELECT s.feature_id, s.value, e.text FROM score s JOIN explanation e ON e.id = s.explanation_id "
           f"WHERE s.feature_id IN ({marks}) AND {counted.format(s='s')}")  # fmt: skip
    for fid, v, t in conn.execute(text(sql), {k: v for k, v in p.items() if k in ("m",) or k.startswith("q_")}):
        if int(fid) not in best or float(v) > best[int(fid)][0]:
            best[int(fid)] = (float(v), t)
    decisions: dict[int, dict[str, int]] = {}
    for fid, d, n in conn.exec_driver_sql(
        f"SELECT feature_id, decision, count(*) FROM review WHERE feature_id IN ({marks}) GROUP BY feature_id, decision"
    ):
        decisions.setdefault(int(fid), {})[d] = int(n)
    out = []
    for i in ids:
        r = feats[i]
        b = best.get(i)
        summary = FeatureSummary(r[1], r[2], r[3], int(r[4]), r[5], r[6], float(r[7]), float(r[8]), float(r[9]),
                                 int(r[10]), None if b is None else b[0], None if b is None else b[1])  # fmt: skip
        out.append(ListRow(summary, i, decisions.get(i, {})))
    return out
