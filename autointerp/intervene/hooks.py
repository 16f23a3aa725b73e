"""Interventions on the subject model: the targets (SAE latents and MLP neurons) and the hooks that steer (add),
clamp and ablate them inside a `with intervene(...)` block, always removed on exit.

A target is built from a feature source (subject.sources, the loader collect uses too) through TARGETS. It reads
its activation at the source's read site and acts at its write site: the hooks modify the write site, the logit
lens (intervene.steer.direct_effects) starts from the write site. Neurons and SAEs read and write one site.

Conventions, per target:
- **Transcoder latent j** (a Direction): `add` adds alpha x its unit decoder direction at the write site; a
  cross-layer transcoder's latent at each write site l, W_dec[j, l] / |W_dec[j]| (the norm over all l: alpha is the
  size of the whole write). No clamp or ablate: they would modify a tensor other than the one the latent reads.
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
start to the prompt length (intervene.steer).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from autointerp.subject.cache import cache_offset
from autointerp.subject.model import Subject
from autointerp.subject.sae import SAE
from autointerp.subject.sites import base_model, hooks, parse_site
from autointerp.subject.sources import NEURONS, TRANSCODER, FeatureSource, SourceError, load_sources, stored_spec

Mode = Literal["add", "clamp", "ablate"]
MODES: tuple[str, ...] = ("add", "clamp", "ablate")
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
    """A feature to intervene on: where it is read and written, and how add / clamp act on the write site's tensor
    [..., width]."""

    index: int
    clamps: ClassVar[bool] = True
    """Whether clamp and ablate apply: they set the activation read from the very tensor they modify."""

    @property
    @abstractmethod
    def read_site(self) -> str:
        """Where the feature's activation is read (`activation`)."""

    @property
    @abstractmethod
    def write_site(self) -> str:
        """Where add / clamp act and the site `site_direction` lives in."""

    @property
    def write_sites(self) -> tuple[str, ...]:
        """Every site `add` acts on, write_site first (several for a cross-layer transcoder's latent)."""
        return (self.write_site,)

    def add_at(self, site: int, x: torch.Tensor, alpha: float) -> torch.Tensor:
        """`add` at the `site`-th of write_sites."""
        assert site == 0  # one write site unless a subclass says otherwise
        return self.add(x, alpha)

    @abstractmethod
    def width(self) -> int:
        """Width of the write site's tensor this target expects."""

    @abstractmethod
    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """[...] the feature's activation at each position of the read site's tensor x [..., d_read]."""

    @abstractmethod
    def add(self, x: torch.Tensor, alpha: float) -> torch.Tensor: ...

    @abstractmethod
    def clamp(self, x: torch.Tensor, value: float) -> torch.Tensor: ...

    @abstractmethod
    def site_direction(self) -> torch.Tensor:
        """[width] unit vector: the direction `add` moves the write site along."""


@dataclass(frozen=True)
class Neuron(Target):
    site: str
    index: int
    n: int
    """Width of the site (number of neurons)."""

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.n:
            raise InterventionError(f"neuron {self.index} out of range for {self.site} of width {self.n}")

    @property
    def read_site(self) -> str:
        return self.site

    @property
    def write_site(self) -> str:
        return self.site

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
        if self.sae.cfg.is_transcoder:
            raise InterventionError("a transcoder writes elsewhere than it reads: take its latents through its source")
        if not 0 <= self.index < self.sae.d_sae:
            raise InterventionError(f"latent {self.index} out of range: the SAE has {self.sae.d_sae} latents")

    @property
    def read_site(self) -> str:
        assert self.sae.cfg.site is not None  # checked in __post_init__
        return self.sae.cfg.site

    @property
    def write_site(self) -> str:
        return self.read_site  # an SAE reconstructs the site it reads

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


