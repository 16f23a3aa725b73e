"""`autointerp export`: the results as JSON lines that other tools read, streamed a page of features at a time
(memory stays that of one page, whatever the database holds).

- `jsonl`: one object per feature: id, model, site, source, index, status, statistics (max, mean, density,
  tokens, histogram), every ok explanation with its explainer, model, prompt and hashes, each with every score
  (method, scorer model, hashes, status, value, interval, n, n_failed, reason; not the per-record details) and its
  latest verdict; the feature's verdict (its best explanation's); and its `reviews` (the review page's decisions).
  With `min_score`, only features whose best `method` score reaches it.
- `neuronpedia`: one object per ok explanation in the field names of Neuronpedia's explanation records: modelId,
  layer (Neuronpedia's source id: LAYER-KIND-SOURCE, e.g. `12-mlp-post-neurons`, `12-resid-post-<sae id>`),
  index (a string), description, explanationModelName, typeName (`autointerp-<explainer>`). With `min_score`,
  only explanations whose best `method` score reaches it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from autointerp import methods
from autointerp.store.engine import Store
from autointerp.store.queries import select_features
from autointerp.store.search import QueryError, check_method
from autointerp.store.views import feature_pages, results_of, reviews_of

Format = Literal["jsonl", "neuronpedia"]
FORMATS = ("jsonl", "neuronpedia")
_RANK = {"verified": 0, "unverified": 1, "contradicted": 2}
PAGE = 1000  # features read per round trip


@dataclass(frozen=True)
class ExportSummary:
    features: int
    records: int  # lines written: features (jsonl) or explanations (neuronpedia)


def neuronpedia_layer(site: str, source: str) -> str:
    """blocks.12.mlp.post + neurons -> 12-mlp-post-neurons (Neuronpedia names a source LAYER-NAME)."""
    parts = site.split(".")
    layer = parts[1] if len(parts) > 2 and parts[0] == "blocks" else site
    return "-".join([layer, *parts[2:], source]).replace(".", "-")


def _pages(store: Store, selector: str | None, page: int) -> Iterator[list[dict[str, Any]]]:
    sel = (selector or "all").strip()
    if sel in ("all", "explained"):
        yield from feature_pages(store, explained=sel == "explained", page=page)
    else:  # ids, sites or sources: resolved (and checked) first, then read a page at a time
        ids = [f.id for f in select_features(store, sel) if f.id is not None]
        yield from feature_pages(store, ids=ids, page=page)


def feature_objects(
    store: Store,
    selector: str | None = None,
    *,
    method: str = methods.DEFAULT,
    min_score: float | None = None,
    page: int = PAGE,
) -> Iterator[dict[str, Any]]:
    """The jsonl objects, by feature id, read `page` features at a time."""
    check_method(method)
    for page_rows in _pages(store, selector, page):
        page_ids = [f["id"] for f in page_rows]
        expl, scores, verdicts = results_of(store, page_ids)
        reviews = reviews_of(store, [e["id"] for e in expl])
        by_expl: dict[int, list[dict[str, Any]]] = {}
        for s in scores:
            by_expl.setdefault(s.pop("explanation_id"), []).append(s)
        latest: dict[int, dict[str, Any]] = {}
        for v in verdicts:  # newest first: the first seen is the latest
            latest.setdefault(v.pop("explanation_id"), v)
        of_feature: dict[int, list[dict[str, Any]]] = {}
        for e in expl:
            e["scores"] = by_expl.get(e["id"], [])
            e["verdict"] = latest.get(e["id"])
            e["reviews"] = [r for r in reviews if r.get("explanation_id") == e["id"]]
            of_feature.setdefault(e.pop("feature_id"), []).append(e)
        for f in page_rows:
            es = of_feature.get(f["id"], [])
            if min_score is not None and not any(
                s["value"] is not None and s["value"] >= min_score
                for e in es
                for s in e["scores"]
                if s["method"] == method
            ):
                continue
            judged = [e["verdict"] for e in es if e["verdict"] is not None]
            yield {
                "id": f["key"],
                "model": f["model_id"],
                "site": f["site"],
                "source": f["source"],
                "index": f["index"],
                "status": f["status"],
                "statistics": {k: f[k] for k in ("max_act", "mean_act", "density", "n_tokens", "histogram")},
                "explanations": es,
                "verdict": min(judged, key=lambda v: _RANK.get(v["verdict"], 9))["verdict"] if judged else None,
            }


def neuronpedia_records(feat: dict[str, Any], method: str, min_score: float | None) -> list[dict[str, Any]]:
    """The Neuronpedia records of one feature object (one per explanation that passes `min_score`)."""
    out = []
    for e in feat["explanations"]:
        if min_score is not None and not any(
            s["method"] == method and s["value"] is not None and s["value"] >= min_score for s in e["scores"]
        ):
            continue
        out.append(
            {
                "modelId": feat["model"],
                "layer": neuronpedia_layer(feat["site"], feat["source"]),
                "index": str(feat["index"]),
                "description": e["text"],
                "explanationModelName": e["model"] or f"autointerp-{e['explainer']}",
                "typeName": f"autointerp-{e['explainer']}",
            }
        )
    return out


def export(
    store: Store,
    out: TextIO,
    *,
    fmt: str = "jsonl",
    selector: str | None = None,
    method: str = methods.DEFAULT,
    min_score: float | None = None,
    page: int = PAGE,
) -> ExportSummary:
    """Write the export as JSON lines to `out`."""
    if fmt not in FORMATS:
        raise QueryError(f"unknown export format {fmt!r}: choose {', '.join(FORMATS)}")
    n_feat = n_rec = 0
    if fmt == "jsonl":
        for obj in feature_objects(store, selector, method=method, min_score=min_score, page=page):
            out.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n_feat += 1
        return ExportSummary(n_feat, n_feat)
    for feat in feature_objects(store, selector, method=method, page=page):
        recs = neuronpedia_records(feat, method, min_score)
        n_feat += bool(recs)
        n_rec += len(recs)
        out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    return ExportSummary(n_feat, n_rec)


def export_to_file(store: Store, path: str | Path, **kw: Any) -> ExportSummary:
    """`export` into a file, replaced only once the export is complete (a temporary file renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            summary = export(store, f, **kw)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return summary
