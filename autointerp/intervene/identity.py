"""What the rows of the intervene stage are keyed by: the settings that change an intervention's numbers, the
judge and its prompt, the verdict thresholds, each hashed into its rows' unique key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autointerp.config import RunConfig, config_hash
from autointerp.intervene.hooks import NEUTRAL_PROMPTS
from autointerp.intervene.judge import BALANCING, Thresholds
from autointerp.prompts import Prompt

# Neutral, topic-free openings continued with and without the intervention (the calibration uses the different
# intervene.NEUTRAL_PROMPTS, so the strength is not tuned on the texts the judge reads).
VERIFY_PROMPTS: tuple[str, ...] = (
    "When I woke up this morning, I",
    "The best part of the day was",
    "My friend asked me what I",
    "Here are a few things to know about",
    "After a long walk, we decided to",
    "The letter on the table said",
    "It was the first time that",
    "I have always wondered why",
    "The meeting began with a few words about",
    "On the way home, she told me",
    "This is a short note about",
    "We talked for hours about",
    "The old book on the shelf was",
    "Everyone in the room was thinking about",
    "He opened the door and saw",
    "The next chapter is about",
)


def start_position(cfg: RunConfig) -> int:
    """First position an intervention touches: after BOS and the positions the collector never records."""
    return 1 + cfg.collect.skip_positions


def intervention_settings(cfg: RunConfig) -> dict[str, Any]:
    """Everything that changes an intervention row's numbers; its hash is the row's key."""
    c = cfg.intervene
    return {
        "mode": c.mode,
        "target_kl": c.target_kl,
        "kl_tol": c.kl_tol,
        "max_evals": c.max_evals,
        "start": start_position(cfg),
        "max_new_tokens": c.max_new_tokens,
        "seed": c.seed,
        "top_tokens": c.top_tokens,
        "dtype": cfg.model.dtype,
        "calibration_prompts": list(NEUTRAL_PROMPTS),
        "prompts": list(VERIFY_PROMPTS[: c.n_prompts]),
    }


@dataclass(frozen=True)
class Identity:
    """What a run's rows are keyed by."""

    intervention_config: dict[str, Any]
    intervention_hash: str
    judge: str
    prompt: str
    prompt_hash: str
    score_config: dict[str, Any]
    score_hash: str
    verdict_config: dict[str, Any]
    verdict_hash: str
    thresholds: Thresholds


def identity(cfg: RunConfig, judge: str, prompt: Prompt) -> Identity:
    c = cfg.intervene
    iv = intervention_settings(cfg)
    iv_hash = config_hash(iv)
    score = {"intervention_config_hash": iv_hash, "judge_max_tokens": c.judge_max_tokens, "alpha": c.alpha,
             "balancing": BALANCING}  # fmt: skip
    th = Thresholds(c.min_causal_ci_low, c.min_act_increase, c.min_simulation, c.min_classification)
    verdict = {"judge": judge, "prompt_hash": prompt.hash, "score_config_hash": config_hash(score), **th.__dict__}
    return Identity(
        iv, iv_hash, judge, prompt.name, prompt.hash, score, config_hash(score), verdict, config_hash(verdict), th
    )
