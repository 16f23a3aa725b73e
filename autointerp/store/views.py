"""SQL views for people who read the database with SQL or open it in Datasette, and the reads behind search
results, `export` and `inspect`.

- `feature_summary`: one row per feature: its statistics, number of ok explanations, best score by each method of
  the registry (autointerp.methods, a column each), the best explanation (by the default method's score, else the
  first) and the feature's verdict (its best explanation's: verified before unverified before contradicted).
- `explanation_scores`: one row per ok explanation and score (explanations without a score once, with NULLs),
  with the feature, the explainer, the interval and n, and the explanation's latest verdict.

A view pins the columns it reads: PostgreSQL refuses to change the type of one (ALTER COLUMN ... TYPE). A migration
that changes `feature`, `explanation`, `score` or `verdict` calls `drop_query_views` first; the next
`ensure_query_schema` makes them again. Each view carries a hash of its definition (a comment inside it on
SQLite, COMMENT ON VIEW on PostgreSQL), so a changed definition replaces the old one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.engine import Connection

from autointerp import methods
from autointerp.store.dialect import dialect_of
from autointerp.store.engine import Store

_LATEST_VERDICT = (
    "(SELECT v.verdict FROM verdict v WHERE v.explanation_id = {e}.id ORDER BY v.created_at DESC, v.id DESC LIMIT 1)"
)
_SUMMARY_COLUMNS = {"feature_id", "feature", "model", "site", "source", "index", "status", "max_act", "mean_act",
                    "density", "n_tokens", "n_explanations", "best_explanation", "verdict"}  # fmt: skip


def views() -> dict[str, str]:
    """Name -> SQL of each view, with one `feature_summary` column per method of the registry (autointerp.methods),
    read at each call: a new method changes the definition's hash, so the next ensure_views makes it again."""
    clash = _SUMMARY_COLUMNS & set(methods.METHODS)
    if clash:
        raise ValueError(f"score method {sorted(clash)[0]!r} would repeat a column of feature_summary: rename it")
    best_per_method = ",\n".join(
        f"  (SELECT max(s.value) FROM score s WHERE s.feature_id = f.id AND s.method = '{m}') AS \"{m}\""
        for m in methods.METHODS
    )
    default = f"(SELECT max(s.value) FROM score s WHERE s.explanation_id = e.id AND s.method = '{methods.DEFAULT}')"
    return {
        "feature_summary": f"""SELECT f.id AS feature_id, f.key AS feature, f.model_id AS model, f.site AS site,
  f.source AS source, f."index" AS "index", f.status AS status, f.max_act AS max_act, f.mean_act AS mean_act,
  f.density AS density, f.n_tokens AS n_tokens,
  (SELECT count(*) FROM explanation e WHERE e.feature_id = f.id AND e.status = 'ok') AS n_explanations,
{best_per_method},
  (SELECT e.text FROM explanation e WHERE e.feature_id = f.id AND e.status = 'ok'
   ORDER BY {default} IS NULL, {default} DESC, e.id LIMIT 1) AS best_explanation,
  (SELECT v.verdict FROM verdict v WHERE v.feature_id = f.id AND v.id = (SELECT v2.id FROM verdict v2
     WHERE v2.explanation_id = v.explanation_id ORDER BY v2.created_at DESC, v2.id DESC LIMIT 1)
   ORDER BY CASE v.verdict WHEN 'verified' THEN 0 WHEN 'unverified' THEN 1 ELSE 2 END LIMIT 1) AS verdict
FROM feature f""",
        "explanation_scores": f"""SELECT e.id AS explanation_id, f.key AS feature, f.model_id AS model, f.site AS site,
  f.source AS source, f."index" AS "index", e.explainer AS explainer, e.model AS explainer_model,
  e.text AS explanation, s.method AS method, s.model AS scorer, s.status AS score_status, s.value AS value,
  s.ci_low AS ci_low, s.ci_high AS ci_high, s.n AS n, s.n_failed AS n_failed, s.reason AS reason,
  {_LATEST_VERDICT.format(e="e")} AS verdict
FROM explanation e JOIN feature f ON f.id = e.feature_id LEFT JOIN score s ON s.explanation_id = e.id
WHERE e.status = 'ok'""",
    }


def _tag(body: str) -> str:
    return "autointerp:" + hashlib.sha256(body.encode()).hexdigest()[:12]


