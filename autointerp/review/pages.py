"""What the review page shows, read from the store as plain values for the templates, and the figures it draws
(inline SVG built here, so the page needs no plotting library and no script). Nothing here marks text as safe:
the templates escape every string, model and corpus text included."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from autointerp.methods import METHODS
from autointerp.records import glyphs
from autointerp.store.engine import Store
from autointerp.store.scores import simulated_by_context

Decode = Callable[[Sequence[int]], list[str]]
LEVELS = 10  # activation colour steps: CSS classes lv0..lv10 (no inline styles: the page's CSP forbids them)
_OUTCOME = {"correct": "steered", "wrong": "baseline", "tie": "tie", "unparsable": "unparsable",
            "failed": "failed", "same": "identical"}  # fmt: skip


def level(value: float, scale: float) -> int:
    if scale <= 0 or value <= 0:
        return 0
    return max(1, min(LEVELS, round(LEVELS * value / scale)))


@dataclass(frozen=True)
class Token:
    text: str
    act: float
    lv: int
    sim: float | None = None
    sim_lv: int = 0


def bar(lo: float | None, value: float | None, hi: float | None, *, lo_end: float, hi_end: float,
        width: int = 160, height: int = 14) -> dict[str, Any] | None:  # fmt: skip
    """Pixel positions of a score's interval bar and its point, on a scale from lo_end to hi_end."""
    if value is None:
        return None

    def x(v: float) -> float:
        return round(width * (min(hi_end, max(lo_end, v)) - lo_end) / (hi_end - lo_end), 1)

    lo_x = x(lo if lo is not None else value)
    hi_x = x(hi if hi is not None else value)
    return {"w": width, "h": height, "lo": lo_x, "span": max(1.0, hi_x - lo_x), "x": x(value), "zero": x(0.0),
            "mid": height / 2}  # fmt: skip


def histogram_svg(
    hist: dict[str, Any], top: float | None = None, width: int = 480, height: int = 120
) -> dict[str, Any] | None:
    """Bars of the activation histogram (log-scaled counts: the low bins dwarf the rest otherwise), drawn over the
    bins the data reaches only: the collector's bins are fixed (half-octaves up to 4096), and a feature whose max
    is 2 would otherwise be a few bars at the left of an axis running to 4.1e+03. The axis ends at `top` (the
    feature's max) when given, the last bar cut where the data ends (on the bins' log scale)."""
    import math

    counts = list(hist.get("counts") or [])
    edges = list(hist.get("edges") or [])
    if not counts or not any(counts) or len(edges) != len(counts) + 1:
        return None
    first = next(i for i, c in enumerate(counts) if c > 0)
    last = max(i for i, c in enumerate(counts) if c > 0)
    shown = counts[first : last + 1]
    end = edges[last + 1]
    reach = 1.0  # the fraction of the last bin the data reaches
    if top is not None and math.isfinite(top) and edges[last] < top < end:
        lo_edge = edges[last]
        reach = math.log(top / lo_edge) / math.log(end / lo_edge) if lo_edge > 0 else (top - lo_edge) / (end - lo_edge)
        end = top
    elif top is not None and math.isfinite(top) and top >= end:
        end = top  # values past the last edge were counted in the last bin
    peak = math.log1p(max(shown))
    w = width / (len(shown) - 1 + reach)
    bars = []
    for k, c in enumerate(shown):
        i = first + k
        h = 0.0 if c <= 0 else max(1.0, (height - 14) * math.log1p(c) / peak)
        bw = w * (reach if i == last else 1.0)
        bars.append({"x": round(k * w, 2), "w": round(max(0.5, bw - 0.5), 2), "y": round(height - 14 - h, 2),
                     "h": round(h, 2), "count": int(c), "lo": edges[i], "hi": edges[i + 1]})  # fmt: skip
    return {"w": width, "h": height, "bars": bars, "lo": edges[first], "hi": end, "base": height - 14}


def calibration_svg(bins: Sequence[Any], width: int = 320, height: int = 200) -> dict[str, Any]:
    """Acceptance rate (y, 0..1) per score bin (x), with Wilson intervals; the bins' edges label the axis."""
    pad = 28
    lo, hi = bins[0].lo, bins[-1].hi
    iw, ih = width - 2 * pad, height - 2 * pad

    def x(v: float) -> float:
        return round(pad + iw * (v - lo) / (hi - lo), 1)

    def y(v: float) -> float:
        return round(pad + ih * (1 - v), 1)

    points = []
    for b in bins:
        if b.n == 0:
            continue
        cx = x((b.lo + b.hi) / 2)
        lo_i, hi_i = b.interval
        points.append({"x": cx, "y": y(b.rate), "y_lo": y(lo_i), "y_hi": y(hi_i), "n": b.n, "rate": b.rate,
                       "label": f"[{b.lo:g}, {b.hi:g}): {b.accepted}/{b.n} accepted"})  # fmt: skip
    ticks = [{"x": x(b.lo), "label": f"{b.lo:g}"} for b in bins] + [{"x": x(hi), "label": f"{hi:g}"}]
    return {"w": width, "h": height, "pad": pad, "points": points, "ticks": ticks, "x0": pad, "x1": width - pad,
            "y0": y(0.0), "y1": y(1.0), "y_half": y(0.5)}  # fmt: skip


