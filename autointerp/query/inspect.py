"""`autointerp inspect`: which of the collected features fire on a text, token by token.

The subject model runs on the text with the collector's hooks (subject.sites.capture) at the read sites of the
collected sources, loaded through the collector's loader (subject.sources): neuron activations are read as they
are, SAE latents through the same SAE (checked to be the one collected: its content id). Each activation is shown
relative to the feature's max over the collection, with the feature's best explanation. Contexts start with BOS as
collected contexts do (its position is not shown); a text longer than the model's context is cut into windows of
that length, each with its own BOS. Imports torch when it loads the sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from autointerp.store.engine import Store
from autointerp.store.queries import model_source, sae_path
from autointerp.store.search import QueryError
from autointerp.store.views import best_explanations, feature_sources, feature_table, skipped_positions

if TYPE_CHECKING:  # torch comes with it; imported when a subject is loaded, not with the query commands
    from autointerp.subject.sources import FeatureSource


@dataclass(frozen=True)
class Firing:
    feature: str
    site: str
    source: str
    index: int
    activation: float
    relative: float  # activation / the feature's max over the collection
    explanation: str | None


@dataclass(frozen=True)
class TokenFiring:
    position: int  # in the text's tokens (BOS not counted)
    window: int
    token: str
    features: list[Firing]


@dataclass(frozen=True)
class InspectResult:
    model: str
    text: str
    n_tokens: int
    window: int  # text tokens per window (the model's context less the BOS)
    n_windows: int
    skipped: int  # first positions of each window left out: the collector does not record them (attention sinks)
    sources: list[str]  # SITE/SOURCE of each source read
    tokens: list[TokenFiring]


@dataclass(frozen=True)
class Collected:
    """A collected source as loaded on the subject (subject.sources), with its features' rows."""

    feature_source: FeatureSource
    ids: np.ndarray  # index -> feature row id (0: none)
    maxima: np.ndarray  # index -> the feature's max activation
    keys: list[str]

    @property
    def site(self) -> str:
        return self.feature_source.read_site

    @property
    def source(self) -> str:
        return self.feature_source.name


def model_of(store: Store, model: str | None) -> str:
    models = sorted({m for m, _s, _src in feature_sources(store)})
    if model is not None:
        if model not in models:
            raise QueryError(f"no features of model {model!r} in the database (have: {', '.join(models) or 'none'})")
        return model
    if len(models) != 1:
        raise QueryError(
            "the database holds no features yet: run `autointerp collect` first"
            if not models
            else f"the database holds features of several models ({', '.join(models)}): choose one"
        )
    return models[0]


def collected_sources(store: Store, subject: Any, model: str, sites: Sequence[str] | None = None) -> list[Collected]:
    """The collected sources of `model` (at `sites`, if given), loaded on `subject` as the collector loaded them
    (an SAE is checked to be the one collected: its content id)."""
    from autointerp.subject.sources import SourceError, load_sources, stored_spec

    have = [(s, src) for m, s, src in feature_sources(store) if m == model]
    if sites:
        known = sorted({s for s, _src in have})
        for s in sites:
            if s not in known:
                raise QueryError(f"no features collected at site {s!r} (have: {', '.join(known)})")
        have = [(s, src) for s, src in have if s in sites]
    out = []
    for site, source in have:
        try:
            (loaded,) = load_sources(subject, [stored_spec(site, source, sae_path(store, source))])
        except SourceError as exc:
            raise QueryError(str(exc)) from None
        out.append(Collected(loaded, *feature_table(store, model, site, source)))
    return out


def context_length(subject: Any) -> int:
    cfg = subject.model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048)


