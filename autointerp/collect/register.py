"""Rows that record what produced a collection: the subject model and its sites, with their widths, and its SAEs."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from autointerp.store.engine import Store
from autointerp.store.tables import SAERow, SubjectModel
from autointerp.store.writes import upsert_model, upsert_sae
from autointerp.subject import hub
from autointerp.subject.model import Subject
from autointerp.subject.sites import parse_site
from autointerp.subject.sources import FeatureSource, transcoder_record


def register_subject(store: Store, subject: Subject, sites: Iterable[str]) -> None:
    """Upsert the subject model and the given sites (with their widths)."""
    row = SubjectModel(
        id=subject.name,
        family=subject.layout.family,
        source=subject.source,
        n_layers=subject.n_layers,
        d_model=subject.d_model,
        weights_hash=subject.weights_hash,
    )
    upsert_model(store, row, {s: subject.layout.site_width(subject.model, parse_site(s)) for s in sites})


def register_sources(store: Store, subject: Subject, sources: list[FeatureSource]) -> None:
    """Upsert the subject, the sources' read sites, and a row per SAE or transcoder (a hub name kept as its path,
    with its origin; a transcoder's kind and write sites in its cfg)."""
    register_subject(store, subject, {s.read_site for s in sources})
    for s in sources:
        if s.sae is None:
            continue
        assert s.path is not None  # an SAE source is loaded from a directory
        row = SAERow(
            id=s.name,
            model_id=subject.name,
            site=s.read_site,  # a feature's site is where it is read
            architecture=s.sae.cfg.architecture,
            d_in=s.sae.d_in,
            d_sae=s.sae.d_sae,
            k=s.sae.cfg.k,
            path=s.path if hub.is_hub_sae(s.path) else str(Path(s.path).resolve()),  # a hub name reloads as it is
            # A transcoder is an `sae` row read at `site`; its kind and write sites go with its cfg.
            cfg=s.sae.cfg.raw
            | ({"origin": hub.sae_origin(s.path)} if hub.is_hub_sae(s.path) else {})
            | ({} if s.kind == "sae" else {"autointerp": transcoder_record(s)}),
        )
        upsert_sae(store, row)
