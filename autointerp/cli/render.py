"""Terminal and JSON rendering of the query commands' answers: features list, usage, status, search and inspect
(kept readable in 80 columns: ids are never cut). `features show` is drawn by show.py, progress by progress.py."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from rich import box
from rich.table import Table
from rich.text import Text

from autointerp.methods import short
from autointerp.records import glyphs

if TYPE_CHECKING:
    from autointerp.run.status import JobStatus
    from autointerp.store.queries import FeatureSummary


def features_json(rows: Sequence[FeatureSummary]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=1)


def features_table(rows: Sequence[FeatureSummary], width: int = 80) -> Table:
    """Features as a table that stays readable in `width` columns: ids are never wrapped or cut (the model prefix
    moves to the title when every row shares it; a unique suffix of an id is enough for `features show`). The
    explanation gets a column of its own when it fits beside the figures, else a line under its feature."""
    models = {r.model for r in rows}
    strip = len(models) == 1
    show_status = any(r.status != "ok" for r in rows)
    scored = any(r.score is not None for r in rows)
    names = ["id"] + (["status"] if show_status else []) + ["max", "mean", "density"] + (["score"] if scored else [])
    body: list[tuple[list[str], str]] = []
    for r in rows:
        ident = r.id[len(r.model) + 1 :] if strip and r.id.startswith(r.model + "/") else r.id
        cells = [ident] + ([r.status] if show_status else []) + [f"{r.max:.3g}", f"{r.mean:.3g}", f"{r.density:.1%}"]
        cells += ["" if r.score is None else f"{r.score:.3f}"] if scored else []
        body.append((cells, r.explanation or ""))
    widths = [max([len(n), *(len(c[k]) for c, _ in body)]) for k, n in enumerate(names)]
    room = width - sum(widths) - 2 * len(widths) - 3  # what is left for an explanation column beside the figures
    beside = scored and room >= 20
    title = f"model {next(iter(models))}" if strip and rows else None
    t = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False)
    for k, (name, w) in enumerate(zip(names, widths, strict=True)):
        t.add_column(name, justify="left" if k == 0 or name == "status" else "right", min_width=w, no_wrap=k > 0)
    if beside:
        t.add_column("explanation", overflow="ellipsis", no_wrap=True, max_width=room)
    for cells, text in body:
        if beside:
            t.add_row(*cells, text)
            continue
        t.add_row(*cells)
        if text:
            t.add_row(Text("  " + text, style="dim"), *[""] * (len(names) - 1))
    return t


def usage_json(rows: Sequence[Any]) -> str:
    return json.dumps(
        {
            "calls": sum(r.calls for r in rows),
            "errors": sum(r.errors for r in rows),
            "prompt_tokens": sum(r.prompt_tokens for r in rows),
            "completion_tokens": sum(r.completion_tokens for r in rows),
            "cost_usd": round(sum(r.cost_usd for r in rows), 6),
            "by_model": [asdict(r) for r in rows],
        },
        indent=1,
    )


def usage_table(rows: Sequence[Any]) -> Table:
    """LLM usage by backend, model and stage, within 80 columns: the LLM goes in the title when every row shares
    it (the usual case), else in a column of its own."""
    llms = {f"{r.backend}:{r.model}" for r in rows}
    shared = len(llms) == 1
    t = Table(box=box.SIMPLE_HEAD, title=f"LLM usage: {next(iter(llms))}" if shared else "LLM usage")
    names = ([] if shared else ["llm"]) + ["stage", "calls", "errors", "prompt tok", "compl. tok", "cost $", "s/call"]
    for name in names:
        t.add_column(name, justify="left" if name in ("llm", "stage") else "right", overflow="fold")
    for r in rows:
        cells = [
            r.stage,
            str(r.calls),
            str(r.errors),
            f"{r.prompt_tokens:,}",
            f"{r.completion_tokens:,}",
            f"{r.cost_usd:.4f}",
            f"{r.mean_latency_s:.2f}",
        ]
        t.add_row(*([] if shared else [f"{r.backend}:{r.model}"]), *cells)
    return t


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def status_lines(st: JobStatus) -> list[str]:
    """The status as plain lines for a terminal or a log."""
    if not st.stages:
        return ["no job has run on this database yet (autointerp run starts one)"]
    lines = [f"{'stage':<10} {'done':>7} {'ok':>7} {'failed':>7} {'skipped':>7} {'pending':>8} {'running':>8}"
             f" {'per min':>8} {'ETA':>8}"]  # fmt: skip
    for s in st.stages:
        eta = "-" if s.pending + s.in_progress == 0 else _clock(s.eta_s)  # nothing left: no ETA to give
        lines.append(f"{s.stage:<10} {s.done:>7} {s.ok:>7} {s.failed:>7} {s.skipped:>7} {s.pending:>8}"
                     f" {s.in_progress:>8} {s.per_minute:>8.2f} {eta:>8}")  # fmt: skip
    sp = st.spend
    lines.append(f"LLM: {sp['calls']} calls, {sp['prompt_tokens'] + sp['completion_tokens']:,} tokens, "
                 f"${sp['cost_usd']:.4f}")  # fmt: skip
    alive = [w for w in st.workers if w["alive"] and w["running"]]
    silent = [w for w in st.workers if w["running"] and not w["alive"]]
    lines.append(f"workers alive: {', '.join(w['worker'] for w in alive) or 'none'}"
                 + (f"; silent (dead?): {', '.join(w['worker'] for w in silent)}" if silent else ""))  # fmt: skip
    for e in st.errors:
        lines.append(f"  {e['count']:>5} x {e['where']}: {e['message']}")
    return lines


_VERDICT_STYLE = {"verified": "green", "contradicted": "red", "unverified": "yellow"}


def _shared_model(ids: list[tuple[str, str]]) -> str | None:
    models = {m for _i, m in ids}
    return next(iter(models)) if len(models) == 1 else None


def _short(feature: str, model: str | None) -> str:
    return feature[len(model) + 1 :] if model and feature.startswith(model + "/") else feature


def search_json(result: Any) -> str:
    return json.dumps(asdict(result), indent=1, ensure_ascii=False)


def search_lines(result: Any) -> list[Text]:
    """A head line (how many, how found), then per hit: rank, feature, scores, verdict, explainer; the snippet."""
    hits = result.hits
    model = _shared_model([(h.feature, h.model) for h in hits])
    how = "by meaning" if result.mode == "semantic" else "by full text"
    if result.fallback:
        how = "by meaning (no explanation contains those words)"
    head = Text(f"{len(hits)} explanation{'s' * (len(hits) != 1)} for {result.query!r}, {how}", style="bold")
    if model:
        head.append(f"; model {model}", style="dim")
    lines = [head]
    for rank, h in enumerate(hits, 1):
        line = Text(f"{rank:>3}. ")
        line.append(_short(h.feature, model), style="bold")
        scores = "  ".join(f"{short(m)} {v:.2f}" for m, v in sorted(h.scores.items()))
        if scores:
            line.append(f"  {scores}")
        if h.verdict:
            line.append(f"  {h.verdict}", style=_VERDICT_STYLE.get(h.verdict, ""))
        who = h.explainer + (f" {h.explainer_model}" if h.explainer_model else "")
        rel = f"cos {h.relevance:.2f}" if result.mode == "semantic" else f"rank {h.relevance:.2f}"
        line.append(f"  ({who}; {rel})", style="dim")
        lines.append(line)
        lines.append(Text("     " + h.snippet))
    return lines


def inspect_json(result: Any) -> str:
    return json.dumps(asdict(result), indent=1, ensure_ascii=False)


def inspect_lines(result: Any) -> list[Text]:
    """A head line (model, tokens, windows, sources), then per token its string and the features firing on it."""
    windows = (
        f"{result.n_windows} windows of at most {result.window} tokens (the model's context), each read with its "
        "own BOS"
        if result.n_windows > 1
        else "one window"
    )
    head = Text(f"model {result.model}: {result.n_tokens} tokens, {windows}", style="bold")
    lines = [head, Text("sources: " + ", ".join(result.sources), style="dim")]
    last_window = 0
    for t in result.tokens:
        if t.window != last_window:
            lines.append(Text(f"--- window {t.window + 1} (new context from here) ---", style="dim"))
            last_window = t.window
        shown = glyphs(t.token)
        lines.append(Text(f"{t.position:>4} {shown!r}", style="bold"))
        for f in t.features:
            line = Text(f"       {_short(f.feature, result.model)}  {f.relative:.2f} x max ({f.activation:.3g})")
            if f.explanation:
                line.append(f"  {f.explanation}", style="dim")
            lines.append(line)
        if t.position % result.window < result.skipped:
            lines.append(Text("       (first position of a context: the collection does not record it)", style="dim"))
        elif not t.features:
            lines.append(Text("       (no collected feature fires)", style="dim"))
    return lines
