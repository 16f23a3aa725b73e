"""`features show`: one feature in the terminal (statistics, explanations, scores, histogram, highlighted
contexts, the causal check) and as JSON (no torch on this path)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.text import Text

from autointerp.records import glyphs
from autointerp.store.engine import Store
from autointerp.store.queries import FeatureDetail
from autointerp.store.scores import simulated_by_context

Decode = Callable[[Sequence[int]], list[str]]


def detail_dict(
    d: FeatureDetail, decode: Decode, explanations: Sequence[Any] = (), scores: Sequence[Any] = ()
) -> dict[str, Any]:
    out: dict[str, Any] = asdict(d.summary)
    out["explanations"] = [asdict(e) for e in explanations]
    out["scores"] = [{k: v for k, v in asdict(sc).items() if k != "details"} for sc in scores]
    simulated = simulated_by_context(scores)
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
            "simulated": simulated.get(r.context_idx) if r.split == "test" else None,
        }
        for r in d.records
    ]
    return out


def highlighted(tokens: Sequence[str], acts: Sequence[float], scale: float) -> Text:
    """Tokens with a background whose intensity follows activation / scale; the strongest are also <<marked>>."""
    text = Text()
    for tok, a in zip(tokens, acts, strict=True):
        shown = glyphs(tok)
        level = 0.0 if scale <= 0 else max(0.0, min(1.0, a / scale))
        if level <= 0:
            text.append(shown)
            continue
        g = int(255 - 175 * level)
        style = f"black on rgb(255,{g},{int(g * 0.6)})"
        text.append(f"<<{shown}>>" if level >= 0.5 else shown, style=style)
    return text


def print_detail(
    console: Console,
    d: FeatureDetail,
    decode: Decode,
    per_role: int = 8,
    explanations: Sequence[Any] = (),
    scores: Sequence[Any] = (),
) -> None:
    s = d.summary
    head = Text(s.id, style="bold")
    head.append(
        f"  status={s.status}  max={s.max:.4g}  mean={s.mean:.4g}  density={s.density:.3%}  tokens={s.n_tokens}"
    )
    console.print(head)
    for e in explanations:
        who = f"{e.explainer}{' ' + e.model if e.model else ''}{' prompt ' + e.prompt if e.prompt else ''}"
        if e.status == "ok":
            line = Text("explanation: ", style="bold")
            line.append(e.text or "")
            line.append(f"  ({who})", style="dim")
        else:
            line = Text(f"explanation {e.status}: ", style="yellow")
            line.append(f"{e.error or ''}  ({who})", style="dim")
        console.print(line)
    for sc in scores:
        if sc.value is None:
            figures = f"  {sc.method:<12} {sc.status}: {sc.reason or ''}  "
        else:
            ci = "" if sc.ci_low is None else f" [{sc.ci_low:.2f}, {sc.ci_high:.2f}]"
            failed = f", {sc.n_failed} failed" if sc.n_failed else ""
            figures = f"  {sc.method:<12} {sc.value:.3f}{ci}  n={sc.n}{failed}  "
        console.print(Text(figures) + Text(f"({sc.explanation})", style="dim"))
    simulated = simulated_by_context(scores)
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
        sim = simulated.get(r.context_idx) if r.split == "test" else None
        if sim is not None and len(sim) == len(r.acts):
            simline = Text("    simulated (0-10): ", style="dim")
            simline.append_text(highlighted(decode(r.token_ids), sim, 10.0))
            console.print(simline)


def intervention_json(iv: Any, verdicts: Sequence[Any]) -> dict[str, Any]:
    """`features show --json` keys of the causal check: `direct_effects` (None before `intervene`), `verdict` (the
    feature's headline verdict, its best explanation's, or None) and `verdicts` (one per explanation)."""
    from autointerp.store.interventions import headline_verdict

    effects = None
    if iv is not None:
        effects = {
            "promoted": iv.promoted,
            "suppressed": iv.suppressed,
            "mode": iv.mode,
            "strength": iv.strength,
            "kl": iv.kl,
            "target_kl": iv.target_kl,
            "act_baseline": iv.act_baseline,
            "act_steered": iv.act_steered,
            "act_increase": iv.act_increase,
            "samples": iv.samples,
        }
    head = headline_verdict(verdicts)
    return {
        "direct_effects": effects,
        "verdict": None if head is None else asdict(head),
        "verdicts": [asdict(v) for v in verdicts],
    }


def print_intervention(console: Console, iv: Any, verdicts: Sequence[Any], samples: int = 2) -> None:
    """Top promoted / suppressed tokens, the steering used, a few continuation pairs and each explanation's verdict."""
    if iv is None:
        return

    def tokens(effects: Sequence[dict[str, Any]]) -> str:
        return "  ".join(f"{e['token']!r} {e['value']:+.2f}" for e in effects)

    reached = "" if iv.converged else ", target not reached"
    act = "" if iv.act_increase is None else f"; feature on steered vs baseline text {iv.act_increase:+.3f} x max"
    strength = "?" if iv.strength is None else f"{iv.strength:.4g}"
    kl = "?" if iv.kl is None else f"{iv.kl:.3f}"
    line = Text("intervention", style="bold")
    line.append(f" {iv.mode} {strength} (KL {kl} nats, target {iv.target_kl}{reached}){act}")
    console.print(line)
    console.print(Text("  promotes:   ", style="dim") + Text(tokens(iv.promoted)))
    console.print(Text("  suppresses: ", style="dim") + Text(tokens(iv.suppressed)))
    for smp in iv.samples[:samples]:
        line = Text(f"  {smp['prompt']!r}", style="dim")
        line.append(f"\n    baseline: {smp['baseline']!r}\n    steered:  {smp['steered']!r}")
        console.print(line)
    styles = {"verified": "green", "contradicted": "red", "unverified": "yellow"}
    for v in verdicts:
        acc = "" if v.causal_value is None else f"judge {v.causal_value:.2f}"
        if v.causal_ci_low is not None and v.causal_ci_high is not None:
            acc += f" [{v.causal_ci_low:.2f}, {v.causal_ci_high:.2f}] n={v.causal_n}"
        line = Text("verdict: ", style="bold")
        line.append(v.verdict, style=styles.get(v.verdict, ""))
        line.append(f"  {acc}  {v.reason}  ({v.explanation})", style="dim")
        console.print(line)


