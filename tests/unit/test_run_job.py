"""`autointerp run`: the pipeline as one job on a tiny GPT-2 with a scripted LLM. Features flow through the stages,
a rerun does nothing, budgets and deadlines stop the claiming with their exit codes, bad input is refused before
anything is written. Two workers on one database: tests/integration/test_run_job_workers.py."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from autointerp.config import load_config
from autointerp.jobs.budget import EXIT_BUDGET, EXIT_DEADLINE, Budget, BudgetError, Spend, parse_duration, parse_until
from autointerp.run.job import JobError, StopFlag
from autointerp.run.job import PipelineJob as Job
from autointerp.store import open_store
from autointerp.store.tables import Explanation, InterventionRow, LLMCall, Score, Unit, Verdict


def test_one_worker_runs_every_stage_and_a_rerun_does_nothing(
    collected_db: str, job_config: Any, job_rows: Any, llm_calls: Any
) -> None:
    cfg = job_config(collected_db)
    res = Job(cfg, open_store(cfg.db)).run()
    assert res.status == "done" and res.pending == 0
    assert res.units_done == {"explain:llm": 6, "explain:tokens": 6, "score": 6, "intervene": 6}
    got = job_rows(collected_db)
    assert len(got["explanation"]) == 12 and {e[1] for e in got["explanation"]} == {"llm", "tokens"}
    assert len(got["score"]) == 12 * 2 + 6  # 2 scorers x 12 explanations, then the judge on the 6 llm ones
    assert len(got["intervention"]) == 6 and len(got["verdict"]) == 6
    n = llm_calls(collected_db)
    assert n == res.spent.calls > 0
    again = Job(cfg, open_store(cfg.db)).run()
    assert again.status == "done" and sum(again.units_done.values()) == 0 and again.spent.calls == 0
    assert llm_calls(collected_db) == n and job_rows(collected_db) == got


def test_features_flow_through_the_stages(collected_db: str, job_config: Any, job_rows: Any) -> None:
    """Stopped once the first feature is checked, a job has explained only a chunk or so, not every feature."""
    cfg = job_config(collected_db)
    stop = StopFlag()

    def progress(phase: str, done: int, _total: int) -> None:
        if phase == "intervene" and done:
            stop.reason = "enough"

    res = Job(cfg, open_store(cfg.db), stop=stop, progress=progress).run()
    assert res.status == "interrupted" and res.units_done["intervene"] == 1
    got = job_rows(collected_db)
    explained = {e[0] for e in got["explanation"] if e[1] == "llm"}
    checked = {i[0] for i in got["intervention"]}
    assert len(checked) == 1 and checked <= explained
    assert len(explained) == cfg.explain.chunk  # the first chunk of features went all the way through first
    assert res.units_done["score"] == 1


def test_a_budget_stops_within_one_unit_and_a_higher_cap_goes_on(
    collected_db: str, tmp_path: Path, job_config: Any, job_rows: Any
) -> None:
    cfg = job_config(collected_db)
    cap = 0.002
    budget = Budget(max_usd=cap)
    res = Job(cfg, open_store(cfg.db), budget=budget).run()
    assert res.status == "budget" and "--budget-usd" in res.reason and res.pending > 0
    with open_store(cfg.db).session() as s:
        spent = sum(c.cost_usd for c in s.exec(select(LLMCall)))
    assert spent == pytest.approx(res.spent.usd)
    # no chunk was claimed once the costliest chunk so far would have crossed the cap: at most one chunk over
    assert cap - budget.largest.usd < spent <= cap + budget.largest.usd
    done = Job(cfg, open_store(cfg.db), budget=Budget(max_usd=10.0)).run()
    assert done.status == "done" and done.pending == 0
    # the same rows as one uninterrupted job on a copy of the collected database
    fresh = tmp_path / "fresh.sqlite"
    store = open_store(collected_db)
    with store.engine.connect() as con:
        src = con.connection.driver_connection  # type: ignore[union-attr]
        dst = sqlite3.connect(fresh)
        src.backup(dst)
        dst.close()
    fresh_url = f"sqlite:///{fresh}"
    with open_store(fresh_url).session() as s:
        for table in (Verdict, Score, InterventionRow, Explanation, LLMCall, Unit):
            for r in s.exec(select(table)):
                s.delete(r)
        s.commit()
    Job(job_config(fresh_url), open_store(fresh_url)).run()
    assert job_rows(fresh_url) == job_rows(collected_db)


def test_a_deadline_stops_the_claiming(collected_db: str, job_config: Any) -> None:
    cfg = job_config(collected_db)
    res = Job(cfg, open_store(cfg.db), budget=Budget(deadline=0.0)).run()
    assert res.status == "deadline" and sum(res.units_done.values()) == 0
    assert EXIT_DEADLINE == 4 and EXIT_BUDGET == 3


def test_a_stop_request_finishes_the_chunk_in_flight(collected_db: str, job_config: Any) -> None:
    cfg = job_config(collected_db)
    stop = StopFlag()
    seen: list[tuple[str, int, int]] = []

    def progress(phase: str, done: int, total: int) -> None:
        if done:  # not the reports of each part at its start
            seen.append((phase, done, total))
            stop.reason = "interrupted by SIGINT"  # as the CLI's handler does on the first Ctrl-C

    res = Job(cfg, open_store(cfg.db), stop=stop, progress=progress).run()
    assert res.status == "interrupted" and sum(res.units_done.values()) == cfg.explain.chunk and len(seen) == 1
    with open_store(cfg.db).session() as s:
        units = s.exec(select(Unit).where(Unit.stage != "collect")).all()
    assert not [u for u in units if u.status == "leased"]  # nothing left half-done or held


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"run.explainers": ["llm", "nosuch"]}, "unknown explainer 'nosuch'"),
        ({"intervene.explainer": "tokens", "run.explainers": ["llm"]}, "intervene.explainer 'tokens'"),
    ],
)
def test_bad_job_input_is_refused_before_anything_is_written(
    collected_db: str, over: dict[str, Any], message: str, job_config: Any, job_rows: Any
) -> None:
    cfg = job_config(collected_db, **over)
    before = job_rows(collected_db)
    with pytest.raises(JobError, match=message):
        Job(cfg, open_store(cfg.db)).run()
    with pytest.raises(JobError, match="unknown stage 'ship'"):
        Job(cfg, open_store(cfg.db), stages=["explain", "ship"])
    assert job_rows(collected_db) == before
    with open_store(cfg.db).session() as s:
        assert s.exec(select(Unit)).all() == []


def test_an_unknown_scorer_or_stage_in_the_config_is_a_config_error(collected_db: str, job_config: Any) -> None:
    from autointerp.config import ConfigError

    with pytest.raises(ConfigError, match=r"score.methods.1: .*\(got 'vibes'\)"):
        job_config(collected_db, **{"score.methods": ["detection", "vibes"]})
    with pytest.raises(ConfigError, match=r"run.stages: unknown stage 'ship': choose from collect, explain, score"):
        job_config(collected_db, **{"run.stages": ["ship"]})


def test_budget_and_deadline_flags_parse_or_say_why() -> None:
    assert parse_duration("8h") == 8 * 3600 and parse_duration("1h30m") == 5400 and parse_duration("45s") == 45
    for bad in ("soon", "", "8x"):
        with pytest.raises(BudgetError, match="--for"):
            parse_duration(bad)
    with pytest.raises(BudgetError, match="in the past"):
        parse_until("2020-01-01T07:00")
    with pytest.raises(BudgetError, match="not a time of day"):
        parse_until("25:00")
    with pytest.raises(BudgetError, match="--budget-usd must be a number >= 0"):
        Budget(max_usd=-1.0)
    # a cap of 0 claims nothing, not even the first chunk (whose cost is not known yet)
    assert "--max-calls 0 would be crossed" in (Budget(max_calls=0).stop_reason(Spend()) or "")
    assert Budget(max_calls=1).stop_reason(Spend()) is None
    assert Budget(max_calls=1).stop_reason(Spend(calls=1)) is not None


def test_the_dry_run_predicts_the_job_and_writes_nothing(
    collected_db: str, job_config: Any, job_rows: Any, llm_calls: Any
) -> None:
    from autointerp.run.estimate import estimate

    cfg = job_config(collected_db)
    store = open_store(cfg.db)
    before = job_rows(collected_db)
    est = {p.part: p for p in estimate(cfg, store, cfg.run.stages)}
    assert job_rows(collected_db) == before and llm_calls(collected_db) == 0
    with store.session() as s:
        assert s.exec(select(Unit)).all() == []  # not even units: nothing is written
    assert {k: p.pending for k, p in est.items()} == {"explain:llm": 6, "explain:tokens": 6, "score": 6,
                                                      "intervene": 6}  # fmt: skip
    assert est["explain:tokens"].calls == 0 and est["explain:llm"].calls == 6
    Job(cfg, store).run()
    with store.session() as s:
        made = s.exec(select(LLMCall)).all()
    by_stage = {st: [c for c in made if c.stage == st] for st in ("explain", "score", "intervene")}
    # the same requests the stage then sent, extrapolated from a sample of 5 of the 6 features
    assert abs(est["score"].calls / len(by_stage["score"]) - 1) <= 0.1, (est["score"].calls, len(by_stage["score"]))
    assert est["intervene"].calls >= len(by_stage["intervene"])  # pairs with identical texts are not judged
    for part, stage in (("explain:llm", "explain"), ("score", "score")):
        actual = sum(c.prompt_tokens for c in by_stage[stage])
        assert abs(est[part].prompt_tokens / actual - 1) <= 0.25, (part, est[part].prompt_tokens, actual)
    assert est["explain:llm"].cost_usd > 0 and est["explain:llm"].completion_from == "max_tokens"


def test_the_run_command_exit_codes_and_messages(collected_db: str, tmp_path: Path, run_main: Any) -> None:
    cfg = tmp_path / "job.toml"
    cfg.write_text(f"""db = "{collected_db}"
