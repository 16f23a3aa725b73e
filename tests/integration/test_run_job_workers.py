"""`autointerp run` with two workers on one database, a real PostgreSQL server and SQLite: no unit done twice, every
unit done once, every LLM call logged (a tiny GPT-2 collection, a scripted LLM)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from sqlmodel import select

from autointerp.run.job import PipelineJob as Job
from autointerp.store import open_store
from autointerp.store.tables import Unit


def _two_workers(db: str, job_config: Any) -> list[Any]:
    cfg = job_config(db)
    results: list[Any] = []
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            results.append(Job(cfg, open_store(db), worker=name).run())
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


def _assert_once(db: str, results: list[Any], job_rows: Any) -> None:
    total = {k: sum(r.units_done.get(k, 0) for r in results) for k in results[0].units_done}
    assert total == {"explain:llm": 6, "explain:tokens": 6, "score": 6, "intervene": 6}  # each unit once, in all
    with open_store(db).session() as s:
        units = s.exec(select(Unit).where(Unit.stage != "collect")).all()
        assert all(u.status == "done" and u.attempts == 1 for u in units), [(u.stage, u.attempts) for u in units]
    got = job_rows(db)
    assert len(got["explanation"]) == 12 and len(got["intervention"]) == 6


def test_two_workers_on_sqlite_never_do_a_unit_twice(
    collected_db: str, job_config: Any, job_rows: Any, llm_calls: Any
) -> None:
    results = _two_workers(collected_db, job_config)
    _assert_once(collected_db, results, job_rows)
    assert llm_calls(collected_db) == sum(r.spent.calls for r in results)


def test_two_workers_on_postgresql(
    postgres_db: str, collect_into: Any, tmp_path: Path, job_config: Any, job_rows: Any, llm_calls: Any
) -> None:
    collect_into(postgres_db, tmp_path)  # the collector's portable write path, on PostgreSQL
    results = _two_workers(postgres_db, job_config)
    _assert_once(postgres_db, results, job_rows)
    assert llm_calls(postgres_db) == sum(r.spent.calls for r in results)
