"""The model part of the causal check, per feature: calibrate the strength to a target KL over fixed neutral
prompts, compute the direct effects, continue the verification prompts with and without the intervention (all
prompts as the rows of one batch; baselines computed once per model and run), and read the feature's activation on
those continuations with the unsteered model (subject.sites.capture): does the steered text make it fire more?
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from autointerp.config import RunConfig
from autointerp.intervene.hooks import (
    NEURONS,
    Intervention,
    InterventionError,
    Target,
    load_source,
    target_of,
)
from autointerp.intervene.identity import VERIFY_PROMPTS, Identity, start_position
from autointerp.intervene.steer import calibrate, direct_effects, generate_many
from autointerp.store.engine import Store
from autointerp.store.queries import model_source, sae_path
from autointerp.store.tables import Feature, InterventionRow
from autointerp.subject.files import subject_spec
from autointerp.subject.sources import FeatureSource


@dataclass
class Counters:
    forward: int = 0
    generated: int = 0


class Measurer:
    """Steers features of one database: loads each subject model and source once and shares the baselines."""

    def __init__(self, cfg: RunConfig, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self._subjects: dict[str, Any] = {}
        self._sources: dict[tuple[str, str, str], FeatureSource] = {}  # by (model, site, source)
        self._baselines: dict[str, list[Any]] = {}

    def subject(self, model_id: str) -> Any:
        if model_id not in self._subjects:
            from autointerp.subject.model import load_subject

            spec = subject_spec(model_id, model_source(self.store, model_id))
            self._subjects[model_id] = load_subject(spec, device=self.cfg.model.device, dtype=self.cfg.model.dtype)
        return self._subjects[model_id]

    def target(self, subject: Any, f: Feature) -> Target:
        key = (f.model_id, f.site, f.source)
        if key not in self._sources:
            path = sae_path(self.store, f.source)
            if path is None and f.source != NEURONS:  # this wording is in stored failure rows: kept as it was
                raise InterventionError(f"SAE {f.source} of feature {f.key} is not in the database")
            self._sources[key] = load_source(subject, f.site, f.source, path)
        return target_of(self._sources[key], f.index)

    def baselines(self, model_id: str, subject: Any, counters: Counters) -> list[Any]:
        if model_id not in self._baselines:
            self._baselines[model_id] = self.generate(subject, [], counters)
        return self._baselines[model_id]

    def generate(self, subject: Any, interventions: Sequence[Any], counters: Counters) -> list[Any]:
        """Greedy continuations of the verification prompts, all prompts as the rows of one batch."""
        c = self.cfg.intervene
        gens = generate_many(subject, VERIFY_PROMPTS[: c.n_prompts], interventions, max_new_tokens=c.max_new_tokens)
        counters.forward += max((g.n_forward for g in gens), default=0)  # batched: the passes are shared
        counters.generated += sum(len(g.token_ids) for g in gens)
        return gens

    def measure(self, f: Feature, ident: Identity) -> InterventionRow:
        """Calibrate, compute direct effects, generate and read the feature's activation: one intervention row."""
        assert f.id is not None
        t0 = time.perf_counter()
        c = self.cfg.intervene
        counters = Counters()
        subject = self.subject(f.model_id)
        target = self.target(subject, f)
        start = start_position(self.cfg)

        def make(s: float) -> Intervention:
            return Intervention(target, c.mode, s, start)

        initial = f.max_act if c.mode == "clamp" and f.max_act > 0 else 1.0
        cal = calibrate(subject, make, target_kl=c.target_kl, tol=c.kl_tol, initial=initial, max_evals=c.max_evals)
        counters.forward += cal.n_forward
        iv = make(cal.strength)
        eff = direct_effects(subject, target, k=c.top_tokens)
        base = self.baselines(f.model_id, subject, counters)
        steered = self.generate(subject, [iv], counters)
        acts = continuation_activations(subject, target, [*base, *steered])
        counters.forward += 1
        n = len(base)
        act_b, act_s = _pooled_mean(acts[:n]), _pooled_mean(acts[n:])
        increase = None
        if act_b is not None and act_s is not None and f.max_act > 0:
            increase = (act_s - act_b) / f.max_act
        samples = [
            {
                "prompt": b.prompt,
                "baseline": b.text,
                "steered": s.text,
                "baseline_tokens": len(b.token_ids),
                "steered_tokens": len(s.token_ids),
                "act_baseline": _mean(ab),
                "act_steered": _mean(ast),
            }
            for b, s, ab, ast in zip(base, steered, acts[:n], acts[n:], strict=True)
        ]

        def effects(es: Sequence[Any]) -> list[dict[str, Any]]:
            return [{"token_id": e.token_id, "token": e.token, "value": e.value} for e in es]

        return InterventionRow(
            feature_id=f.id,
            mode=c.mode,
            config_hash=ident.intervention_hash,
            config=ident.intervention_config | {"trace": [list(p) for p in cal.trace]},
            status="ok",
            strength=cal.strength,
            target_kl=c.target_kl,
            kl=cal.kl,
            converged=cal.converged,
            start=start,
            promoted=effects(eff.promoted),
            suppressed=effects(eff.suppressed),
            samples=samples,
            act_baseline=act_b,
            act_steered=act_s,
            act_increase=increase,
            n_forward=counters.forward,
            n_generated=counters.generated,
            seconds=time.perf_counter() - t0,
        )


def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def _pooled_mean(rows: Sequence[Sequence[float]]) -> float | None:
    return _mean([x for r in rows for x in r])


def continuation_activations(subject: Any, target: Any, gens: Sequence[Any]) -> list[list[float]]:
    """The feature's activation at every generated token of each generation, read by the unsteered model through
    the collector's site capture at the feature's read site, in one right-padded batch (causal attention never sees
    the padding)."""
    import torch

    from autointerp.subject.sites import capture

    seqs = [list(g.prompt_ids) + list(g.token_ids) for g in gens]
    if not seqs:
        return []
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), subject.bos_token_id, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
    site = target.read_site
    x = capture(subject.model, subject.layout, [site], ids.to(subject.device))[site]
    with torch.inference_mode():
        acts = target.activation(x.float()).cpu()
    return [acts[row, len(g.prompt_ids) : len(g.prompt_ids) + len(g.token_ids)].tolist() for row, g in enumerate(gens)]
