"""The work loop: pending units only, chunks, progress, one Run row per execution whose id is on every row written,
and a run that ends in an error or Ctrl-C marked as such."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from sqlmodel import select

from autointerp.config import load_config
from autointerp.explain.run import build_explainer, run_explain
from autointerp.jobs import Stage, Tally, run_stage
from autointerp.store import open_store
from autointerp.store.runs import runs_of
from autointerp.store.tables import Explanation, Run


class Toy(Stage[int]):
    name = "toy"
    chunk_size = 3

    def __init__(self, done: set[int], fail_at: int | None = None, exc: type[BaseException] = RuntimeError) -> None:
        self.done, self.fail_at, self.exc = done, fail_at, exc
        self.chunks: list[list[int]] = []
        self.after_called_with: list[int] = []

    def run_config(self) -> dict[str, Any]:
        return {"toy": 1}

    def units(self) -> Sequence[int]:
        return list(range(10))

    def pending(self, units: Sequence[int]) -> list[int]:
        return [u for u in units if u not in self.done]

    def run_chunk(self, chunk: Sequence[int], run_id: int, tally: Tally) -> None:
        if self.fail_at is not None and self.fail_at in chunk:
            raise self.exc("boom")
        self.chunks.append(list(chunk))
        for u in chunk:
            tally.add("row", "ok" if u % 2 else "failed")
            self.done.add(u)

    def after(self, units: Sequence[int], run_id: int, tally: Tally) -> None:
        self.after_called_with = list(units)


def test_loop_runs_pending_units_in_chunks_and_records_the_run() -> None:
    store = open_store("sqlite://")
    seen: list[tuple[str, int, int]] = []
    stage = Toy(done={0, 4})
    res = run_stage(store, stage, progress=lambda *a: seen.append(a))
    assert stage.chunks == [[1, 2, 3], [5, 6, 7], [8, 9]]
    assert seen == [("toy", 3, 8), ("toy", 6, 8), ("toy", 8, 8)]
    assert stage.after_called_with == list(range(10))
    assert (res.selected, res.pending) == (10, 8)
    assert res.rows == {"row": {"ok": 5, "failed": 3}}
    (run,) = runs_of(store, "toy")
    assert run.id == res.run_id and run.status == "done" and run.finished_at is not None
    assert (run.progress, run.total, run.counts, run.config) == (8, 8, res.rows, {"toy": 1})
    again = run_stage(store, stage)  # everything finished: a new run that does nothing
    assert again.pending == 0 and again.rows == {} and again.run_id != res.run_id


@pytest.mark.parametrize(("exc", "status"), [(RuntimeError, "failed"), (KeyboardInterrupt, "interrupted")])
def test_a_run_stopped_by_an_error_or_ctrl_c_says_so(exc: type[BaseException], status: str) -> None:
    store = open_store("sqlite://")
    stage = Toy(done=set(), fail_at=4, exc=exc)
    with pytest.raises(exc):
        run_stage(store, stage)
    (run,) = runs_of(store, "toy")
    assert run.status == status and run.error is not None and "boom" in run.error
    assert run.progress == 3 and run.counts == {"row": {"failed": 2, "ok": 1}}  # the first chunk stays counted
    assert stage.after_called_with == []


def test_explain_rows_carry_the_run_id(collected_db: str) -> None:
    cfg = load_config(None, {"db": collected_db, "explain.features": "all", "explain.limit": 4})
    store = open_store(cfg.db)
    res = run_explain(cfg, store, explainer=build_explainer(cfg, store, kind="tokens"))
    with store.session() as s:
        rows = s.exec(select(Explanation)).all()
        run = s.get(Run, res.run_id)
    assert len(rows) == 4 and {r.run_id for r in rows} == {res.run_id}
    assert run is not None and run.stage == "explain" and run.status == "done"
    assert run.config["explainer"] == "tokens" and run.counts == {"explanation": res.counts}
