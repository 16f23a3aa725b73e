"""Steering one feature from a prompt (the `steer` command): the strength options of each mode, and the baseline
and steered continuations side by side with the KLs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from autointerp.config import RunConfig
from autointerp.intervene.hooks import (
    DEFAULT_START,
    DEFAULT_TARGET_KL,
    MODES,
    NEUTRAL_PROMPTS,
    Intervention,
    InterventionError,
    Mode,
    Target,
)
from autointerp.intervene.steer import (
    Calibration,
    Generation,
    calibrate,
    generate,
    kl_divergence,
    mean_kl,
    next_token_logprobs,
)
from autointerp.store.engine import Store
from autointerp.store.tables import Feature
from autointerp.subject.model import Subject

# ----------------------------------------------------------------------------------------------------
# Steering one feature from a prompt (the `steer` command)


@dataclass(frozen=True)
class SteerResult:
    mode: Mode
    strength: float
    """add: alpha; clamp: the value the latent or neuron is set to; ablate: 0."""
    kl: float
    """Mean next-token KL(base || steered) over the neutral prompts (the calibration measure)."""
    kl_prompt: float
    """Next-token KL(base || steered) after the user's prompt."""
    baseline: Generation
    steered: Generation
    calibration: Calibration | None
    n_forward: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "strength": self.strength,
            "kl": self.kl,
            "kl_prompt": self.kl_prompt,
            "prompt": self.baseline.prompt,
            "baseline": self.baseline.text,
            "steered": self.steered.text,
            "baseline_ids": list(self.baseline.token_ids),
            "steered_ids": list(self.steered.token_ids),
            "calibration": None if self.calibration is None else asdict(self.calibration),
            "n_forward": self.n_forward,
        }


@dataclass(frozen=True)
class StrengthChoice:
    """How strong an intervention is: a fixed value, or a target KL to calibrate to (ablate: neither)."""

    mode: Mode
    value: float | None = None
    target_kl: float | None = None
    initial: float = 1.0
    """Where calibration starts its search."""


def choose_strength(
    mode: str,
    *,
    strength: float | None = None,
    clamp_to: float | None = None,
    clamp_value: float | None = None,
    target_kl: float | None = None,
    max_act: float | None = None,
) -> StrengthChoice:
    """Check the strength options of one mode (at most one may be given) and resolve them.

    add takes `strength` (alpha); clamp takes `clamp_value`, or `clamp_to` x `max_act` (the feature's max
    activation); either takes `target_kl` instead, which is also the default (DEFAULT_TARGET_KL) when nothing is
    given; clamp then starts its search at `max_act`. Ablate takes none.
    """
    if mode not in MODES:
        raise InterventionError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    given = {"--strength": strength, "--clamp-to": clamp_to, "--clamp-value": clamp_value, "--target-kl": target_kl}
    named = [k for k, v in given.items() if v is not None]
    allowed = {"add": ("--strength", "--target-kl"), "clamp": ("--clamp-to", "--clamp-value", "--target-kl")}
    if mode == "ablate":
        if named:
            raise InterventionError(f"ablate sets the feature to 0 and takes no strength (got {', '.join(named)})")
        return StrengthChoice("ablate", value=0.0)
    wrong = [k for k in named if k not in allowed[mode]]
    if wrong:
        raise InterventionError(f"{', '.join(wrong)} does not apply to mode {mode}; use {' or '.join(allowed[mode])}")
    if len(named) > 1:
        raise InterventionError(f"give only one of {', '.join(named)}")
    m: Mode = "add" if mode == "add" else "clamp"
    if clamp_to is not None:
        if max_act is None or not max_act > 0:
            raise InterventionError(f"--clamp-to needs a positive max activation of the feature, got {max_act}")
        return StrengthChoice(m, value=clamp_to * max_act)
    fixed = strength if strength is not None else clamp_value
    if fixed is not None:
        return StrengthChoice(m, value=fixed)
    goal = DEFAULT_TARGET_KL if target_kl is None else target_kl
    if not goal > 0:
        raise InterventionError(f"--target-kl must be positive, got {goal}")
    initial = max_act if m == "clamp" and max_act is not None and max_act > 0 else 1.0
    return StrengthChoice(m, target_kl=goal, initial=initial)


def steer_feature(
    subject: Subject,
    target: Target,
    prompt: str,
    choice: StrengthChoice,
    *,
    max_new_tokens: int = 40,
    chat: bool = False,
    start: int = DEFAULT_START,
    neutral_prompts: Sequence[str] = NEUTRAL_PROMPTS,
) -> SteerResult:
    """Baseline and steered continuations of `prompt` for one feature, with the strength used and the KLs."""

    def make(s: float) -> Intervention:
        return Intervention(target, choice.mode, s, start)

    calibration = None
    value = choice.value
    if value is None:
        assert choice.target_kl is not None  # choose_strength sets one of the two
        calibration = calibrate(
            subject, make, target_kl=choice.target_kl, prompts=neutral_prompts, initial=choice.initial
        )
        value = calibration.strength
    iv = make(value)
    base = next_token_logprobs(subject, neutral_prompts)
    kl = mean_kl(subject, [iv], neutral_prompts, base)
    on_prompt = [next_token_logprobs(subject, [prompt], ivs, chat=chat) for ivs in ((), (iv,))]
    kl_prompt = float(kl_divergence(*on_prompt)[0])
    baseline = generate(subject, prompt, max_new_tokens=max_new_tokens, chat=chat)
    steered = generate(subject, prompt, [iv], max_new_tokens=max_new_tokens, chat=chat)
    n_forward = 4 + baseline.n_forward + steered.n_forward + (calibration.n_forward if calibration else 0)
    return SteerResult(iv.mode, iv.strength, kl, kl_prompt, baseline, steered, calibration, n_forward)


def steer_stored(
    cfg: RunConfig,
    store: Store,
    feature_id: str,
    prompt: str,
    mode: str,
    *,
    strength: float | None = None,
    clamp_to: float | None = None,
    clamp_value: float | None = None,
    target_kl: float | None = None,
    max_new_tokens: int = 40,
    chat: bool = False,
) -> tuple[Feature, SteerResult]:
    """`steer` on a feature of the database: its subject model and source loaded as they were collected."""
    from autointerp.intervene.hooks import load_target
    from autointerp.store.queries import model_source, resolve_feature, sae_path
    from autointerp.subject.files import subject_spec
    from autointerp.subject.model import load_subject

    f = resolve_feature(store, feature_id)
    choice = choose_strength(
        mode, strength=strength, clamp_to=clamp_to, clamp_value=clamp_value, target_kl=target_kl, max_act=f.max_act
    )
    spec = subject_spec(f.model_id, model_source(store, f.model_id))
    subject = load_subject(spec, device=cfg.model.device, dtype=cfg.model.dtype)
    target = load_target(subject, f.site, f.source, f.index, sae_path(store, f.source))
    start = 1 + cfg.collect.skip_positions  # leave alone the positions the collector never records
    return f, steer_feature(subject, target, prompt, choice, max_new_tokens=max_new_tokens, chat=chat, start=start)
