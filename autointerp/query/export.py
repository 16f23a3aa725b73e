"""`autointerp export`: the results as JSON lines that other tools read, streamed a page of features at a time
(memory stays that of one page, whatever the database holds).

- `jsonl`: one object per feature: id, model, site, source, index, status, statistics (max, mean, density,
  tokens, histogram), every ok explanation with its explainer, model, prompt and hashes, each with every score
  (method, scorer model, hashes, status, value, interval, n, n_failed, reason; not the per-record details) and its
  latest verdict; the feature's verdict (its best explanation's); and its `reviews` (the review page's decisions).
  With `min_score`, only features whose best `method` score reaches it.
- `neuronpedia`: one object per ok explanation in the field names of Neuronpedia's explanation records: modelId,
  layer (Neuronpedia's source id: LAYER-KIND-SOURCE, e.g. `12-mlp-post-neurons`, `12-resid-post-<sae id>`; for an
  SAE of a SAELens release that names its Neuronpedia id, that source id, and that model id for the model),
  index (a string), description, explanationModelName, typeName (`autointerp-<explainer>`). With `min_score`,
  only explanations whose best `method` score reaches it.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from autointerp import methods
from autointerp.store.engine import Store
from autointerp.store.queries import sae_origins, select_features
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


def neuronpedia_ids(store: Store) -> tuple[dict[str, str], dict[str, str]]:
    """Neuronpedia's own ids where an SAE's origin names one (a SAELens release's `neuronpedia`: MODEL/SOURCE, kept
    in the sae row's cfg.origin): {SAE id: source id}, {stored model id: Neuronpedia model id}."""
    sources: dict[str, str] = {}
    models: dict[str, str] = {}
    for sae_id, model_id, origin in sae_origins(store):
        np_id = origin.get("neuronpedia_id")
        if isinstance(np_id, str) and np_id.count("/") == 1:
            model, source = np_id.split("/")
            sources[sae_id] = source
            models.setdefault(model_id, model)
    return sources, models


def neuronpedia_records(
    feat: dict[str, Any],
    method: str,
    min_score: float | None,
    ids: tuple[dict[str, str], dict[str, str]] = ({}, {}),
) -> list[dict[str, Any]]:
    """The Neuronpedia records of one feature object (one per explanation that passes `min_score`); `ids`: the
    Neuronpedia source and model ids known (neuronpedia_ids), used instead of ours."""
    sources, models = ids
    out = []
    for e in feat["explanations"]:
        if min_score is not None and not any(
            s["method"] == method and s["value"] is not None and s["value"] >= min_score for s in e["scores"]
        ):
            continue
        out.append(
            {
                "modelId": models.get(feat["model"], feat["model"]),
                "layer": sources.get(feat["source"]) or neuronpedia_layer(feat["site"], feat["source"]),
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
    if min_score is not None and not math.isfinite(min_score):
        raise QueryError(f"--min-score must be a finite number, not {min_score}")
    n_feat = n_rec = 0
    if fmt == "jsonl":
        for obj in feature_objects(store, selector, method=method, min_score=min_score, page=page):
            out.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n_feat += 1
        return ExportSummary(n_feat, n_feat)
    ids = neuronpedia_ids(store)
    for feat in feature_objects(store, selector, method=method, page=page):
        recs = neuronpedia_records(feat, method, min_score, ids)
        n_feat += bool(recs)
        n_rec += len(recs)
        out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    return ExportSummary(n_feat, n_rec)


def export_to_file(store: Store, path: str | Path, **kw: Any) -> ExportSummary:
    """`export` into `path`, never clobbering what is there:

    - a regular file, or a new file in a directory that exists: written to a temporary file beside it, renamed
      over it once the export is complete (a failure leaves the old file as it was); the file keeps its mode, a
      new one gets the mode a plain create gives (0666 less the umask);
    - a symlink: its target is written, by the rule above for what it points to (the link stays a link);
    - `-`, a FIFO or a character device (/dev/stdout, /dev/null, a terminal): written in place, streamed (a
      device stays a device);
    - a directory, a missing directory, another kind of file (a socket, a block device) or a place that cannot be
      written: QueryError naming the path, nothing written."""
    if str(path) == "-":
        return export(store, sys.stdout, **kw)
    fd = _fd_of(str(path))
    if fd is not None:  # this process's open file: written where it points, as the shell opened it (no truncation)
        try:
            with os.fdopen(os.dup(fd), "w", encoding="utf-8") as f:
                return export(store, f, **kw)
        except OSError as exc:
            raise QueryError(f"cannot write the export to {path}: {exc.strerror or exc}") from None
    given = Path(path)
    real = Path(os.path.realpath(given))  # through every symlink: the file that is written
    shown = str(given) if real == given.absolute() else f"{given} (-> {real})"
    try:
        st = real.stat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise QueryError(f"cannot write the export to {shown}: {exc.strerror or exc}") from None
    if st is not None and (stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        return _export_streamed(store, real, shown, **kw)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise QueryError(f"--out {shown} is a directory: give a file name inside it")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise QueryError(f"--out {shown} is not a regular file, a pipe or a character device: not written")
    if not real.parent.is_dir():
        raise QueryError(f"cannot write the export to {shown}: the directory {real.parent} does not exist")
    if st is not None and not os.access(real, os.W_OK):
        raise QueryError(f"cannot write the export to {shown}: the file is not writable")
    mode = stat.S_IMODE(st.st_mode) if st is not None else None
    return _export_replacing(store, real, shown, mode, **kw)


_FD_PATH = re.compile(r"^/(?:dev/fd|proc/self/fd|proc/(\d+)/fd)/(\d+)$")
_STD = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}


def _fd_of(path: str) -> int | None:
    """The file descriptor of this process a path names (/dev/stdout, /dev/fd/N, /proc/self/fd/N): such a path
    leads to whatever the descriptor is (a pipe, a terminal, a file opened for appending), which reopening or
    replacing by name would get wrong."""
    if path in _STD:
        return _STD[path]
    m = _FD_PATH.match(path)
    if m is None or (m.group(1) is not None and int(m.group(1)) != os.getpid()):
        return None
    return int(m.group(2))


def _export_streamed(store: Store, real: Path, shown: str, **kw: Any) -> ExportSummary:
    try:
        with real.open("w", encoding="utf-8") as f:
            return export(store, f, **kw)
    except OSError as exc:
        raise QueryError(f"cannot write the export to {shown}: {exc.strerror or exc}") from None


def _export_replacing(store: Store, real: Path, shown: str, mode: int | None, **kw: Any) -> ExportSummary:
    """Into a temporary file beside `real`, renamed over it when complete. Created with mode 0666, so the umask
    applies as to any new file (mkstemp's 0600 would not); an existing file's `mode` is given to it."""
    tmp = real.with_name(f".{real.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise QueryError(f"cannot write the export to {shown}: {exc.strerror or exc}") from None
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            summary = export(store, f, **kw)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it the file
        os.replace(tmp, real)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise QueryError(f"cannot write the export to {shown}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return summary
