"""The query commands: features list / show, usage, llm check (no torch on their path)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from autointerp.cli import ConfigOpt, DbOpt, _cfg, _store, app, features_app, llm_app, out


@features_app.command("list")
def features_list(
    db: DbOpt = None,
    config: ConfigOpt = None,
    site: Annotated[str | None, typer.Option(help="Only this site.")] = None,
    source: Annotated[str | None, typer.Option(help="'neurons' or an SAE id.")] = None,
    status: Annotated[str | None, typer.Option(help="ok or dead.")] = None,
    sort: Annotated[str, typer.Option(help="max, density, mean, index or score.")] = "max",
    limit: Annotated[int, typer.Option(help="Rows to print (0 = all).")] = 50,
    min_score: Annotated[float | None, typer.Option(help="Only features whose best score reaches this.")] = None,
    method: Annotated[str, typer.Option(help="Score method behind --sort score / --min-score.")] = "simulation",
    as_json: Annotated[bool, typer.Option("--json", help="JSON list for scripts.")] = False,
) -> None:
    """List features with their statistics (and best score, once scored)."""
    from autointerp.review.terminal import features_json, features_table
    from autointerp.store.queries import list_features

    if sort not in ("max", "density", "mean", "index", "score"):
        raise typer.BadParameter(f"--sort must be max, density, mean, index or score, not {sort!r}")
    cfg = _cfg(config, {"db": db})
    rows = list_features(
        _store(cfg.db),
        site=site,
        source=source,
        status=status,
        sort=sort,  # type: ignore[arg-type]
        limit=limit or None,
        score_method=method,
        min_score=min_score,
    )
    if as_json:
        out.print(features_json(rows), markup=False)
    else:
        out.print(features_table(rows, width=out.width))


@features_app.command("show")
def features_show(
    feature_id: Annotated[str, typer.Argument(help="MODEL/SITE/SOURCE/INDEX or a unique suffix of it.")],
    db: DbOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON object for scripts.")] = False,
    per_role: Annotated[int, typer.Option(help="Contexts printed per role.")] = 8,
) -> None:
    """Show a feature: statistics, histogram and its top, quantile and random contexts."""
    from autointerp.review.terminal import feature_json, print_feature

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
    from autointerp.review.terminal import usage_json, usage_table
    from autointerp.store.llm_log import usage_summary

    rows = usage_summary(_store(_cfg(config, {"db": db}).db))
    out.print(usage_json(rows) if as_json else usage_table(rows), markup=False)
