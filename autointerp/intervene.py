"""Interventions on the subject model: steer (add), clamp and ablate SAE latents and MLP neurons; greedy generation
with and without them; strength calibration to a target KL; direct logit effects.

Conventions, per target:
- **SAE latent j** at the SAE's site. `add` adds alpha x the unit decoder direction W_dec[j] / |W_dec[j]| to the
  site (alpha is in site units, so it means the same for every latent whatever its decoder norm or the SAE's input
  normalization). `clamp` sets the latent's activation to v while keeping the SAE's reconstruction error:
  new = decode(z with z_j := v) + (x - decode(z)), both decodes in input units. Decoding is affine in z, so this is
  new = x + (v - z_j) * e_j(x), with e_j(x) what one unit of z_j adds to the reconstruction of x (the decoder row,
  divided by its norm under rescale_acts_by_decoder_norm and by the input-normalization factor). We compute that
  form: it is exact (v = z_j gives back x bit for bit) and cheaper. "Only latent j changes" means the SAE's
  decomposition of the site changes only in j; re-encoding the new value may move other latents (TopK
  competition), which is not the point. For a TopK latent outside the top k, z_j = 0 and the clamp adds v * e_j.
- **Neuron i** at any site (normally `mlp.post`, the input of the MLP's down projection, i.e. the value after the
  nonlinearity or act(gate)*up): `clamp` sets coordinate i to v exactly, `add` adds alpha to it.
- `ablate` is `clamp` to 0.

Positions: an intervention modifies absolute positions >= `start` of every forward pass, prompt and generated
tokens alike (KV-cache steps see one new token; its absolute position is read through the installed transformers'
cache API, `subject.cache`, and `generate` / `generate_many` check once per generation that the hook saw the
positions they fed, so a release that changes that API fails loudly instead of steering the wrong tokens). The default
start of 2 leaves the BOS token and the attention-sink position after it alone: the collector never records them
(config `collect.skip_positions`) and their activations are outliers. `generate(..., generated_only=True)` moves
start to the prompt length.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F

from autointerp.subject.cache import cache_offset, check_positions, output_cache, with_cache
from autointerp.subject.model import ALIASES, Subject
from autointerp.subject.sae import SAE, load_sae
from autointerp.subject.sites import base_model, hooks, parse_site
from autointerp.subject.tokens import token_strings

Mode = Literal["add", "clamp", "ablate"]
MODES: tuple[str, ...] = ("add", "clamp", "ablate")
NEURONS = "neurons"  # the `source` of neuron features in the store
DEFAULT_START = 2
DEFAULT_TARGET_KL = 0.5

# Short, topic-free openings (several tokens each, so the next-token position is past the attention sinks).
NEUTRAL_PROMPTS: tuple[str, ...] = (
    "I think that the",
    "Yesterday I went to the",
    "Here is a short story about",
    "The most important thing is",
    "She looked at me and said",
    "In my opinion, the best way to",
    "There are many reasons why",
    "Let me tell you about the",
)


class InterventionError(ValueError):
    """An intervention that cannot be built: unknown mode, conflicting strengths, a target the model lacks."""


# ----------------------------------------------------------------------------------------------------
# Targets


class Target(ABC):
    """A feature to intervene on: where it lives and how add / clamp act on a site tensor [..., width]."""

    site: str
    index: int

    @abstractmethod
    def width(self) -> int:
        """Width of the site tensor this target expects."""

    @abstractmethod
    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """[...] the feature's activation at each position of the site tensor x [..., width]."""

    @abstractmethod
    def add(self, x: torch.Tensor, alpha: float) -> torch.Tensor: ...

    @abstractmethod
    def clamp(self, x: torch.Tensor, value: float) -> torch.Tensor: ...

    @abstractmethod
    def site_direction(self) -> torch.Tensor:
        """[width] unit vector: the direction `add` moves the site along."""


