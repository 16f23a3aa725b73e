"""Budgets hold for the whole job: two workers sharing a `--max-calls 20` cap make at most 20 calls plus one chunk
each in all (each reads the job's spend, not its own, before it claims), and a rerun of the same job with the same
cap makes none; another job name starts a fresh budget."""

from __future__ import annotations

import threading
from typing import Any

from autointerp.jobs.budget import Budget
from autointerp.run.job import PipelineJob as Job
from autointerp.store import open_store


def _two_workers(cfg: Any, budgets: list[Budget]) -> list[Any]:
    results: list[Any] = []
    errors: list[BaseException] = []

    def work(name: str, budget: Budget) -> None:
        try:
            results.append(Job(cfg, open_store(cfg.db), worker=name, budget=budget).run())
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"w{i}", b)) for i, b in enumerate(budgets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


def test_two_workers_share_one_cap_and_a_rerun_makes_no_call(
    collected_db: str, job_config: Any, llm_calls: Any
) -> None:
    cfg = job_config(collected_db)
    budgets = [Budget(max_calls=20), Budget(max_calls=20)]
    results = _two_workers(cfg, budgets)
    made = llm_calls(collected_db)
    assert made == sum(r.spent.calls for r in results)
    assert {r.status for r in results} == {"budget"} and all(r.pending > 0 for r in results)
    assert 20 - max(b.largest.calls for b in budgets) <= made <= 20 + sum(b.largest.calls for b in budgets)
    # the same job (same parts and features) with the same cap: its spend so far is over the cap already
    again = Job(cfg, open_store(cfg.db), worker="w0", budget=Budget(max_calls=20)).run()
    assert again.status == "budget" and again.spent.calls == 0 and llm_calls(collected_db) == made
    assert "--max-calls 20 would be crossed" in again.reason
    # a new job name: a fresh budget
    fresh = Job(cfg, open_store(cfg.db), worker="w0", budget=Budget(max_calls=4), job="night-2").run()
    assert fresh.spent.calls > 0 and llm_calls(collected_db) > made