@dataclass(frozen=True)
class Direction(Target):
    """A feature of a source kind with no target of its own in TARGETS: its activation read through the source's
    encoder at the read site, `add` along its unit decoder direction at the write site. No clamp: the activation it
    would set is read elsewhere than the tensor it would modify (a clamp there needs a target of the kind's own)."""

    source: FeatureSource
    index: int
    clamps: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.source.n_features:
            raise InterventionError(
                f"feature {self.index} out of range: source {self.source.name} has {self.source.n_features}"
            )

    @property
    def read_site(self) -> str:
        return self.source.read_site

    @property
    def write_site(self) -> str:
        return self.source.write_site

    @property
    def write_sites(self) -> tuple[str, ...]:
        return self.source.writes

    def width(self) -> int:
        return int(self.site_direction().numel())

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.source.encode(x)[..., self.index]

    def add(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        return x + (alpha * self.site_direction()).to(device=x.device, dtype=x.dtype)

    def add_at(self, site: int, x: torch.Tensor, alpha: float) -> torch.Tensor:
        if self.source.site_directions is None:
            return super().add_at(site, x, alpha)
        d = self.source.write_directions(self.index)[site][1]
        return x + (alpha * d).to(device=x.device, dtype=x.dtype)

    def clamp(self, x: torch.Tensor, value: float) -> torch.Tensor:  # noqa: ARG002 (never clamps: see clamps)
        raise InterventionError(f"source {self.source.name} ({self.source.kind}) takes add only, not clamp or ablate")

    def site_direction(self) -> torch.Tensor:
        return self.source.decoder_direction(self.index)


def _latent(source: FeatureSource, index: int) -> Target:
    assert source.sae is not None  # every `sae` source carries its SAE
    return Latent(source.sae, index)


TARGETS: dict[str, Callable[[FeatureSource, int], Target]] = {
    NEURONS: lambda source, index: Neuron(source.write_site, index, source.n_features),
    "sae": _latent,
    TRANSCODER: Direction,  # add only, at each write site
}
"""Targets by source kind (subject.sources.SOURCE_KINDS): (source, feature index) -> the target. A kind not here
gets a Direction (add only); register one here to clamp and ablate its features."""


def target_of(source: FeatureSource, index: int) -> Target:
    """The target of feature `index` of a loaded source."""
    if source.direction is None:
        raise InterventionError(f"features of source {source.name} write nowhere: there is nothing to steer")
    return TARGETS.get(source.kind, Direction)(source, index)


def load_source(subject: Subject, site: str, source: str, sae_path: str | None = None) -> FeatureSource:
    """The source of a stored feature (site, source), loaded as the collector loaded it; `sae_path`: the path the
    database holds for an SAE source (the SAE found there must be the one collected)."""
    try:
        (loaded,) = load_sources(subject, [stored_spec(site, source, sae_path)])
    except SourceError as exc:
        raise InterventionError(str(exc)) from None
    return loaded


def load_target(subject: Subject, site: str, source: str, index: int, sae_path: str | None = None) -> Target:
    """The target of a stored feature: a neuron (source `neurons`) or a latent of the SAE at `sae_path`."""
    return target_of(load_source(subject, site, source, sae_path), index)


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
        if self.mode != "add" and not self.target.clamps:
            raise InterventionError(
                f"{self.mode} does not apply to this feature (it reads and writes different "
                f"sites: {self.target.read_site}, {self.target.write_site}); use add"
            )
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
    for site in target.write_sites:  # the hooks modify them
        width = subject.layout.site_width(subject.model, parse_site(site))
        subject.layout.locate(subject.model, parse_site(site))  # fails on a layer the model lacks
        if target.width() != width:
            raise InterventionError(f"{site} has width {width}, but the target expects {target.width()}")


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

    def make(iv: Intervention, site: int = 0) -> Callable[[torch.Tensor], torch.Tensor | None]:
        """The hook of `iv` at the `site`-th of its target's write sites."""
        mode = _MODES[iv.mode]
        apply = mode if iv.mode != "add" else lambda t, x, v: t.add_at(site, x, v)

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
            sites = iv.target.write_sites if iv.mode == "add" else (iv.target.write_site,)
            for j, site in enumerate(sites):  # add acts at every write site (a cross-layer transcoder's latent)
                stack.enter_context(hooks(subject.model, subject.layout, {site: make(iv, j)}))
        yield passes