def score_range(method: str) -> tuple[float, float]:
    m = METHODS.get(method)
    return (m.lo, m.hi) if m is not None else (0.0, 1.0)


def feature_page(store: Store, ident: str, decode_for: Callable[[str], Decode]) -> dict[str, Any]:
    """Everything the feature page shows: statistics, histogram, explanations with their scores and verdicts,
    reviews, records as coloured tokens (with simulated activations on test records), the direct effects and the
    intervention pairs with the judge's pick per explanation."""
    from autointerp.store.explanations import explanations_for
    from autointerp.store.interventions import latest_intervention, verdicts_for
    from autointerp.store.queries import feature_detail, resolve_feature
    from autointerp.store.reviews import reviews_for
    from autointerp.store.scores import scores_for

    f = resolve_feature(store, ident)
    assert f.id is not None
    detail = feature_detail(store, f.key)
    decode = decode_for(f.model_id)
    scores = scores_for(store, f.id)
    verdicts = {v.explanation_id: v for v in verdicts_for(store, f.id)}
    reviews = reviews_for(store, f.id)
    explanations: list[dict[str, Any]] = []
    for e in explanations_for(store, [f.id])[f.id]:
        mine = []
        for sc in (s for s in scores if s.explanation_id == e.id):
            lo_end, hi_end = score_range(sc.method)
            mine.append({"s": sc, "bar": bar(sc.ci_low, sc.value, sc.ci_high, lo_end=lo_end, hi_end=hi_end)})
        explanations.append({"e": e, "scores": mine, "verdict": verdicts.get(e.id),
                             "reviews": [r for r in reviews if r.explanation_id == e.id]})  # fmt: skip
    simulated = simulated_by_context(scores)
    scale = detail.summary.max
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in detail.records:
        texts = decode(r.token_ids)
        sim = simulated.get(r.context_idx) if r.split == "test" else None
        if sim is not None and len(sim) != len(r.acts):
            sim = None
        toks = [Token(glyphs(t), a, level(a, scale), None if sim is None else sim[k],
                      0 if sim is None else level(sim[k], 10.0))
                for k, (t, a) in enumerate(zip(texts, r.acts, strict=True))]  # fmt: skip
        label = r.role + ("" if r.bin is None else f" bin {r.bin}")
        groups.setdefault(r.role, []).append({"r": r, "label": label, "tokens": toks, "has_sim": sim is not None})
    iv = latest_intervention(store, f.id)
    picks: dict[int, dict[int, str]] = {}  # explanation id -> pair index -> the judge's pick
    for sc in scores:
        if sc.method == "intervention":
            for j in sc.details.get("judgements", []):
                picks.setdefault(sc.explanation_id, {})[int(j.get("pair", -1))] = _OUTCOME.get(j.get("outcome"), "?")
    pairs = []
    if iv is not None:
        for k, smp in enumerate(iv.samples):
            pairs.append({"prompt": smp.get("prompt", ""), "baseline": smp.get("baseline", ""),
                          "steered": smp.get("steered", ""),
                          "picks": [(eid, p[k]) for eid, p in picks.items() if k in p]})  # fmt: skip
    return {
        "f": detail.summary,
        "db_id": f.id,
        "histogram": histogram_svg(detail.histogram, detail.summary.max),
        "explanations": explanations,
        "groups": [(role, groups[role]) for role in ("top", "quantile", "random") if role in groups],
        "intervention": iv,
        "pairs": pairs,
        "texts": {e["e"].id: e["e"].text for e in explanations},
        "transcoder": transcoder_line(store, f.source),
    }


def transcoder_line(store: Store, source: str) -> str | None:
    """ "transcoder: reads X, writes Y" for a feature of a stored transcoder (the `autointerp` record that collect
    puts in its `sae` row's cfg, subject.sources.transcoder_record); None for any other source."""
    from autointerp.store.queries import sae_cfg

    cfg = sae_cfg(store, source)
    rec = cfg.get("autointerp") if cfg is not None else None
    if not isinstance(rec, dict) or rec.get("kind") != "transcoder":
        return None
    writes = rec.get("write_sites") or []
    shown = (
        ", ".join(str(w) for w in writes) if len(writes) <= 3 else f"{writes[0]} … {writes[-1]} ({len(writes)} sites)"
    )
    return f"transcoder: reads {rec.get('read_site')}, writes {shown}"


def default_explanation(page: dict[str, Any], method: str = "simulation") -> int | None:
    """The explanation a decision applies to when none is chosen: the best-scored ok machine one, else the first ok."""
    best: tuple[float, int] | None = None
    first = None
    for item in page["explanations"]:
        e = item["e"]
        if e.status != "ok":
            continue
        first = first if first is not None else e.id
        for sc in item["scores"]:
            v = sc["s"].value
            if sc["s"].method == method and v is not None and (best is None or v > best[0]):
                best = (v, e.id)
    return best[1] if best is not None else first