def _stored_tags(conn: Connection) -> dict[str, str]:
    if dialect_of(conn).sqlite:  # the hash is a comment in the view's stored SQL; PostgreSQL's, the view's comment
        rows = conn.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'view'").all()
        tags = {n: _tag(body) for n, body in views().items()}
        return {n: tags[n] if n in tags and tags[n] in (sql or "") else "" for n, sql in rows}
    rows = conn.exec_driver_sql(
        "SELECT c.relname, obj_description(c.oid, 'pg_class') FROM pg_class c "
        "WHERE c.relkind = 'v' AND c.relnamespace = current_schema()::regnamespace"
    ).all()
    return {n: d or "" for n, d in rows}


def views_current(conn: Connection) -> bool:
    tags = _stored_tags(conn)
    return all(tags.get(n) == _tag(body) for n, body in views().items())


def ensure_views(conn: Connection) -> None:
    """(Re)create the views that are missing or of another definition, inside the caller's transaction."""
    tags = _stored_tags(conn)
    for name, body in views().items():
        tag = _tag(body)
        if tags.get(name) == tag:
            continue
        conn.exec_driver_sql(f"DROP VIEW IF EXISTS {name}")
        if dialect_of(conn).sqlite:
            conn.exec_driver_sql(f"CREATE VIEW {name} AS /* {tag} */\n{body}")
        else:
            conn.exec_driver_sql(f"CREATE VIEW {name} AS\n{body}")
            conn.exec_driver_sql(f"COMMENT ON VIEW {name} IS '{tag}'")


def drop_query_views(conn: Connection) -> None:
    """Drop the views (before a migration changes a table they read)."""
    for name in views():
        conn.exec_driver_sql(f"DROP VIEW IF EXISTS {name}")


def _rows(conn: Connection, sql: str, column: str, ids: Sequence[int], **params: Any) -> list[dict[str, Any]]:
    cond, bound = dialect_of(conn).among_sql(column, [int(i) for i in ids], "ids")
    q = text(sql.format(cond=cond)).bindparams(bound)
    return [_plain(dict(r._mapping)) for r in conn.execute(q, params).all()]


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready values whatever the database: times as ISO strings (SQLite returns its stored text, PostgreSQL a
    datetime), JSON columns decoded (SQLite returns their text to a raw query)."""
    for k, v in row.items():
        if isinstance(v, datetime):
            row[k] = v.isoformat()
        elif k in _JSON_COLUMNS and isinstance(v, str):
            row[k] = json.loads(v)
        elif isinstance(v, str) and k.endswith("_at") and " " in v:
            row[k] = v.replace(" ", "T", 1)
    return row


_JSON_COLUMNS = {"histogram", "config", "details"}


# ---------------------------------------------------------------------------------------------- search results
def explanation_details(store: Store, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """For explanation ids: the feature (id, site, source, index, model), explainer, model and text, the best
    score by each method (`scores`) and the latest verdict."""
    if not ids:
        return {}
    with store.engine.connect() as conn:
        rows = _rows(
            conn,
            'SELECT e.id AS explanation_id, f.key AS feature, f.model_id AS model, f.site, f.source, f."index", '
            "e.explainer, e.model AS explainer_model, e.text, "
            f"{_LATEST_VERDICT.format(e='e')} AS verdict "
            "FROM explanation e JOIN feature f ON f.id = e.feature_id WHERE {cond}",
            "e.id",
            ids,
        )
        scores = _rows(
            conn,
            "SELECT explanation_id, method, max(value) AS value FROM score WHERE {cond} AND value IS NOT NULL "
            "GROUP BY explanation_id, method",
            "explanation_id",
            ids,
        )
    out = {r["explanation_id"]: r | {"scores": {}} for r in rows}
    for s in scores:
        out[s["explanation_id"]]["scores"][s["method"]] = float(s["value"])
    return out


# ---------------------------------------------------------------------------------------------- export
_FEATURE_COLS = 'id, key, model_id, site, source, "index", status, max_act, mean_act, density, n_tokens, histogram'


def feature_pages(
    store: Store, *, ids: Sequence[int] | None = None, explained: bool = False, page: int = 1000
) -> Iterator[list[dict[str, Any]]]:
    """Feature rows by id, `page` at a time (keyset pages: memory stays that of one page): those with `ids`, else
    every feature with status ok (and an ok explanation, with `explained`)."""
    if ids is not None:
        ordered = sorted(set(ids))
        for k in range(0, len(ordered), page):
            with store.engine.connect() as conn:
                yield _rows(conn, f"SELECT {_FEATURE_COLS} FROM feature WHERE {{cond}} ORDER BY id", "id",
                            ordered[k : k + page])  # fmt: skip
        return
    extra = (
        " AND EXISTS (SELECT 1 FROM explanation e WHERE e.feature_id = feature.id AND e.status = 'ok')"
        if explained
        else ""
    )
    last = 0
    while True:
        with store.engine.connect() as conn:
            rows = [
                _plain(dict(r._mapping))
                for r in conn.execute(
                    text(
                        f"SELECT {_FEATURE_COLS} FROM feature WHERE id > :last AND status = 'ok'{extra} "
                        "ORDER BY id LIMIT :page"
                    ),
                    {"last": last, "page": page},
                ).all()
            ]
        if not rows:
            return
        yield rows
        last = rows[-1]["id"]


def results_of(
    store: Store, feature_ids: Sequence[int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The ok explanations, their scores and their verdicts (newest first) of the features, in one read."""
    if not feature_ids:
        return [], [], []
    with store.engine.connect() as conn:
        expl = _rows(
            conn,
            "SELECT id, feature_id, explainer, model, prompt, prompt_hash, config_hash, text, created_at "
            "FROM explanation WHERE {cond} AND status = 'ok' AND text IS NOT NULL ORDER BY feature_id, id",
            "feature_id",
            feature_ids,
        )
        scores = _rows(
            conn,
            "SELECT id, explanation_id, method, model, prompt_hash, config_hash, status, value, ci_low, ci_high, n, "
            "n_failed, reason FROM score WHERE {cond} ORDER BY explanation_id, method, id",
            "feature_id",
            feature_ids,
        )
        verdicts = _rows(
            conn,
            "SELECT explanation_id, verdict, reason, causal_value, causal_ci_low, causal_ci_high, act_increase, "
            "correlational_method, correlational_value, config_hash, created_at FROM verdict WHERE {cond} "
            "ORDER BY explanation_id, created_at DESC, id DESC",
            "feature_id",
            feature_ids,
        )
    return expl, scores, verdicts


