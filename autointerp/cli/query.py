"""The query commands: features list / show, search, export, inspect, usage, llm check (no torch on their path,
but inspect's, which runs the model)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from autointerp.cli import ConfigOpt, DbOpt, _cfg, _store, app, console, features_app, llm_app, out


@contextmanager
def _bad_query() -> Iterator[None]:
    """A query the database cannot answer as asked is bad input: `error: ...` and exit 2 (what main() does for
    the errors in _USER_ERRORS; these are answered here until that list names them)."""
    from autointerp.query.encoder import EncoderError
    from autointerp.store.search import QueryError

    try:
        yield
    except (QueryError, EncoderError) as exc:
        from rich.text import Text

        console.print(Text.assemble(("error:", "red"), f" {exc}"))
        raise typer.Exit(2) from None


Method = Annotated[str | None, typer.Option(help="Score method the score bounds apply to (default simulation).")]
MinScore = Annotated[float | None, typer.Option(help="Only where the best score of --method reaches this.")]
MaxScore = Annotated[float | None, typer.Option(help="Only where the best score of --method is at most this.")]
Verdict = Annotated[str | None, typer.Option(help="verified, unverified or contradicted (the causal check's).")]
Explainer = Annotated[str | None, typer.Option(help="Only explanations of this explainer (llm, tokens).")]


@features_app.command("list")
def features_list(
    db: DbOpt = None,
    config: ConfigOpt = None,
    site: Annotated[str | None, typer.Option(help="Only this site.")] = None,
    source: Annotated[str | None, typer.Option(help="'neurons' or an SAE id.")] = None,
    status: Annotated[str | None, typer.Option(help="ok or dead.")] = None,
    sort: Annotated[str, typer.Option(help="max, density, mean, index or score.")] = "max",
    limit: Annotated[int, typer.Option(help="Rows to print (at least 1).")] = 50,
    every: Annotated[bool, typer.Option("--all", help="Every row (no --limit).")] = False,
    min_score: Annotated[float | None, typer.Option(help="Only features whose best score reaches this.")] = None,
    max_score: MaxScore = None,
    method: Annotated[str, typer.Option(help="Score method behind --sort score / --min-score.")] = "simulation",
    verdict: Verdict = None,
    explainer: Explainer = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON list for scripts.")] = False,
) -> None:
    """List features with their statistics (and best score, once scored)."""
    from autointerp.cli.render import features_json, features_table
    from autointerp.store.browse import check_sort
    from autointerp.store.queries import list_features

    with _bad_query():
        check_sort(sort)  # before the database opens
    if status not in (None, "ok", "dead"):
        raise typer.BadParameter(f"give ok or dead, not {status!r}", param_hint="--status")
    cfg = _cfg(config, {"db": db})
    store = _store(cfg.db)
    with _bad_query():
        rows = list_features(
            store,
            site=site,
            source=source,
            status=status,
            sort=sort,
            limit=None if every else limit,
            score_method=method,
            min_score=min_score,
            max_score=max_score,
            explainer=explainer,
            verdict=verdict,
        )
        if not rows:
            _unknown_site_or_source(store, site, source, explainer=explainer)
    if as_json:
        out.print(features_json(rows), markup=False)
    else:
        out.print(features_table(rows, width=out.width))


def _unknown_site_or_source(store: object, site: str | None, source: str | None, site_flag: str = "--site",
                            explainer: str | None = None) -> None:  # fmt: skip
    """An empty answer because no feature has the --site or --source asked for (or no explanation the --explainer)
    is an error that lists those that exist (a typo otherwise looks like a filter that matched nothing)."""
    from autointerp.store.queries import distinct_values
    from autointerp.store.search import QueryError

    asked = ((site_flag, site, "site"), ("--source", source, "source"), ("--explainer", explainer, "explainer"))
    for flag, value, column in asked:
        if value:
            have = distinct_values(store, column)  # type: ignore[arg-type]
            if value not in have:
                raise QueryError(f"no feature has {column} {value!r} ({flag}); the {column}s there: "
                                 f"{', '.join(have) or 'none (nothing collected)'}")  # fmt: skip


@features_app.command("show")
def features_show(
    feature_id: Annotated[str, typer.Argument(help="MODEL/SITE/SOURCE/INDEX or a unique suffix of it.")],
    db: DbOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON object for scripts.")] = False,
    per_role: Annotated[int, typer.Option(help="Contexts printed per role.")] = 8,
) -> None:
    """Show a feature: statistics, histogram and its top, quantile and random contexts."""
    from autointerp.cli.show import feature_json, print_feature

    if per_role < 0:
        raise typer.BadParameter(f"give 0 or more contexts per role, not {per_role}", param_hint="--per-role")
    store = _store(_cfg(config, {"db": db}).db)
    if as_json:
        out.print(json.dumps(feature_json(store, feature_id)), markup=False)
    else:
        print_feature(out, store, feature_id, per_role=per_role)


@llm_app.command("check")
def llm_check(
    config: ConfigOpt = None,
    llm: Annotated[str, typer.Option(help="Name of an [llm.NAME] config block.")] = "local",
    as_json: Annotated[bool, typer.Option("--json", help="JSON object for scripts.")] = False,
) -> None:
    """One round trip to an LLM (no cache): backend, model, latency and whether prompt logprobs work."""
    from autointerp.llm.check import check_llm

    res = check_llm(_cfg(config, {}), llm)
    if as_json:
        out.print(json.dumps(res), markup=False)
        return
    for k, v in res.items():
        out.print(f"{k:>16}: {v}")


@app.command()
def usage(
    config: ConfigOpt = None,
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON object for scripts.")] = False,
) -> None:
    """LLM calls, tokens and cost by backend, model and stage (cache hits are not calls)."""
    from autointerp.cli.render import usage_json, usage_table
    from autointerp.store.llm_log import usage_summary

    rows = usage_summary(_store(_cfg(config, {"db": db}).db))
    out.print(usage_json(rows) if as_json else usage_table(rows), markup=False)


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="Words to find in the explanations (or a meaning, with --semantic).")],
    db: DbOpt = None,
    config: ConfigOpt = None,
    semantic: Annotated[bool, typer.Option(help="Rank by meaning (sentence embeddings) instead of words.")] = False,
    site: Annotated[str | None, typer.Option(help="Only this site.")] = None,
    source: Annotated[str | None, typer.Option(help="'neurons' or an SAE id.")] = None,
    explainer: Explainer = None,
    method: Method = None,
    min_score: MinScore = None,
    max_score: MaxScore = None,
    verdict: Verdict = None,
    reviewed: Annotated[bool | None, typer.Option("--reviewed/--unreviewed", help="Only (un)reviewed ones.")] = None,
    limit: Annotated[int, typer.Option(help="Explanations to print.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="JSON object for scripts.")] = False,
) -> None:
    """Find explanations: full text (ranked, matched words marked), by meaning when no word matches or with
    --semantic; with filters on scores, verdicts and where the feature is."""
    from autointerp.cli.render import search_json, search_lines
    from autointerp.query.search import search as run_search
    from autointerp.store.engine import sqlite_file
    from autointerp.store.queries import check_limit
    from autointerp.store.search import Filters

    store = _store(_cfg(config, {"db": db}).db)
    flt = Filters(site, source, explainer, method, min_score, max_score, verdict, reviewed)
    with _bad_query():
        check_limit(limit)
        result = run_search(store, query, semantic=semantic, filters=flt, limit=limit)
        if not result.hits:
            _unknown_site_or_source(store, site, source, explainer=explainer)
    if result.unembedded:
        console.print(
            f"note: database {sqlite_file(store.url) or store.url} is read-only and {result.unembedded} explanations "
            "have no embedding yet: "
            "searching by meaning stores them the first time, and they cannot be stored here, so it saw only the "
            "others (run it once on a writable copy; later searches only read them)"
        )
    if as_json:
        out.print(search_json(result), markup=False)
        return
    for line in search_lines(result):
        out.print(line)


@app.command("export")
def export_cmd(
    db: DbOpt = None,
    config: ConfigOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl (a feature a line) or neuronpedia.")] = "jsonl",
    features: Annotated[str | None, typer.Option(help="all (default), explained, or ids, sites, sources.")] = None,
    method: Annotated[str, typer.Option(help="Score method --min-score applies to.")] = "simulation",
    min_score: MinScore = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="File to write (default: standard output).")] = None,
) -> None:
    """Write features with every explanation, score and verdict as JSON lines (streamed), or Neuronpedia's
    explanation records."""
    from autointerp.query.export import export, export_to_file

    store = _store(_cfg(config, {"db": db}).db)
    with _bad_query():
        if out_file is not None:
            summary = export_to_file(store, out_file, fmt=fmt, selector=features, method=method, min_score=min_score)
        else:
            summary = export(store, sys.stdout, fmt=fmt, selector=features, method=method, min_score=min_score)
    where = f" to {out_file}" if out_file else ""
    console.print(f"exported {summary.features} features ({summary.records} lines){where}")


@app.command("inspect")
def inspect_cmd(
    text: Annotated[str, typer.Argument(help="The text to run the subject model on.")],
    db: DbOpt = None,
    config: ConfigOpt = None,
    sites: Annotated[str | None, typer.Option(help="Comma-separated sites to read (default: every collected).")] = None,
    top: Annotated[int, typer.Option(help="Features shown per token.")] = 5,
    model: Annotated[str | None, typer.Option(help="Subject model (when the database holds several).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="JSON object for scripts.")] = False,
) -> None:
    """Which collected features fire on each token of a text, relative to their max, with their explanations."""
    from autointerp.cli.checks import check_device
    from autointerp.cli.render import inspect_json, inspect_lines
    from autointerp.query.inspect import inspect_text

    if top < 1:
        raise typer.BadParameter(f"give at least 1 feature per token, not {top}", param_hint="--top")
    check_device(device)
    store = _store(_cfg(config, {"db": db}).db)
    chosen = [s.strip() for s in sites.split(",") if s.strip()] if sites else None
    with _bad_query():
        for site in chosen or []:  # before the model loads
            _unknown_site_or_source(store, site, None, "--sites")
        result = inspect_text(store, text, sites=chosen, top=top, model=model, device=device)
    if as_json:
        out.print(inspect_json(result), markup=False)
        return
    for line in inspect_lines(result):
        out.print(line)
