"""Rows that record what produced a collection: the subject model and its sites, with their widths."""

from __future__ import annotations

from collections.abc import Iterable

from autointerp.store.engine import Store
from autointerp.store.tables import SubjectModel
from autointerp.store.writes import upsert_model
from autointerp.subject.model import Subject
from autointerp.subject.sites import parse_site


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