[explain]
llm = "fake"
features = "all"
limit = 6
chunk = 2
[score]
llm = "fake"
methods = ["detection"]
[intervene]
llm = "fake"
explainer = "llm"
target_kl = 0.05
n_prompts = 2
max_new_tokens = 4
[run]
stages = ["explain", "score", "intervene"]
poll_s = 0.05
[llm.fake]
backend = "fake"
model = "scripted"
""")
    base = ["run", "--config", str(cfg)]
    code, out, err = run_main([*base, "--dry-run", "--json"])
    assert code == 0 and [p["part"] for p in json.loads(out)] == ["explain:llm", "score", "intervene"], err
    code, _, err = run_main([*base, "--until", "2020-01-01T07:00"])
    assert code == 2 and "--until '2020-01-01T07:00' is in the past" in err
    code, _, err = run_main([*base, "--budget-usd", "lots"])
    assert code == 2 and "Invalid value for '--budget-usd'" in err
    for extra in ([], ["--dry-run"]):
        code, _, err = run_main([*base, "--stages", "explain,ship", *extra])
        assert code == 2 and "unknown stage 'ship'" in err, (extra, err)
    # refused before the database is opened: a new one is not even created (nor an old one migrated)
    new = tmp_path / "new.sqlite"
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace("[run]\n", '[run]\nexplainers = ["llm", "nosuch"]\n'))
    for extra in ([], ["--dry-run"]):
        code, _, err = run_main(["run", "--config", str(bad), "--db", f"sqlite:///{new}", *extra])
        assert code == 2 and "unknown explainer 'nosuch'" in err and not new.exists(), (extra, err)
    code, out, err = run_main([*base, "--db", f"sqlite:///{new}", "--dry-run", "--json"])
    assert code == 0 and "does not exist yet" in err and not new.exists(), err
    assert all(p["pending"] == 0 for p in json.loads(out))
    code, out, err = run_main([*base, "--max-calls", "3", "--json"])
    assert code == EXIT_BUDGET and "--max-calls 3 would be crossed" in err and "a higher cap" in err, err
    assert json.loads(out)["status"] == "budget"
    code, out, err = run_main([*base, "--json"])
    assert code == 0 and json.loads(out)["pending"] == 0 and "run done" in err
    code, out, _ = run_main(["status", "--config", str(cfg), "--json"])
    st = {s["stage"]: s for s in json.loads(out)["stages"]}
    assert code == 0 and st["explain"]["done"] == 6 and st["intervene"]["pending"] == 0


def test_the_collect_stage_trains_a_missing_sae_first(tmp_path: Path, tiny_gpt2_dir: Path, small_corpus: Path) -> None:
    """`run` on a fresh clone: the config's SAE with train_if_missing is trained, then collected with the neurons;
    a rerun neither trains nor collects again."""
    from autointerp.store.tables import Feature, SAERow

    sae_dir = tmp_path / "saes" / "tiny-sae"
    db = f"sqlite:///{tmp_path / 'fresh.sqlite'}"
    over = {"db": db, "model.name": str(tiny_gpt2_dir), "corpus.source": str(small_corpus),
            "corpus.ctx_len": 24, "corpus.max_tokens": 2000, "collect.sites": ["blocks.1.mlp.post"],
            "collect.batch_size": 8, "collect.saes": [{"path": str(sae_dir), "train_if_missing": True}],
            "sae_train.site": "blocks.1.resid.post", "sae_train.width": 32, "sae_train.k": 4,
            "sae_train.tokens": 1500, "sae_train.epochs": 1, "run.stages": ["collect"]}  # fmt: skip
    said: list[str] = []
    res = Job(load_config(None, over), open_store(db), say=said.append).run()
    assert res.status == "done" and (sae_dir / "cfg.json").exists()
    assert any("missing: training it" in m for m in said), said
    store = open_store(db)
    with store.session() as s:
        (sae,) = s.exec(select(SAERow)).all()
        sources = {f.source for f in s.exec(select(Feature)).all()}
    assert sources == {"neurons", sae.id}
    mtime = (sae_dir / "cfg.json").stat().st_mtime_ns
    said.clear()
    again = Job(load_config(None, over), open_store(db), say=said.append).run()
    assert again.status == "done" and not said and (sae_dir / "cfg.json").stat().st_mtime_ns == mtime


def test_the_heartbeat_keeps_a_long_collection_leased(tmp_path: Path, monkeypatch: Any, job_config: Any) -> None:
    """A collection that outlasts lease_s stays this worker's (its heartbeat renews the lease), so a second worker
    waits instead of collecting at the same time; a collection that fails gives its unit back at once."""
    import time

    import autointerp.collect.run as collect_run
    import autointerp.collect.train_sae as train_sae
    from autointerp.store.units import claim

    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    cfg = job_config(db, **{"run.stages": ["collect"], "run.lease_s": 0.4, "run.heartbeat_s": 0.05})
    store = open_store(db)
    taken: list[int] = []

    def slow_collect(*_a: Any, **_k: Any) -> None:
        with store.session() as s:
            (unit,) = s.exec(select(Unit).where(Unit.stage == "collect")).all()
        t_end = time.monotonic() + 1.5  # over three lease lengths
        while time.monotonic() < t_end:
            taken.extend(u.id for u in claim(store, "collect", unit.identity, "other", 1, 0.4))
            time.sleep(0.05)

    monkeypatch.setattr(train_sae, "train_missing_saes", lambda *_a, **_k: None)
    monkeypatch.setattr(collect_run, "run_collect", slow_collect)
    assert Job(cfg, store, worker="w1").run().status == "done"
    assert taken == []  # the other worker never got the collection while w1 was at it

    def failing_collect(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("disk full")

    cfg2 = job_config(db, **{"run.stages": ["collect"], "corpus.max_tokens": 1234})  # another collection
    monkeypatch.setattr(collect_run, "run_collect", failing_collect)
    with pytest.raises(RuntimeError, match="disk full"):
        Job(cfg2, store, worker="w1").run()
    with store.session() as s:
        units = s.exec(select(Unit).where(Unit.stage == "collect", Unit.status == "pending")).all()
    assert len(units) == 1 and units[0].worker is None  # given back: another worker may take it now


def test_status_figures_during_and_after_a_job(collected_db: str, job_config: Any, llm_calls: Any) -> None:
    """The numbers `status` shows: units per stage, the rate over the window and the ETA at that rate, the spend
    (equal to the LLM log), the workers, and the most common errors with their counts."""
    from autointerp.cli.render import status_lines
    from autointerp.run.status import job_status

    cfg = job_config(collected_db)
    part = Job(cfg, open_store(cfg.db), worker="night-1", budget=Budget(max_calls=4)).run()
    assert part.status == "budget"
    store = open_store(cfg.db)
    st = job_status(store, window_s=600.0)
    by = {s.stage: s for s in st.stages}
    ex = by["explain"]
    left = ex.pending + ex.in_progress
    # all done in the window, in the seconds the job ran: the rate is over those, not over the 10 minutes
    assert left > 0 and ex.done + left == 12 and ex.per_minute > ex.done / 10
    assert ex.eta_s == pytest.approx(left / ex.per_minute * 60, rel=0.01)
    quiet = {s.stage: s for s in job_status(store, window_s=1e-6).stages}
    assert quiet["explain"].eta_s is None and quiet["explain"].per_minute == 0  # nothing moved in the window
    done = Job(cfg, store, worker="night-1").run()
    with store.session() as s:  # two explanations failed, as a refused call leaves them
        for e in s.exec(select(Explanation).where(Explanation.explainer == "llm")).all()[:2]:
            e.status, e.error = "failed", "LLM call failed: 400 refused"
            s.add(e)
        s.commit()
    st = job_status(store, window_s=600.0)
    by = {s.stage: s for s in st.stages}
    assert (by["explain"].done, by["score"].done, by["intervene"].done) == (12, 6, 6)
    assert all(s.pending == s.in_progress == 0 and s.eta_s is None for s in st.stages)  # nothing left: no ETA
    assert st.spend["calls"] == llm_calls(collected_db) == part.spent.calls + done.spent.calls
    assert st.spend["cost_usd"] == pytest.approx(part.spent.usd + done.spent.usd, abs=1e-6)
    assert st.errors == [{"where": "explain", "message": "LLM call failed: 400 refused", "count": 2}]
    assert "night-1" in {w["worker"] for w in st.workers} and not any(w["running"] for w in st.workers)
    lines = status_lines(st)
    assert "2 x explain: LLM call failed: 400 refused" in "\n".join(lines)
    assert lines[-2] == "workers alive: none"
