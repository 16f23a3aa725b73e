"""The feature list, the one query behind the review page's list and `features list`: filters, sorts and keyset
pages that stay fast at 100k+ features.

A page is asked for by a cursor (the last row's sort value and id), never an offset: page 1,000 costs what page 1
costs (`queries.list_features`, the CLI's list, reads the first rows the same way). Sorted by a statistic, the
feature table is read along an index on (statistic, id). Sorted by score, the (method, value) score index is read
best first, keeping a feature's best row only (no better row of the same feature exists, which the (method,
feature, value) index answers), then the unscored features by id. The indexes are made with the query schema when
the store is opened for writing: a reader never writes, so the list also works on a read-only database.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from autointerp.store.engine import Store
from autointerp.store.queries import FeatureSummary
from autointerp.store.search import Filters, QueryError, filter_sql

# sort name -> (feature column, direction); "score": the best score of the list's method, unscored features last
SORTS = {"max": ("max_act", "desc"), "density": ("density", "desc"), "mean": ("mean_act", "desc"),
         "index": ('"index"', "asc"), "score": ("", "desc")}  # fmt: skip
REVIEW_STATES = {"reviewed": None, "unreviewed": None, "accepted": ("accept",), "rejected": ("reject",),
                 "edited": ("edit",), "flagged": ("flag",)}  # fmt: skip
_MAX_ID = 2**63 - 1


def check_sort(sort: str) -> None:
    """A sort of SORTS (QueryError otherwise): the one check of a sort's name, the CLI's flag included."""
    if sort not in SORTS:
        raise QueryError(f"unknown sort {sort!r}: choose {', '.join(SORTS)}")


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
        check_sort(self.sort)
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
    with store.engine.connect() as conn:
        picked, counted, p = _pick(conn, q, _parse(cursor), limit + 1)
        more = len(picked) > limit
        picked = picked[:limit]
        rows = _rows(conn, picked, counted, p)
    return Page(rows, picked[-1][2] if more and picked else None)


def first_rows(store: Store, q: ListQuery, n: int | None) -> list[ListRow]:
    """The first `n` features matching `q` (None: all), as pages would give them, without their review counts."""
    q = q.checked()
    with store.engine.connect() as conn:
        picked, counted, p = _pick(conn, q, None, n)
        return _rows(conn, picked, counted, p, decisions=False)


Picked = list[tuple[int, float | None, str]]  # feature id, best score, cursor of the row


def _pick(
    conn: Any, q: ListQuery, at: tuple[str, float, int] | None, n: int | None
) -> tuple[Picked, str, dict[str, Any]]:
    """Up to `n` (None: all) features matching `q` after `at`, in order; with the condition on the score rows that
    count (its `{s}` the score alias) and the parameters of both."""
    limit = "" if n is None else f" LIMIT {int(n)}"
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
    on_row = " AND ".join(conds)  # conditions on the feature's own row
    on_feature, counted = on_row, "{s}.method = :m AND {s}.value IS NOT NULL"  # the score rows that count
    if q.explainer is not None or q.verdict is not None:
        # correlated, not IN lists over every explanation and verdict: a page reads a few rows, and looks up each
        # one's explanation by its key and that one's latest verdict (an IN list nested in these correlated
        # subqueries is also computed again for every row by SQLite)
        where, fp = filter_sql(Filters(explainer=q.explainer, verdict=q.verdict), e="e", feat=None, per_row=True)
        p.update(fp)
        on_feature += f" AND EXISTS (SELECT 1 FROM explanation e WHERE e.feature_id = f.id AND {where})"
        counted += f" AND EXISTS (SELECT 1 FROM explanation e WHERE e.id = {{s}}.explanation_id AND {where})"
    bounded = q.min_score is not None or q.max_score is not None
    picked: Picked = []
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
               f"ORDER BY f.{column} {direction.upper()}, f.id{limit}")  # fmt: skip
        picked = [(int(i), None, f"c:{float(v)!r}:{int(i)}") for i, v in conn.execute(text(sql), p)]
    else:
        if at is None or at[0] == "s":  # a counted score row is of a feature with a filtered explanation: on_row
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
                f"WHERE {counted.format(s='s')} AND {on_row}{extra} AND NOT EXISTS (SELECT 1 FROM score t "
                f"WHERE t.feature_id = s.feature_id AND {counted.format(s='t')} AND (t.value > s.value OR "
                f"(t.value = s.value AND t.id < s.id))) ORDER BY s.value DESC, s.feature_id{limit}"
            )
            picked = [(int(i), float(v), f"s:{float(v)!r}:{int(i)}") for i, v in conn.execute(text(sql), p)]
        if not bounded and (n is None or len(picked) < n):  # then the features without a score, by id
            after = at[2] if at is not None and at[0] == "u" else -1
            rest = "" if n is None else f" LIMIT {int(n) - len(picked)}"
            sql = (f"SELECT f.id FROM feature f WHERE {on_feature} AND f.id > :uid AND NOT EXISTS "
                   f"(SELECT 1 FROM score s WHERE s.feature_id = f.id AND {counted.format(s='s')}) "
                   f"ORDER BY f.id{rest}")  # fmt: skip
            picked += [(int(i), None, f"u:0:{int(i)}") for (i,) in conn.execute(text(sql), p | {"uid": after})]
    return picked, counted, p


_CHUNK = 10_000  # feature ids per statement of a page's details (`features list --all` reads every feature)


def _rows(conn: Any, picked: Picked, counted: str, p: dict[str, Any], decisions: bool = True) -> list[ListRow]:
    """The features picked, with their best score (ties: the first score row) and its explanation, and (with
    `decisions`) their review counts."""
    ids = [i for i, _v, _c in picked]
    feats: dict[int, Any] = {}
    best: dict[int, tuple[float, int, str]] = {}
    by_kind: dict[int, dict[str, int]] = {}
    cols = 'id, key, site, source, "index", model_id, status, max_act, mean_act, density, n_tokens'
    score_params = {k: v for k, v in p.items() if k == "m" or k.startswith("q_")}
    for k in range(0, len(ids), _CHUNK):
        marks = ", ".join(str(i) for i in ids[k : k + _CHUNK])  # ints read from the database
        feats |= {int(r[0]): r for r in conn.exec_driver_sql(f"SELECT {cols} FROM feature WHERE id IN ({marks})")}
        sql = (f"SELECT s.feature_id, s.value, s.id, e.text FROM score s JOIN explanation e ON e.id = s.explanation_id "
               f"WHERE s.feature_id IN ({marks}) AND {counted.format(s='s')}")  # fmt: skip
        for fid, v, sid, t in conn.execute(text(sql), score_params):
            old = best.get(int(fid))
            if old is None or (float(v), -int(sid)) > (old[0], -old[1]):
                best[int(fid)] = (float(v), int(sid), t)
        if decisions:
            for fid, d, n in conn.exec_driver_sql(
                f"SELECT feature_id, decision, count(*) FROM review WHERE feature_id IN ({marks}) "
                "GROUP BY feature_id, decision"
            ):
                by_kind.setdefault(int(fid), {})[d] = int(n)
    out = []
    for i in ids:
        r = feats[i]
        b = best.get(i)
        summary = FeatureSummary(r[1], r[2], r[3], int(r[4]), r[5], r[6], float(r[7]), float(r[8]), float(r[9]),
                                 int(r[10]), None if b is None else b[0], None if b is None else b[2])  # fmt: skip
        out.append(ListRow(summary, i, by_kind.get(i, {})))
    return out
