"""Feature sources: where features come from, and the one loader that collect, inspect, steer and intervene use.

A source has a read site and a write site. Its encoder turns the read site's tensor into feature activations
(collection and inspection read there); each feature has a decoder direction at the write site (steering adds along
it, the logit lens maps it to output tokens). Neurons and SAEs read and write one site; a transcoder reads one site
and writes another; a cross-layer transcoder's layer writes several (`write_sites`, `write_site` the first).

Kinds (SOURCE_KINDS, looked up by the spec's `kind`):
- `neurons`: the coordinates of a site (NeuronSpec); encoder the identity, direction the unit vector e_i.
- `sae`: the latents of an SAE directory, or of each SAE of a folder of several (SAESource); its content id names it.
  A transcoder directory (any format, see subject.sae) gives sources of kind `transcoder`: read at its read site,
  written at its write site(s); a directory of per-layer parts (circuit-tracer) gives one per layer, or the one
  reading the spec's site. In the store a transcoder is an `sae` row like an SAE (site = read site; its write sites
  and kind in the row's cfg), reloaded from its path by stored_spec.
- `tokens`: features computed from the token ids alone, with no site read (TokenSpec; the planted features).

The store keys a feature by (site, source, index); its `site` is the source's read site.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from autointerp.subject import hub
from autointerp.subject.model import Subject
from autointerp.subject.names import SiteError, parse_site
from autointerp.subject.sae import SAE, SAEFormatError, load_sae, sae_dirs, sae_parts, stable_id

NEURONS = "neurons"  # the `source` of neuron features in the store
TRANSCODER = "transcoder"  # the kind of sources loaded from a transcoder directory

Encoder = Callable[[torch.Tensor], torch.Tensor]
SparseEncoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class SourceError(ValueError):
    """A source that cannot be loaded or used as asked: one the database cannot say how to load, a feature index
    out of range, a direction asked of a source that has none."""


@dataclass(frozen=True)
class FeatureSource:
    """One loaded source of features on a loaded subject model."""

    kind: str
    """Its SOURCE_KINDS entry: `neurons`, `sae`, `tokens`."""
    name: str
    """The store's `source` of its features: `neurons`, the SAE's content id, `planted`."""
    read_site: str
    """Where its activations are read (collect, inspect, the activation on continuations); the features' site."""
    write_site: str
    """Where its features write (steering hooks, logit lens); equal to read_site for neurons and SAEs."""
    n_features: int
    encoder: Encoder
    """Read-site tensor [..., d_read] -> activations [..., n_features] (token ids [...] when from_tokens)."""
    direction: Callable[[int], torch.Tensor] | None = None
    """Feature index -> unit direction [d_write] at the write site; None: the features write nowhere (tokens)."""
    sparse_encoder: SparseEncoder | None = None
    """Read-site tensor [..., d_read] -> (values [..., k], feature indices [..., k]) of its active features, for a
    source whose activations are sparse by construction (TopK SAEs); None: dense."""
    from_tokens: bool = False
    """The encoder reads the token ids, not a site (planted features)."""
    sae: SAE | None = None
    """The SAE it reads through (kind `sae`): interventions clamp through it, collect registers it."""
    path: str | None = None
    """Where it was loaded from (kind `sae`)."""
    write_sites: tuple[str, ...] = ()
    """Every site its features write, write_site first (a cross-layer transcoder's layer writes each later layer);
    empty: write_site alone."""
    site_directions: Callable[[int], list[torch.Tensor]] | None = None
    """Feature index -> its direction at each of write_sites, jointly of unit norm (their relative sizes kept);
    None: `direction` at the one write site."""

    @property
    def sparse(self) -> bool:
        return self.sparse_encoder is not None

    @property
    def writes(self) -> tuple[str, ...]:
        """The sites its features write, write_site first."""
        return self.write_sites or (self.write_site,)

    def write_directions(self, index: int) -> list[tuple[str, torch.Tensor]]:
        """(site, direction) for each write site: the vectors steering adds at each (jointly of unit norm)."""
        if self.site_directions is None:
            return [(self.write_site, self.decoder_direction(index))]
        self.decoder_direction(index)  # range and direction checks
        return list(zip(self.writes, self.site_directions(index), strict=True))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sparse_encoder is None:
            raise SourceError(f"source {self.name} at {self.read_site} is dense: use encode")
        return self.sparse_encoder(x)

    def decoder_direction(self, index: int) -> torch.Tensor:
        """[d_write] the unit vector feature `index` writes along at the write site (a decoder row over its norm)."""
        if self.direction is None:
            raise SourceError(f"source {self.name} at {self.read_site} writes nowhere: its features have no direction")
        if not 0 <= index < self.n_features:
            raise SourceError(f"feature {index} out of range: source {self.name} has {self.n_features} features")
        return self.direction(index)


