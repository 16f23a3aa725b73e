"""Rendering of query results for the terminal (rich) and for scripts (JSON). No logic beyond presentation."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from autointerp.store.queries import FeatureDetail, FeatureSummary

Decode = Callable[[Sequence[int]], list[str]]


def features_json(rows: Sequence[FeatureSummary]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=1)


def features_table(rows: Sequence[FeatureSummary]) -> Table:
    t = Table(show_lines=False)
    for name, just in (
        ("id", "left"),
        ("status", "left"),
        ("max", "right"),
        ("mean", "right"),
        ("density", "right"),
    ):
        t.add_column(name, justify=just, overflow="fold")  # type: ignore[arg-type]
    for r in rows:
        t.add_row(r.id, r.status, f"{r.max:.3g}", f"{r.mean:.3g}", f"{r.density:.2%}")
    return t


def detail_dict(d: FeatureDetail, decode: Decode) -> dict[str, Any]:
    out: dict[str, Any] = asdict(d.summary)
    out["histogram"] = d.histogram
    out["corpus"] = d.corpus_id
    out["records"] = [
        {
            "role": r.role,
            "split": r.split,
            "rank": r.rank,
            "bin": r.bin,
            "max_act": r.max_act,
            "context": r.context_idx,
            "document": r.document,
            "tokens": decode(r.token_ids),
            "acts": r.acts,
        }
        for r in d.records
    ]
    return out


def highlighted(tokens: Sequence[str], acts: Sequence[float], scale: float) -> Text:
    """Tokens with a background whose intensity follows activation / scale; the strongest are also <<marked>>."""
    text = Text()
    for tok, a in zip(tokens, acts, strict=True):
        shown = tok.replace("\n", "⏎").replace("\t", "⇥")
        level = 0.0 if scale <= 0 else max(0.0, min(1.0, a / scale))
        if level <= 0:
            text.append(shown)
            continue
        g = int(255 - 175 * level)
        style = f"black on rgb(255,{g},{int(g * 0.6)})"
        text.append(f"<<{shown}>>" if level >= 0.5 else shown, style=style)
    return text


def print_detail(console: Console, d: FeatureDetail, decode: Decode, per_role: int = 8) -> None:
    s = d.summary
    console.print(
        f"[bold]{s.id}[/bold]  status={s.status}  max={s.max:.4g}  mean={s.mean:.4g}  "
        f"density={s.density:.3%}  tokens={s.n_tokens}"
    )
    counts = d.histogram.get("counts") or []
    edges = d.histogram.get("edges") or []
    if counts and any(counts):
        peak = max(counts)
        first = next(i for i, c in enumerate(counts) if c)
        last = max(i for i, c in enumerate(counts) if c)
        console.print("histogram of positive activations:")
        for i in range(first, last + 1):
            bar = "█" * int(40 * counts[i] / peak)
            console.print(f"  [{edges[i]:>9.3g}, {edges[i + 1]:>9.3g})  {counts[i]:>8}  {bar}")
    shown: dict[str, int] = {}
    for r in d.records:
        if shown.get(r.role, 0) >= per_role:
            continue
        shown[r.role] = shown.get(r.role, 0) + 1
        label = f"{r.role}{'' if r.bin is None else f' bin {r.bin}'} #{r.rank} ({r.split}) max={r.max_act:.3g}  "
        line = Text(label, style="dim")
        line.append_text(highlighted(decode(r.token_ids), r.acts, s.max))
        console.print(line)
