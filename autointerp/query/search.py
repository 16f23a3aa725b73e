"""`autointerp search`: which explanations (and so which features) are about something.

Full text by default: ok explanations containing any of the query's words (stemmed, stop words dropped), ranked
by bm25 on SQLite and ts_rank_cd on PostgreSQL, each with a snippet marking the words. When nothing matches, or
with `semantic=True`, by meaning: cosine similarity of all-MiniLM-L6-v2 embeddings (numpy, no torch). Filters on
site, source, explainer, score range, verdict and review apply to both. No torch is imported on this path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from autointerp.store.engine import Store
from autointerp.store.search import (
    MARK,
    Filters,
    QueryError,
    fulltext,
    has_explanations,
    require_query_schema,
    terms,
)
from autointerp.store.views import explanation_details

Mode = Literal["fulltext", "semantic"]


@dataclass(frozen=True)
class SearchHit:
    feature: str  # MODEL/SITE/SOURCE/INDEX
    model: str
    site: str
    source: str
    index: int
    explanation_id: int
    explanation: str
    snippet: str  # the explanation with the matched words <<marked>> (semantic hits: the explanation)
    explainer: str
    explainer_model: str
    relevance: float  # full text: bm25 (SQLite) or ts_rank_cd (PostgreSQL); semantic: cosine similarity
    scores: dict[str, float] = field(default_factory=dict)  # best score of this explanation by each method
    verdict: str | None = None


@dataclass(frozen=True)
class SearchResult:
    query: str
    mode: Mode
    fallback: bool  # full text matched nothing, so these are the semantic hits
    hits: list[SearchHit]
    unembedded: int = 0  # explanations a search by meaning could not see (a read-only database without them)


def search(
    store: Store,
    query: str,
    *,
    semantic: bool = False,
    filters: Filters | None = None,
    limit: int = 20,
    encoder: Any = None,
) -> SearchResult:
    """Search the ok explanations; see the module docstring. QueryError for an empty query, bad filters, a limit
    under 1, or a database without explanations."""
    if not query.strip():
        raise QueryError("empty query: give words to search the explanations for")
    if limit < 1:
        raise QueryError(f"limit must be at least 1, not {limit}")
    f = (filters or Filters()).checked()
    require_query_schema(store)
    if not has_explanations(store):
        raise QueryError("the database has no explanations to search yet: run `autointerp explain` first")
    fallback = False
    if not semantic:
        text_hits = fulltext(store, terms(query), f, limit)
        if text_hits:
            ranked: list[tuple[int, float, str | None]] = [(h.explanation_id, h.rank, h.snippet) for h in text_hits]
            return SearchResult(query, "fulltext", False, _hits(store, ranked))
        fallback = True
    from autointerp.query.embeddings import nearest

    near, missing = nearest(store, query, f, limit, encoder)
    return SearchResult(query, "semantic", fallback, _hits(store, [(i, s, None) for i, s in near]), missing)


def _hits(store: Store, ranked: list[tuple[int, float, str | None]]) -> list[SearchHit]:
    rows = explanation_details(store, [i for i, _r, _s in ranked])
    out = []
    for i, rel, snip in ranked:
        r = rows[i]
        out.append(
            SearchHit(
                feature=r["feature"],
                model=r["model"],
                site=r["site"],
                source=r["source"],
                index=int(r["index"]),
                explanation_id=i,
                explanation=r["text"],
                snippet=snip if snip is not None else r["text"],
                explainer=r["explainer"],
                explainer_model=r["explainer_model"],
                relevance=rel,
                scores=r["scores"],
                verdict=r["verdict"],
            )
        )
    return out


def unmarked(snippet: str) -> str:
    """A snippet without its marks."""
    return snippet.replace(MARK[0], "").replace(MARK[1], "")