# ----------------------------------------------------------------------------------------------------
# Specs: what to load (from a config, or from what the database says was collected)


@dataclass(frozen=True)
class NeuronSpec:
    site: str
    kind: ClassVar[str] = "neurons"


@dataclass(frozen=True)
class SAESource:
    path: str
    """An SAE directory, or a folder of several (one source each)."""
    site: str | None = None
    """The site it reads; None: the one its cfg names."""
    expect_id: str | None = None
    """The content id it must have (a stored source: the SAE collected, not another one at the same path)."""
    kind: ClassVar[str] = "sae"


@dataclass(frozen=True)
class TokenSpec:
    name: str
    site: str
    """Where the features are filed (they read no site)."""
    n_features: int
    build: Callable[[Any], Encoder]
    """Tokenizer -> the encoder over token ids [...] -> activations [..., n_features]."""
    kind: ClassVar[str] = "tokens"


SourceSpec = NeuronSpec | SAESource | TokenSpec


def _site_width(subject: Subject, site: str) -> int:
    ref = parse_site(site)
    width = subject.layout.site_width(subject.model, ref)
    subject.layout.locate(subject.model, ref)  # fails early on a layer the model lacks
    return width


def neuron_source(site: str, width: int) -> FeatureSource:
    def unit(index: int) -> torch.Tensor:
        e = torch.zeros(width)
        e[index] = 1.0
        return e

    return FeatureSource(NEURONS, NEURONS, site, site, width, lambda x: x, unit)


