"""Generation with and without interventions, the next-token KL they cause and the strength calibration to a
target KL, and direct effects (the output tokens a feature's direction promotes and suppresses).

Generation runs its own greedy loop on the KV cache (one prompt, or the rows of one left-padded batch), so the
intervention hooks see every step; the cache goes through subject.cache, whatever the installed transformers
calls it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from autointerp.intervene.hooks import (
    DEFAULT_TARGET_KL,
    NEUTRAL_PROMPTS,
    Intervention,
    InterventionError,
    Target,
    intervene,
)
from autointerp.subject.cache import check_positions, output_cache, with_cache
from autointerp.subject.model import Subject
from autointerp.subject.sites import parse_site
from autointerp.subject.tokens import token_strings

# ----------------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class Generation:
    prompt: str
    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    """Generated tokens (an end-of-sequence token that stopped generation is not included)."""
    text: str
    n_forward: int


def encode_prompt(subject: Subject, prompt: str, *, chat: bool = False) -> list[int]:
    """Token ids of a prompt: BOS + the plain text (as the collector's contexts), or the chat template's
    rendering of one user turn with the generation prompt when `chat`."""
    tok = subject.tokenizer
    if chat:
        turn = [{"role": "user", "content": prompt}]
        raw = tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    else:
        raw = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = [int(i) for i in raw]
    return ids if ids and ids[0] == subject.bos_token_id else [subject.bos_token_id, *ids]


def _stop_ids(subject: Subject) -> set[int]:
    eos = subject.tokenizer.eos_token_id
    return set() if eos is None else {int(eos)}


def generate(
    subject: Subject,
    prompt: str,
    interventions: Sequence[Intervention] = (),
    *,
    max_new_tokens: int = 40,
    chat: bool = False,
    generated_only: bool = False,
    temperature: float = 0.0,
    seed: int = 0,
) -> Generation:
    """Continue `prompt` with the interventions applied (greedy unless temperature > 0, then sampled with a
    generator seeded by `seed`, so the same call gives the same text). `generated_only` leaves prompt positions
    alone. Stops at the tokenizer's EOS token."""
    if max_new_tokens < 0:
        raise InterventionError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompt_ids = encode_prompt(subject, prompt, chat=chat)
    if generated_only:
        interventions = [replace(iv, start=max(iv.start, len(prompt_ids))) for iv in interventions]
    gen = torch.Generator(device=subject.device).manual_seed(seed)
    stop = _stop_ids(subject)
    new: list[int] = []
    n_forward = 0
    ids = torch.tensor([prompt_ids], device=subject.device)
    past = None
    with intervene(subject, *interventions) as passes, torch.inference_mode():
        while len(new) < max_new_tokens:
            out = subject.model(input_ids=ids, **with_cache(subject.model, past), use_cache=True)
            n_forward += 1
            past = output_cache(out)
            if n_forward == 2 and interventions:
                check_positions(passes.seen, [(0, len(prompt_ids)), (len(prompt_ids), 1)], "generate")
            logits = out.logits[0, -1].float()
            if temperature > 0:
                nxt = int(torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=gen))
            else:
                nxt = int(logits.argmax())
            if nxt in stop:
                break
            new.append(nxt)
            ids = torch.tensor([[nxt]], device=subject.device)
    text = subject.tokenizer.decode(new, skip_special_tokens=False)
    return Generation(prompt, tuple(prompt_ids), tuple(new), text, n_forward)