def _feature_parts(store: Store, feature_id: str) -> tuple[FeatureDetail, Callable[..., list[str]], Any, Any, Any, Any]:
    """Everything `features show` prints of one feature, read from the store (tokens decoded without torch)."""
    from autointerp.records import decoder
    from autointerp.store.explanations import explanations_for
    from autointerp.store.interventions import latest_intervention, verdicts_for
    from autointerp.store.queries import feature_detail, resolve_feature
    from autointerp.store.scores import scores_for

    detail = feature_detail(store, feature_id)
    fid = resolve_feature(store, detail.summary.id).id
    assert fid is not None
    decode = decoder(store, detail.summary.model)
    expls = explanations_for(store, [fid])[fid]
    return detail, decode, expls, scores_for(store, fid), latest_intervention(store, fid), verdicts_for(store, fid)


def feature_json(store: Store, feature_id: str) -> dict[str, Any]:
    """`features show --json`: the feature, its records, explanations, scores, intervention and verdicts."""
    detail, decode, expls, scores, iv, verdicts = _feature_parts(store, feature_id)
    return detail_dict(detail, decode, expls, scores) | intervention_json(iv, verdicts)


def print_feature(console: Console, store: Store, feature_id: str, *, per_role: int = 8) -> None:
    detail, decode, expls, scores, iv, verdicts = _feature_parts(store, feature_id)
    print_detail(console, detail, decode, per_role=per_role, explanations=expls, scores=scores)
    print_intervention(console, iv, verdicts)
