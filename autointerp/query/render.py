"""Terminal and JSON rendering of search and inspect results (kept readable in 80 columns: ids are never cut)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from rich.text import Text

from autointerp.methods import short

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
        shown = t.token.replace("\n", "⏎").replace("\t", "⇥")
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