def generate_many(
    subject: Subject,
    prompts: Sequence[str],
    interventions: Sequence[Intervention] = (),
    *,
    max_new_tokens: int = 40,
    chat: bool = False,
) -> list[Generation]:
    """Greedy continuations of several prompts as the rows of one left-padded batch: one forward pass per step
    for all of them. Each row is what `generate` gives for its prompt alone: the attention mask hides the padding,
    position ids count from each row's first token, and an intervention's `start` counts from it too (up to float
    rounding of the batched matmuls, which could only flip an exact tie of the greedy choice). A row stops at EOS;
    every Generation's n_forward is the number of batched passes."""
    if max_new_tokens < 0:
        raise InterventionError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompts:
        return []
    encoded = [encode_prompt(subject, p, chat=chat) for p in prompts]
    longest = max(len(e) for e in encoded)
    pads = [longest - len(e) for e in encoded]
    pad_id = subject.tokenizer.pad_token_id
    pad_id = subject.bos_token_id if pad_id is None else int(pad_id)
    ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for row, (e, p) in enumerate(zip(encoded, pads, strict=True)):
        ids[row, p:] = torch.tensor(e)
        mask[row, p:] = 1
    stop = _stop_ids(subject)
    new: list[list[int]] = [[] for _ in encoded]
    done = [False] * len(encoded)
    n_forward = 0
    dev = subject.device
    step_ids, past = ids.to(dev), None
    with intervene(subject, *interventions, pads=pads) as passes, torch.inference_mode():
        while not all(done) and max(len(n) for n in new) < max_new_tokens:
            positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -step_ids.shape[1] :]
            out = subject.model(
                input_ids=step_ids,
                attention_mask=mask.to(dev),
                position_ids=positions.to(dev),
                **with_cache(subject.model, past),
                use_cache=True,
            )
            n_forward += 1
            past = output_cache(out)
            if n_forward == 2 and interventions:
                check_positions(passes.seen, [(0, longest), (longest, 1)], "generate_many")
            nxt = out.logits[:, -1].float().argmax(-1).tolist()
            for row, tok in enumerate(nxt):
                if done[row]:
                    continue
                if tok in stop:
                    done[row] = True
                else:
                    new[row].append(int(tok))
                    done[row] = len(new[row]) >= max_new_tokens
            step_ids = torch.tensor([[int(t)] for t in nxt], device=dev)
            mask = torch.cat([mask, torch.ones((len(encoded), 1), dtype=torch.long)], dim=1)
    return [
        Generation(p, tuple(e), tuple(n), subject.tokenizer.decode(n, skip_special_tokens=False), n_forward)
        for p, e, n in zip(prompts, encoded, new, strict=True)
    ]


# ----------------------------------------------------------------------------------------------------
# KL and strength calibration