def activations(subject: Any, sources: Sequence[Collected], ids: Sequence[int], window: int) -> list[np.ndarray]:
    """Each source's activations [len(ids), width] on the token ids, read in windows of `window` tokens with a BOS
    before each (the BOS position dropped), as the collector reads its contexts."""
    import torch

    from autointerp.subject.sites import capture

    sites = sorted({s.feature_source.read_site for s in sources if not s.feature_source.from_tokens})
    parts: list[list[np.ndarray]] = [[] for _ in sources]
    for start in range(0, len(ids), window):
        chunk = [subject.bos_token_id, *ids[start : start + window]]
        x = torch.tensor([chunk], device=subject.device)
        got = capture(subject.model, subject.layout, sites, x) if sites else {}
        with torch.inference_mode():
            for k, src in enumerate(sources):
                fs = src.feature_source
                acts = fs.encode(x[0, 1:]) if fs.from_tokens else fs.encode(got[fs.read_site][0, 1:].float())
                parts[k].append(acts.float().cpu().numpy())
    return [
        np.concatenate(p) if p else np.zeros((0, len(s.ids)), np.float32) for p, s in zip(parts, sources, strict=True)
    ]


def inspect_ids(
    store: Store,
    subject: Any,
    sources: Sequence[Collected],
    ids: Sequence[int],
    *,
    model: str = "",
    text: str = "",
    top: int = 5,
    window: int | None = None,
    skip: int = 0,
    method: str = "simulation",
) -> InspectResult:
    """The `top` features that fire most on each token (by activation relative to their max; > 0 only). The
    first `skip` positions of each window get none: the collection never recorded such positions, so their
    activations (attention-sink outliers) have no max to be relative to."""
    from autointerp.subject.tokens import token_strings

    if top < 1:
        raise QueryError(f"top must be at least 1, not {top}")
    if not sources:
        raise QueryError("no collected sources to read")
    window = window or context_length(subject) - 1
    acts = activations(subject, sources, ids, window)
    picked: list[list[tuple[float, int, int, float]]] = [[] for _ in ids]  # (relative, source, index, act)
    for k, (src, a) in enumerate(zip(sources, acts, strict=True)):
        width = min(a.shape[1], len(src.maxima))
        a = a[:, :width]
        scale = np.where((src.maxima[:width] > 0) & (src.ids[:width] > 0), src.maxima[:width], np.inf)
        rel = np.where(a > 0, a / scale, 0.0)
        kk = min(top, width)
        best = np.argpartition(-rel, kk - 1, axis=1)[:, :kk] if kk < width else np.tile(np.arange(width), (len(a), 1))
        for t in range(len(a)):
            if t % window < skip:
                continue
            picked[t] += [(float(rel[t, i]), k, int(i), float(a[t, i])) for i in best[t] if rel[t, i] > 0]
    chosen = [sorted(p, key=lambda r: (-r[0], r[1], r[2]))[:top] for p in picked]
    fids = sorted({int(sources[k].ids[i]) for row in chosen for _r, k, i, _a in row})
    texts = best_explanations(store, fids, method)
    strings = token_strings(subject.tokenizer, ids)
    tokens = [
        TokenFiring(
            position=t,
            window=t // window,
            token=strings[t],
            features=[
                Firing(
                    sources[k].keys[i],
                    sources[k].site,
                    sources[k].source,
                    i,
                    act,
                    rel,
                    texts.get(int(sources[k].ids[i])),
                )  # fmt: skip
                for rel, k, i, act in chosen[t]
            ],
        )
        for t in range(len(ids))
    ]
    return InspectResult(
        model=model or str(getattr(subject, "name", "")),
        text=text,
        n_tokens=len(ids),
        window=window,
        n_windows=-(-len(ids) // window) if ids else 0,
        skipped=skip,
        sources=[f"{s.site}/{s.source}" for s in sources],
        tokens=tokens,
    )


def inspect_text(
    store: Store,
    text: str,
    *,
    sites: Sequence[str] | None = None,
    top: int = 5,
    model: str | None = None,
    subject: Any = None,
    device: str = "cpu",
    window: int | None = None,
    method: str = "simulation",
) -> InspectResult:
    """Run the subject model on `text` and say which collected features fire on each of its tokens."""
    if not text.strip():
        raise QueryError("empty text: give the text to run the model on")
    name = model_of(store, model)
    if subject is None:
        from autointerp.subject.model import load_subject

        subject = load_subject(model_source(store, name) or name, device=device)
    sources = collected_sources(store, subject, name, sites)
    ids = subject.tokenizer(text, add_special_tokens=False)["input_ids"]
    skip = skipped_positions(store, name)
    return inspect_ids(
        store, subject, sources, ids, model=name, text=text, top=top, window=window, skip=skip, method=method
    )
