"""The work loop: pending units only, chunks, progress, one Run row per part and execution whose id is on every row
written, a run that ends in an error or Ctrl-C marked as such with its units given back; chunks as plain data that
another process runs to the same rows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import pytest
from sqlmodel import select

from autointerp.config import RunConfig, load_config
from autointerp.explain.run import ExplainStage, build_explainer, run_explain
from autointerp.jobs import Stage, Tally
from autointerp.jobs.executors import ChunkSpec, LocalExecutor, run_spec
from autointerp.jobs.loop import Job
from autointerp.jobs.stage import PIPELINE, STAGES, stage_class
from autointerp.store import open_store
from autointerp.store.engine import Store
from autointerp.store.queries import select_features
from autointerp.store.runs import runs_of
from autointerp.store.tables import Explanation, Feature, Run, Unit


class Toy(Stage):
    name = "toy"
    label = "toy"
    identity = "toy-1"
    chunk_size = 3

    def __init__(self, done: set[int], fail_at: int | None = None, exc: type[BaseException] = RuntimeError) -> None:
        self.done, self.fail_at, self.exc = done, fail_at, exc
        self.chunks: list[list[int]] = []
        self.after_called_with: list[int] = []

    @classmethod
    def build(cls, cfg: RunConfig, store: Store) -> list[Stage]:
        return [cls(set())]

    def run_config(self) -> dict[str, Any]:
        return {"toy": 1}

    def pending(self, features: Sequence[Feature]) -> set[int]:
        return {f.id for f in features if f.id is not None and f.id not in self.done}

    def run_chunk(self, features: Sequence[Feature], run_id: int, tally: Tally) -> dict[int, str]:
        ids = [f.id for f in features if f.id is not None]
        if self.fail_at is not None and self.fail_at in ids:
            raise self.exc("boom")
        self.chunks.append(ids)
        for i in ids:
            tally.add("row", "ok" if i % 2 else "failed")
            self.done.add(i)
        return {i: "ok" for i in ids}

    def after(self, features: Sequence[Feature], run_id: int, tally: Tally) -> None:
        self.after_called_with = [f.id for f in features if f.id is not None]


def _ten(store: Store) -> list[Feature]:
    feats = select_features(store, "all")[:10]
    assert len(feats) == 10
    return feats


def test_loop_runs_pending_units_in_chunks_and_records_the_run(collected_db: str) -> None:
    store = open_store(collected_db)
    feats = _ten(store)
    ids = [f.id for f in feats]
    seen: list[tuple[str, int, int]] = []
    stage = Toy(done={ids[0], ids[4]})
    cfg = load_config(None, {"db": collected_db})
    res = Job(cfg, store, parts=[stage], features=feats, progress=lambda *a: seen.append(a)).run()
    assert stage.chunks == [ids[1:4], ids[5:8], ids[8:10]]
    assert seen == [("toy", 0, 8), ("toy", 3, 8), ("toy", 6, 8), ("toy", 8, 8)]  # 0: the part starts
    assert stage.after_called_with == ids
    part = res.parts["toy"]
    assert (part.selected, part.pending, part.done) == (10, 8, 8)
    odd = sum(i % 2 for i in ids[1:4] + ids[5:])
    assert part.rows == {"row": {k: v for k, v in (("ok", odd), ("failed", 8 - odd)) if v}}
    (run,) = runs_of(store, "toy")
    assert run.id == part.run_id and run.status == "done" and run.finished_at is not None
    assert (run.total, run.counts["units"]) == (8, 8) and run.config["toy"] == 1 and run.config["label"] == "toy"
    with store.session() as s:
        units = s.exec(select(Unit).where(Unit.stage == "toy")).all()
    assert len(units) == 10 and {u.status for u in units} == {"done"}
    again = Job(cfg, store, parts=[stage], features=feats).run()  # everything finished: a run that does nothing
    assert again.parts["toy"].pending == 0 and again.parts["toy"].rows == {} and again.run_ids["toy"] != run.id


@pytest.mark.parametrize(("exc", "status"), [(RuntimeError, "failed"), (KeyboardInterrupt, "interrupted")])
def test_a_run_stopped_by_an_error_or_ctrl_c_says_so_and_gives_its_units_back(
    collected_db: str, exc: type[BaseException], status: str
) -> None:
    store = open_store(collected_db)
    feats = _ten(store)
    stage = Toy(done=set(), fail_at=feats[4].id, exc=exc)
    with pytest.raises(exc):
        Job(load_config(None, {"db": collected_db}), store, parts=[stage], features=feats).run()
    (run,) = runs_of(store, "toy")
    assert run.status == status and run.error is not None and "boom" in run.error
    assert run.counts["units"] == 3 and sum(run.counts["row"].values()) == 3  # the first chunk stays counted
    assert stage.after_called_with == []
    with store.session() as s:
        units = s.exec(select(Unit).where(Unit.stage == "toy")).all()
    assert sorted(u.status for u in units) == ["done"] * 3 + ["pending"] * 7  # the failed chunk's went back
    assert all(u.worker is None for u in units if u.status == "pending")


def test_explain_rows_carry_the_run_id(collected_db: str) -> None:
    cfg = load_config(None, {"db": collected_db, "explain.features": "all", "explain.limit": 4})
    store = open_store(cfg.db)
    res = run_explain(cfg, store, explainer=build_explainer(cfg, store, kind="tokens"))
    with store.session() as s:
        rows = s.exec(select(Explanation)).all()
        run = s.get(Run, res.run_id)
    assert len(rows) == 4 and {r.run_id for r in rows} == {res.run_id}
    assert run is not None and run.stage == "explain" and run.status == "done"
    assert run.config["explainer"] == "tokens" and run.counts["explanation"] == res.counts


def test_the_registry_names_every_stage_of_the_pipeline() -> None:
    assert ("collect", *STAGES) == PIPELINE
    for name in STAGES:
        cls = stage_class(name)
        assert issubclass(cls, Stage) and cls.name == name
    with pytest.raises(KeyError):
        stage_class("ship")


def test_a_chunk_is_plain_data_and_runs_from_it_alone_to_the_same_rows(collected_db: str, tmp_path: Any) -> None:
    """The spec survives JSON (so it can travel to another process or machine); run from it, a chunk writes what
    the loop's own instance writes."""
    import shutil

    other = tmp_path / "other.sqlite"
    shutil.copy(collected_db.removeprefix("sqlite:///"), other)
    results = []
    for url in (collected_db, f"sqlite:///{other}"):
        cfg = load_config(
            None, {"db": url, "explain.features": "all", "explain.limit": 4, "run.explainers": ["tokens"]}
        )
        store = open_store(url)
        (stage,) = ExplainStage.build(cfg, store)
        feats = select_features(store, "all", limit=4)
        spec = ChunkSpec(cfg.model_dump(mode="json"), url, "explain", stage.identity, 1, tuple(f.id for f in feats))
        spec = ChunkSpec(**json.loads(json.dumps(asdict(spec))) | {"feature_ids": spec.feature_ids})
        # the loop's own instance here; there, what a worker process runs: the part rebuilt from the config alone
        res = LocalExecutor(store).submit(stage, spec).result() if url == collected_db else run_spec(spec)
        with store.session() as s:
            texts = sorted((e.feature_id, e.text, e.status) for e in s.exec(select(Explanation)))
        results.append((res.outcomes, res.rows, texts))
    assert results[0] == results[1] and len(results[0][2]) == 4
    bad = ChunkSpec(spec.config, spec.db, "explain", "no-such-identity", 1, spec.feature_ids)
    with pytest.raises(RuntimeError, match="no part with identity no-such-identity"):
        run_spec(bad)


def test_a_part_s_clock_starts_when_it_starts_not_at_its_first_chunk_s_end(collected_db: str) -> None:
    """One chunk of 38 s: its log line says 38 s elapsed (it said 0m00s when the clock started at the first
    report), and a phase that starts later counts from its own start."""
    import io

    from autointerp.jobs import LogLines

    t = [0.0]

    class Slow(Toy):
        chunk_size = 10

        def run_chunk(self, features: Sequence[Feature], run_id: int, tally: Tally) -> dict[int, str]:
            t[0] += 38.0
            return super().run_chunk(features, run_id, tally)

    store = open_store(collected_db)
    out = io.StringIO()
    log = LogLines(out, now=lambda: t[0])
    log("collect", 1, 1)  # an earlier phase of the same command
    t[0] = 100.0
    Job(load_config(None, {"db": collected_db}), store, parts=[Slow(set())], features=_ten(store), progress=log).run()
    lines = out.getvalue().splitlines()
    assert lines[-1].endswith("toy: 10/10 (100%), 0m38s elapsed"), lines