def next_token_logprobs(
    subject: Subject, prompts: Sequence[str], interventions: Sequence[Intervention] = (), *, chat: bool = False
) -> torch.Tensor:
    """[len(prompts), vocab] float32 log-probabilities of the token after each prompt, in one right-padded
    batched forward pass (padding comes after every real token, so causal attention never sees it)."""
    if not prompts:
        raise InterventionError("need at least one prompt")
    encoded = [encode_prompt(subject, p, chat=chat) for p in prompts]
    longest = max(len(e) for e in encoded)
    pad = subject.tokenizer.pad_token_id
    pad = subject.bos_token_id if pad is None else int(pad)
    ids = torch.full((len(encoded), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, : len(e)] = torch.tensor(e)
        mask[row, : len(e)] = 1
    last = torch.tensor([len(e) - 1 for e in encoded])
    with intervene(subject, *interventions), torch.inference_mode():
        logits = subject.model(
            input_ids=ids.to(subject.device), attention_mask=mask.to(subject.device), use_cache=False
        ).logits
    return F.log_softmax(logits[torch.arange(len(encoded)), last.to(logits.device)].float(), dim=-1).cpu()


def kl_divergence(base: torch.Tensor, steered: torch.Tensor) -> torch.Tensor:
    """[N] KL(base || steered) in nats from log-probabilities [N, vocab]."""
    return (base.exp() * (base - steered)).sum(-1).clamp_min(0.0)


def mean_kl(
    subject: Subject,
    interventions: Sequence[Intervention],
    prompts: Sequence[str] = NEUTRAL_PROMPTS,
    base: torch.Tensor | None = None,
) -> float:
    """Mean over prompts of KL(base || steered) of the next-token distribution (`base`: precomputed logprobs)."""
    base = next_token_logprobs(subject, prompts) if base is None else base
    return float(kl_divergence(base, next_token_logprobs(subject, prompts, interventions)).mean())


@dataclass(frozen=True)
class Calibration:
    strength: float
    kl: float
    """Mean KL reached at `strength`."""
    target_kl: float
    tol: float
    converged: bool
    """|kl - target_kl| <= tol; otherwise `strength` is the closest one tried."""
    n_forward: int
    """Batched forward passes over the prompts, the baseline included."""
    trace: tuple[tuple[float, float], ...] = field(default=())
    """(strength, kl) of every evaluation, in order."""


def calibrate(
    subject: Subject,
    make: Callable[[float], Intervention],
    *,
    target_kl: float = DEFAULT_TARGET_KL,
    tol: float | None = None,
    prompts: Sequence[str] = NEUTRAL_PROMPTS,
    initial: float = 1.0,
    max_evals: int = 40,
) -> Calibration:
    """Find a strength s >= 0 with mean KL(base || make(s)) within tol (default 10 % of the target) of target_kl
    over the prompts.

    Assumes the KL grows with s (true for add; for clamp above the latent's typical activation): doubles s from
    `initial` until the target is passed, then bisects. One batched forward pass per evaluation. Doubling stops
    early, unconverged, when the KL has saturated below the target (a norm after the site can cap the effect of
    any single direction).
    """
    tol = 0.1 * target_kl if tol is None else tol
    if target_kl <= 0 or tol <= 0 or initial <= 0:
        raise InterventionError(f"target_kl, tol and initial must be positive, got {target_kl}, {tol}, {initial}")
    base = next_token_logprobs(subject, prompts)
    trace: list[tuple[float, float]] = []

    def kl_at(s: float) -> float:
        kl = mean_kl(subject, [make(s)], prompts, base)
        trace.append((s, kl))
        return kl

    def done(converged: bool) -> Calibration:
        s, kl = min(trace, key=lambda p: abs(p[1] - target_kl))
        return Calibration(s, kl, target_kl, tol, converged, 1 + len(trace), tuple(trace))

    lo, hi = 0.0, initial
    kl = kl_at(hi)
    while kl < target_kl - tol and len(trace) < max_evals:
        lo, hi = hi, hi * 2
        previous, kl = kl, kl_at(hi)
        if kl <= previous * 1.01:  # doubling the strength no longer moves the KL
            return done(False)
    while abs(kl - target_kl) > tol and len(trace) < max_evals:
        mid = (lo + hi) / 2
        kl = kl_at(mid)
        lo, hi = (mid, hi) if kl < target_kl else (lo, mid)
    return done(abs(kl - target_kl) <= tol)


# ----------------------------------------------------------------------------------------------------
# Direct effects (logit lens of the feature's output direction)


@dataclass(frozen=True)
class TokenEffect:
    token_id: int
    token: str
    value: float


@dataclass(frozen=True)
class DirectEffects:
    promoted: tuple[TokenEffect, ...]
    suppressed: tuple[TokenEffect, ...]
    """Most negative first."""


def residual_direction(subject: Subject, target: Target) -> torch.Tensor:
    """[d_model] unit vector the feature writes to the residual stream: its direction at its write site, mapped
    through the MLP down projection (weights only, bias dropped) for `mlp.post` sites."""
    model, layout = subject.model, subject.layout
    ref = parse_site(target.write_site)
    param = next(model.parameters())
    d = target.site_direction().to(device=param.device, dtype=param.dtype)
    with torch.inference_mode():
        if ref.kind == "mlp.post":
            down = layout.mlp_down(layout.blocks(model)[ref.layer])
            d = down(d) - down(torch.zeros_like(d))  # the linear part; works for Linear and GPT-2's Conv1D
        return d / d.norm()


def direct_effects(subject: Subject, target: Target, k: int = 10) -> DirectEffects:
    """Top-k promoted and suppressed output tokens of the feature's residual direction u.

    The final norm is applied as the linear map it is on a unit-RMS input: (norm(sqrt(D) u) - norm(0)) / sqrt(D).
    For RMSNorm that is exactly gain * u (Gemma's (1 + gain) * u); for LayerNorm gain * centred(u) / |centred(u)|;
    the norm's bias is dropped (it is the same for every feature). Values are that vector times the unembedding
    (its bias, if any, dropped too): logit change per unit of residual norm along u, ignoring later layers.
    """
    model, layout = subject.model, subject.layout
    u = residual_direction(subject, target)
    norm = layout.final_norm(model)
    root = math.sqrt(u.numel())
    with torch.inference_mode():
        v = (norm(u * root) - norm(torch.zeros_like(u))) / root
        logits = (layout.unembed(model).weight @ v).float().cpu()
    k = min(k, logits.numel())
    tok = subject.tokenizer

    def effects(values: torch.Tensor, ids: torch.Tensor) -> tuple[TokenEffect, ...]:
        return tuple(
            TokenEffect(int(i), token_strings(tok, [int(i)])[0], float(v)) for v, i in zip(values, ids, strict=True)
        )

    top = logits.topk(k)
    bottom = logits.topk(k, largest=False)
    return DirectEffects(effects(top.values, top.indices), effects(bottom.values, bottom.indices))