@dataclass(frozen=True)
class Neuron(Target):
    site: str
    index: int
    n: int
    """Width of the site (number of neurons)."""

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.n:
            raise InterventionError(f"neuron {self.index} out of range for {self.site} of width {self.n}")

    def width(self) -> int:
        return self.n

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.index]

    def add(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        new = x.clone()
        new[..., self.index] += alpha
        return new

    def clamp(self, x: torch.Tensor, value: float) -> torch.Tensor:
        # Set, not x + (v - x): the neuron then holds exactly v.
        new = x.clone()
        new[..., self.index] = value
        return new

    def site_direction(self) -> torch.Tensor:
        e = torch.zeros(self.n)
        e[self.index] = 1.0
        return e


@dataclass(frozen=True)
class Latent(Target):
    sae: SAE
    index: int

    def __post_init__(self) -> None:
        if self.sae.cfg.site is None:
            raise InterventionError("the SAE's cfg names no site (hook_name); load it with expected_site=...")
        if not 0 <= self.index < self.sae.d_sae:
            raise InterventionError(f"latent {self.index} out of range: the SAE has {self.sae.d_sae} latents")

    @property
    def site(self) -> str:  # type: ignore[override]
        assert self.sae.cfg.site is not None  # checked in __post_init__
        return self.sae.cfg.site

    def width(self) -> int:
        return self.sae.d_in

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x)[..., self.index]

    def unit_effect(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in]: what one unit of this latent's activation adds to the reconstruction of x, in x's units."""
        row = self.sae.W_dec[self.index]
        if self.sae.cfg.rescale_acts_by_decoder_norm:
            row = row / row.norm()
        scale = self.sae.output_scale(x)
        return row / scale if isinstance(scale, torch.Tensor) else (row / scale).expand(*x.shape[:-1], -1)

    def contribution(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in]: this latent's part of the SAE reconstruction of x (activation x unit effect), x's units."""
        return self.activation(x)[..., None] * self.unit_effect(x)

    def add(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        return x + (alpha * self.site_direction()).to(device=x.device, dtype=x.dtype)

    def clamp(self, x: torch.Tensor, value: float) -> torch.Tensor:
        delta = (value - self.activation(x))[..., None] * self.unit_effect(x)
        return x + delta.to(device=x.device, dtype=x.dtype)

    def site_direction(self) -> torch.Tensor:
        row = self.sae.W_dec[self.index]
        return row / row.norm()


def load_target(subject: Subject, site: str, source: str, index: int, sae_path: str | None = None) -> Target:
    """The target of a stored feature: a neuron (source `neurons`) or a latent of the SAE at `sae_path`."""
    if source == NEURONS:
        return Neuron(site, index, subject.arch.site_width(subject.model, parse_site(site)))
    if sae_path is None:
        raise InterventionError(f"feature source {source!r} is an SAE id, but no SAE path was given")
    sae = load_sae(sae_path, expected_site=site, device=str(subject.device))
    return Latent(sae, index)


def subject_spec(model_id: str, source: str | None) -> str:
    """What to pass to load_subject for a stored model: its alias when it has one (the shared converted cache),
    else the directory or file it was loaded from."""
    return model_id if model_id in ALIASES or source is None else source


# ----------------------------------------------------------------------------------------------------
# Interventions


_MODES: dict[str, Callable[[Target, torch.Tensor, float], torch.Tensor]] = {
    "add": lambda t, x, v: t.add(x, v),
    "clamp": lambda t, x, v: t.clamp(x, v),
    "ablate": lambda t, x, _v: t.clamp(x, 0.0),
}


@dataclass(frozen=True)
class Intervention:
    target: Target
    mode: Mode
    value: float = 0.0
    """add: alpha (site units along the unit direction); clamp: the activation to set; ablate: ignored (0)."""
    start: int = DEFAULT_START
    """First absolute position modified (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise InterventionError(f"unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if not math.isfinite(self.value):
            raise InterventionError(f"intervention value must be finite, got {self.value}")
        if self.start < 0:
            raise InterventionError(f"start must be >= 0, got {self.start}")

    @classmethod
    def add(cls, target: Target, alpha: float, *, start: int = DEFAULT_START) -> Intervention:
        return cls(target, "add", float(alpha), start)

    @classmethod
    def clamp(cls, target: Target, value: float, *, start: int = DEFAULT_START) -> Intervention:
        return cls(target, "clamp", float(value), start)

    @classmethod
    def ablate(cls, target: Target, *, start: int = DEFAULT_START) -> Intervention:
        return cls(target, "ablate", 0.0, start)

    @property
    def strength(self) -> float:
        return 0.0 if self.mode == "ablate" else self.value


def _check_target(subject: Subject, target: Target) -> None:
    width = subject.arch.site_width(subject.model, parse_site(target.site))
    subject.arch.locate(subject.model, parse_site(target.site))  # fails on a layer the model lacks
    if target.width() != width:
        raise InterventionError(f"{target.site} has width {width}, but the target expects {target.width()}")


@dataclass
class Passes:
    """What the position tracker of an `intervene` block saw: (first absolute position, tokens) of its first
    forward passes (a few are enough to check a generation; the list stays small however long the block runs)."""

    seen: list[tuple[int, int]] = field(default_factory=list)
    keep: int = 8

    def add(self, offset: int, length: int) -> None:
        if len(self.seen) < self.keep:
            self.seen.append((offset, length))


def _n_tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for x in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(x, torch.Tensor):
            return int(x.shape[1])
    return -1


@contextmanager
def intervene(subject: Subject, *interventions: Intervention, pads: Sequence[int] | None = None) -> Iterator[Passes]:
    """Apply the interventions to every forward pass of subject.model inside the block; hooks are always removed.
    The block gets the `Passes` its position tracker saw.

    `pads`: for a left-padded batch, the number of padding tokens before each row, so that `start` counts from
    each row's own first token (padding positions are never modified)."""
    for iv in interventions:
        _check_target(subject, iv.target)
    offset = [0]  # absolute (padded) position of the first token of the current forward pass
    pad = None if pads is None else torch.tensor(list(pads), dtype=torch.long)
    passes = Passes()

    def track(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        offset[0] = cache_offset(kwargs)
        passes.add(offset[0], _n_tokens(args, kwargs))

    def make(iv: Intervention) -> Callable[[torch.Tensor], torch.Tensor | None]:
        apply = _MODES[iv.mode]

        def fn(t: torch.Tensor) -> torch.Tensor | None:
            if pad is not None:
                pos = torch.arange(offset[0], offset[0] + t.shape[-2]) - pad[:, None]  # [rows, T] row positions
                where = (pos >= iv.start).to(t.device)
                if not bool(where.any()):
                    return None
                return torch.where(where[..., None], apply(iv.target, t, iv.value), t)
            lo = max(0, iv.start - offset[0])
            if lo >= t.shape[-2]:
                return None
            new = apply(iv.target, t[..., lo:, :], iv.value)
            return torch.cat([t[..., :lo, :], new], dim=-2) if lo else new

        return fn

    with ExitStack() as stack:
        handle = base_model(subject.model).register_forward_pre_hook(track, with_kwargs=True)
        stack.callback(handle.remove)
        for iv in interventions:  # one hook each: interventions on one site compose in the order given
            stack.enter_context(hooks(subject.model, subject.arch, {iv.target.site: make(iv)}))
        yield passes


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
    """[d_model] unit vector the feature writes to the residual stream: its site direction, mapped through the MLP
    down projection (weights only, bias dropped) for `mlp.post` sites."""
    model, arch = subject.model, subject.arch
    ref = parse_site(target.site)
    param = next(model.parameters())
    d = target.site_direction().to(device=param.device, dtype=param.dtype)
    with torch.inference_mode():
        if ref.kind == "mlp.post":
            down = arch.mlp_down(arch.blocks(model)[ref.layer])
            d = down(d) - down(torch.zeros_like(d))  # the linear part; works for Linear and GPT-2's Conv1D
        return d / d.norm()


def direct_effects(subject: Subject, target: Target, k: int = 10) -> DirectEffects:
    """Top-k promoted and suppressed output tokens of the feature's residual direction u.

    The final norm is applied as the linear map it is on a unit-RMS input: (norm(sqrt(D) u) - norm(0)) / sqrt(D).
    For RMSNorm that is exactly gain * u (Gemma's (1 + gain) * u); for LayerNorm gain * centred(u) / |centred(u)|;
    the norm's bias is dropped (it is the same for every feature). Values are that vector times the unembedding
    (its bias, if any, dropped too): logit change per unit of residual norm along u, ignoring later layers.
    """
    model, arch = subject.model, subject.arch
    u = residual_direction(subject, target)
    norm = arch.final_norm(model)
    root = math.sqrt(u.numel())
    with torch.inference_mode():
        v = (norm(u * root) - norm(torch.zeros_like(u))) / root
        logits = (arch.unembed(model).weight @ v).float().cpu()
    k = min(k, logits.numel())
    tok = subject.tokenizer

    def effects(values: torch.Tensor, ids: torch.Tensor) -> tuple[TokenEffect, ...]:
        return tuple(
            TokenEffect(int(i), token_strings(tok, [int(i)])[0], float(v)) for v, i in zip(values, ids, strict=True)
        )

    top = logits.topk(k)
    bottom = logits.topk(k, largest=False)
    return DirectEffects(effects(top.values, top.indices), effects(bottom.values, bottom.indices))


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
