"""The job commands: run (the whole pipeline as one resumable, budgeted job) and status (where it stands)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from autointerp.cli import ConfigOpt, DbOpt, _cfg, _progress, _store, app, console, out
from autointerp.cli.checks import check_collect
from autointerp.jobs.stage import PIPELINE


@contextmanager
def _graceful(stop: Any, grace_s: float) -> Iterator[None]:
    """First Ctrl-C or SIGTERM: stop claiming, let the units in flight finish (at most grace_s); a second one,
    or the grace period running out, stops at once (KeyboardInterrupt)."""

    def first(signum: int, _frame: Any) -> None:
        if stop.reason is not None:
            raise KeyboardInterrupt
        stop.reason = f"interrupted by {signal.Signals(signum).name}"
        console.print(f"{stop.reason}: finishing the units in flight (at most {grace_s:.0f}s); again to stop at once")
        if grace_s > 0:
            signal.alarm(max(1, int(grace_s)))

    def late(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, first), (signal.SIGTERM, first), (signal.SIGALRM, late))}
    try:
        yield
    finally:
        signal.alarm(0)
        for s, h in old.items():
            signal.signal(s, h)


def _deadline(until: str | None, for_: str | None) -> float | None:
    from autointerp.jobs.budget import BudgetError, parse_duration, parse_until

    if until and for_:
        raise BudgetError("give --until or --for, not both")
    if until:
        return parse_until(until)
    return time.time() + parse_duration(for_) if for_ else None


@app.command()
def run(
    config: ConfigOpt = None,
    db: DbOpt = None,
    stages: Annotated[str | None, typer.Option(help="Comma-separated: collect,explain,score,intervene.")] = None,
    features: Annotated[str | None, typer.Option(help="Feature selector (default: explain.features).")] = None,
    budget_usd: Annotated[float | None, typer.Option(help="Stop claiming before LLM spend crosses this.")] = None,
    max_llm_tokens: Annotated[int | None, typer.Option(help="... before LLM tokens cross this.")] = None,
    max_calls: Annotated[int | None, typer.Option(help="... before LLM calls cross this.")] = None,
    job: Annotated[
        str | None,
        typer.Option(
            help="The job's name: budgets count its spend over every worker and rerun (default: a hash of "
            "its stages and features); a new name starts a fresh budget."
        ),  # fmt: skip
    ] = None,
    until: Annotated[str | None, typer.Option(help="Stop claiming at this time: 07:00 or 2026-12-02T07:00.")] = None,
    for_: Annotated[str | None, typer.Option("--for", help="Stop claiming after this long: 8h, 90m.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print pending units and estimated cost; write nothing.")] = False,
    worker_name: Annotated[str | None, typer.Option(help="This worker's name (default host:pid).")] = None,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="Processes on this machine that run claimed chunks side by side.")
    ] = 1,
    engine: Annotated[
        str, typer.Option(help="Where claimed work runs: local (this machine) or ray (a Ray cluster).")
    ] = "local",
    address: Annotated[
        str | None, typer.Option(help="With --engine ray: auto or ray://HOST:10001 (default: start a local cluster).")
    ] = None,
    shards: Annotated[
        int | None,
        typer.Option(min=1, max=100_000, help="Collect as this many shards (default: one per worker or Ray slot)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The summary (or the estimate) as JSON.")] = False,
) -> None:
    """Run the pipeline the config describes for the selected features, with every explainer and scorer it names
    (resumable; several workers may share one database). Exit codes: 0 done, 3 a budget cap, 4 the deadline,
    130 interrupted; in every case the same command goes on where it stopped."""
    from autointerp.jobs.budget import EXIT_CODES, Budget
    from autointerp.jobs.executors import LocalExecutor, ProcessExecutor
    from autointerp.run.job import PipelineJob, StopFlag, check_job
    from autointerp.store.engine import sqlite_file

    stage_list = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    cfg = _cfg(config, {"db": db, "run.features": features})
    budget = Budget(budget_usd, max_llm_tokens, max_calls, _deadline(until, for_))
    stage_names = stage_list or cfg.run.stages or PIPELINE
    check_job(cfg, stage_names)  # before the database is opened (created or migrated)
    if "collect" in stage_names:
        check_collect(cfg)
    if dry_run:
        _dry_run(cfg, stage_list, as_json)
        return
    if engine not in ("local", "ray"):
        raise typer.BadParameter(f"choose local or ray, not {engine!r}", param_hint="--engine")
    if address is not None and engine != "ray":
        raise typer.BadParameter("--address is for --engine ray", param_hint="--address")
    if engine == "ray" and workers > 1:
        raise typer.BadParameter("give --workers or --engine ray, not both (Ray runs one task per slot)",
                                 param_hint="--workers")  # fmt: skip
    shared = workers > 1 or engine == "ray"
    if shared and sqlite_file(cfg.db) is None and cfg.db.startswith("sqlite"):
        what, hint = ("worker processes", "--workers") if workers > 1 else ("Ray tasks", "--engine")
        raise typer.BadParameter(f"an in-memory database cannot be shared by {what}", param_hint=hint)
    store = _store(cfg.db, create="collect" in stage_names, write=True)
    executor: Any
    if engine == "ray":
        from autointerp.jobs.ray_executor import RayError, RayExecutor

        try:
            executor = RayExecutor(address)
        except RayError as exc:
            raise typer.BadParameter(str(exc), param_hint="--engine ray") from None
        console.print(executor.describe())
    else:
        executor = ProcessExecutor(workers) if workers > 1 else LocalExecutor(store)
    stop = StopFlag()
    t0 = time.perf_counter()
    try:
        # the summary too is printed under the handler: a second Ctrl-C then still exits 130, without a traceback
        with _graceful(stop, cfg.run.grace_s):
            with _progress() as progress:
                job_run = PipelineJob(cfg, store, stages=stage_list, budget=budget, worker=worker_name,
                                      progress=progress, stop=stop, say=console.print, executor=executor,
                                      shards=shards, job=job)  # fmt: skip
                res = job_run.run()
            _summary(res, as_json, job_run)
    except KeyboardInterrupt:
        console.print(f"stopped at once after {time.perf_counter() - t0:.0f}s: the units in flight were given back, "
                      "everything written stays valid; resume with the same command")  # fmt: skip
        raise typer.Exit(EXIT_CODES["interrupted"]) from None
    finally:
        executor.close()  # the job closes it too; this covers a job that could not start (a local Ray cluster stops)
    raise typer.Exit(EXIT_CODES[res.status])


def _summary(res: Any, as_json: bool, job: Any) -> None:
    done = ", ".join(f"{k} {n}" for k, n in res.units_done.items()) or "nothing"
    sp = res.spent
    summary = {"status": res.status, "reason": res.reason, "units_done": res.units_done, "pending": res.pending,
               "llm_calls": sp.calls, "llm_tokens": sp.tokens, "cost_usd": round(sp.usd, 6),
               "seconds": round(res.seconds, 1), "run_ids": res.run_ids, "job": job.job_id}  # fmt: skip
    if as_json:
        out.print(json.dumps(summary))
    console.print(f"run {res.status}: units done by this worker: {done}; {res.pending} left; {sp.calls} LLM calls, "
                  f"{sp.tokens:,} tokens, ${sp.usd:.4f}; {res.seconds:.0f}s")  # fmt: skip
    if job.job_id:
        js = job.job_spent()
        console.print(f"job {job.job_id} (budgets count its spend over every worker and rerun): {js.calls} LLM calls, "
                      f"{js.tokens:,} tokens, ${js.usd:.4f} in all")  # fmt: skip
    if res.status != "done":
        how = {"budget": "go on with the same command and a higher cap",
               "deadline": "go on with the same command and a later --until or a longer --for"}  # fmt: skip
        console.print(f"stopped: {res.reason}; everything written stays valid; "
                      f"{how.get(res.status, 'resume with the same command')}")  # fmt: skip


def _dry_run(cfg: Any, stages: list[str] | None, as_json: bool) -> None:
    from autointerp.run.estimate import estimate
    from autointerp.store.engine import sqlite_file

    file = sqlite_file(cfg.db)
    if file is not None and not file.exists():
        # nothing is written, not even a new database: an empty one in memory says the same (nothing collected)
        console.print(f"dry run: {file} does not exist yet; the job would collect first, then explain what it finds")
        store = _store("sqlite://")
    else:
        store = _store(cfg.db)
    parts = estimate(cfg, store, stages or cfg.run.stages or PIPELINE)
    if as_json:
        out.print(json.dumps([p.to_dict() for p in parts]))
        return
    out.print(
        f"{'part':<16} {'pending':>8} {'calls':>8} {'prompt tok':>11} {'compl. tok':>11} {'cost $':>9} {'time':>8}"
    )
    for p in parts:
        t = "?" if p.seconds is None else f"{p.seconds / 60:.1f}m"
        out.print(f"{p.part:<16} {p.pending:>8} {p.calls:>8} {p.prompt_tokens:>11,} {p.completion_tokens:>11,} "
                  f"{p.cost_usd:>9.4f} {t:>8}")  # fmt: skip
    out.print("dry run: nothing was written (completion tokens from past usage where there is some, else max_tokens)")


@app.command()
def status(
    config: ConfigOpt = None,
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Stable JSON for scripts.")] = False,
    watch: Annotated[bool, typer.Option(help="Refresh until Ctrl-C.")] = False,
    every: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 2.0,
) -> None:
    """Where the jobs on a database stand: units per stage, rate, ETA, spend, workers alive, common errors (reads
    the store only: no torch, also while a job runs)."""
    from autointerp.cli.render import status_lines
    from autointerp.run.status import job_status

    if not every > 0:
        raise typer.BadParameter(f"give a number of seconds above 0, not {every}", param_hint="--every")
    cfg = _cfg(config, {"db": db})
    store = _store(cfg.db)
    try:
        while True:
            st = job_status(store, alive_s=3 * cfg.run.heartbeat_s)
            if watch and out.is_terminal:
                out.clear()
            out.print(json.dumps(st.to_dict()) if as_json else "\n".join(status_lines(st)))
            if not watch:
                return
            time.sleep(every)
    except KeyboardInterrupt:  # how --watch ends, also while it reads
        return