def reviews_of(store: Store, explanation_ids: Sequence[int]) -> list[dict[str, Any]]:
    """Rows of the `review` table for the explanations (the review page's decisions)."""
    with store.engine.connect() as conn:
        if not explanation_ids:
            return []
        return [_plain(r) for r in _rows(conn, "SELECT * FROM review WHERE {cond}", "explanation_id", explanation_ids)]


# ---------------------------------------------------------------------------------------------- inspect
def feature_sources(store: Store) -> list[tuple[str, str, str]]:
    """(model, site, source) of every collected source with features of status ok."""
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT DISTINCT model_id, site, source FROM feature WHERE status = 'ok' ORDER BY model_id, site, source"
        ).all()
    return [(str(m), str(s), str(src)) for m, s, src in rows]


def skipped_positions(store: Store, model: str) -> int:
    """How many positions after BOS the latest collection of `model` left unrecorded (collect.skip_positions; 0
    for a collection from before the setting)."""
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT config FROM run WHERE stage = 'collect' ORDER BY id DESC").all()
    for (config,) in rows:
        resolved = (json.loads(config) if isinstance(config, str) else config or {}).get("resolved", {})
        if (resolved.get("model") or [None])[0] == model:
            return int(resolved.get("skip_positions", 0))
    return 0


def feature_table(store: Store, model: str, site: str, source: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """For one source: (index -> feature row id, index -> max activation) as arrays over the source's width (row
    id 0 and max 0 where there is no ok feature), and the feature keys by index."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            text(
                'SELECT "index", id, max_act, key FROM feature WHERE model_id = :m AND site = :s AND source = :src '
                "AND status = 'ok'"
            ),
            {"m": model, "s": site, "src": source},
        ).all()
    width = 1 + max((int(r[0]) for r in rows), default=-1)
    ids, maxima, keys = np.zeros(width, np.int64), np.zeros(width, np.float64), [""] * width
    for idx, fid, mx, key in rows:
        ids[idx], maxima[idx], keys[idx] = fid, mx, key
    return ids, maxima, keys


def best_explanations(store: Store, feature_ids: Sequence[int], method: str = methods.DEFAULT) -> dict[int, str]:
    """Each feature's ok explanation with the best `method` score (unscored ones after, then the newest)."""
    if not feature_ids:
        return {}
    with store.engine.connect() as conn:
        rows = _rows(
            conn,
            "SELECT e.feature_id, e.text, (SELECT max(s.value) FROM score s WHERE s.explanation_id = e.id "
            "AND s.method = :method) AS best, e.id FROM explanation e WHERE {cond} AND e.status = 'ok' "
            "AND e.text IS NOT NULL",
            "e.feature_id",
            feature_ids,
            method=method,
        )
    rows.sort(key=lambda r: (r["best"] is None, -(r["best"] or 0.0), -r["id"]))
    out: dict[int, str] = {}
    for r in rows:
        out.setdefault(int(r["feature_id"]), str(r["text"]))
    return out