def sae_source(sae: SAE, sae_id: str, site: str, path: str | None = None) -> FeatureSource:
    """The latents of a loaded SAE that reads and writes `site`."""

    def unit(index: int) -> torch.Tensor:
        row = sae.W_dec[index]
        return row / row.norm()

    def topk(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lead = x.shape[:-1]
        values, indices = sae.encode_sparse(x.reshape(-1, x.shape[-1]))
        return values.reshape(*lead, -1), indices.reshape(*lead, -1)

    sparse = topk if sae.cfg.architecture == "topk" else None
    return FeatureSource("sae", sae_id, site, site, sae.d_sae, sae.encode, unit, sparse, sae=sae, path=path)


def transcoder_source(sae: SAE, sae_id: str, path: str | None = None) -> FeatureSource:
    """The latents of a loaded transcoder: read at its cfg's site, written at its write sites."""
    read, writes = sae.cfg.site, sae.cfg.write_sites
    assert read is not None and writes  # the loaders give both

    def unit(index: int) -> torch.Tensor:
        row = sae.direction(index, 0)
        return row / row.norm()

    def each(index: int) -> list[torch.Tensor]:
        norm = sae.W_dec[index].norm()  # over every write site: steering keeps the decoder's proportions
        return [sae.direction(index, j) / norm for j in range(len(writes))]

    base = sae_source(sae, sae_id, read, path)
    return FeatureSource(
        TRANSCODER, sae_id, read, writes[0], sae.d_sae, sae.encode, unit, base.sparse_encoder,
        sae=sae, path=path, write_sites=writes, site_directions=each,
    )  # fmt: skip


def transcoder_record(source: FeatureSource) -> dict[str, Any]:
    """What the store keeps of a transcoder source beside its cfg (under the cfg's `autointerp` key): its kind and
    its sites, for the feature page (review.pages.transcoder_line) and for readers of the database."""
    return {"kind": source.kind, "read_site": source.read_site, "write_sites": list(source.writes)}


def _neurons(spec: NeuronSpec, subject: Subject) -> list[FeatureSource]:
    return [neuron_source(spec.site, _site_width(subject, spec.site))]


def _width(subject: Subject, site: str, path: str, role: str) -> int:
    try:
        return _site_width(subject, site)
    except SiteError as e:
        raise SAEFormatError(f"{path}: it {role} {site}, which this {subject.layout.family} model lacks: {e}") from None


def _check_transcoder(sae: SAE, subject: Subject, path: str) -> None:
    """Its write sites exist with its output width; a cross-layer transcoder spans the model's layers."""
    n = sae.cfg.raw.get("n_layers")
    if isinstance(n, int) and n != subject.n_layers:
        raise SAEFormatError(f"{path}: a cross-layer transcoder of {n} layers, but the model has {subject.n_layers}")
    for site in sae.cfg.write_sites:
        width = _width(subject, site, path, "writes")
        if sae.cfg.out_width != width:
            raise SAEFormatError(f"{path}: d_out={sae.cfg.out_width} does not match write site {site} of width {width}")


def _saes(spec: SAESource, subject: Subject) -> list[FeatureSource]:
    out = []
    family = getattr(subject.model.config, "model_type", None)
    base = hub.local_sae_dir(spec.path)  # a hub name (hf://, saelens:) as the folder it was fetched to
    for root in sae_dirs(base):  # a folder of several SAEs (a sparsify run) stands for each of them
        path = hub.sae_name(spec.path, base, root)
        parts = sae_parts(root, family)  # one directory, one transcoder per layer (circuit-tracer)
        for want in [spec.site] if spec.site is not None or parts is None else parts:
            # Loaded once: its cfg names the site, whose width is then checked against the SAE's d_in.
            sae = load_sae(root, expected_site=want, device=str(subject.device), family=family)
            site = want or sae.cfg.site
            if site is None:
                raise SAEFormatError(
                    f"{path}: the SAE names no site (SAELens cfg.json hook_name, sparsify hookpoint folder name); "
                    "give site = ... in the config"
                )
            width = _width(subject, site, path, "reads")
            if sae.d_in != width:
                raise SAEFormatError(f"{path}: d_in={sae.d_in} does not match site {site} of width {width}")
            if sae.cfg.is_transcoder:
                _check_transcoder(sae, subject, path)
            sae_id = stable_id(sae)
            if spec.expect_id is not None and sae_id != spec.expect_id:
                raise SourceError(
                    f"the SAE at {path} is not the one collected (its id is {sae_id}, not {spec.expect_id})"
                )
            out.append(
                transcoder_source(sae, sae_id, path) if sae.cfg.is_transcoder else sae_source(sae, sae_id, site, path)
            )
    return out


def _tokens(spec: TokenSpec, subject: Subject) -> list[FeatureSource]:
    encoder = spec.build(subject.tokenizer)
    return [FeatureSource("tokens", spec.name, spec.site, spec.site, spec.n_features, encoder, from_tokens=True)]


SOURCE_KINDS: dict[str, Callable[[Any, Subject], list[FeatureSource]]] = {
    NeuronSpec.kind: _neurons,
    SAESource.kind: _saes,
    TokenSpec.kind: _tokens,
}
"""The source kinds, by the `kind` of their spec: spec, subject -> the sources it stands for.

To add a kind (a transcoder, say): write a frozen spec dataclass with a `kind` ClassVar and the fields it loads
from, add it to SourceSpec, and register a loader here that checks its sites against the subject (_site_width) and
returns FeatureSources with its own read_site and write_site, encoder and unit decoder directions (one per feature,
at the write site). Collect, inspect, add-steering and the logit lens then work on it unchanged; clamp and ablate
need a Target for it in intervene.hooks.TARGETS (without one, its features take `add` only). A stored feature names
only (site, source): to reload the kind from the database, record it where stored_spec can tell it apart."""


def load_sources(subject: Subject, specs: Sequence[SourceSpec]) -> list[FeatureSource]:
    """The sources of `specs` on `subject`, in order (a folder of several SAEs gives one source per SAE)."""
    out: list[FeatureSource] = []
    for spec in specs:
        load = SOURCE_KINDS.get(spec.kind)
        if load is None:
            raise SourceError(f"unknown source kind {spec.kind!r}; known: {', '.join(SOURCE_KINDS)}")
        out += load(spec, subject)
    return out


def stored_spec(site: str, source: str, sae_path: str | None) -> SourceSpec:
    """The spec of a collected source from its features' (site, source) and the SAE path the database holds for
    it: neurons of the site, or the SAE collected there (checked to be that one by its content id)."""
    if source == NEURONS:
        return NeuronSpec(site)
    if sae_path is None:
        raise SourceError(
            f"source {source!r} at {site} cannot be loaded: the database names no SAE directory for it "
            "(only neurons and SAE latents are reloaded from a database)"
        )
    return SAESource(sae_path, site=site, expect_id=source)
