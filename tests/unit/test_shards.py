"""Sharded collection is exact: the corpus's batches split into 1, 2 or 4 shards, each collected into fresh samplers
and stored, then merged in order, write the very rows one uninterrupted pass writes (features, statistics,
histograms, records), for neurons, a TopK SAE and a ReLU SAE; the merge's parts (the fixed-tree sum, the keyed
buffers) on their own; a driver that dies keeps the finished shards."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch

from autointerp.collect.buffers import KeyedBuffer, PairwiseSum
from autointerp.collect.run import run_collect
from autointerp.collect.shards import ShardPlan, collect_shard, collect_sharded
from autointerp.store import open_store


def _dump(db: Path) -> dict[str, Any]:
    """Everything a collection writes, by natural keys (row ids, run ids and timestamps left out)."""
    con = sqlite3.connect(db)
    try:
        q = {
            "contexts": "select corpus_id, idx, doc_idx, offset, tokens from context order by 1, 2",
            "features": "select key, status, density, n_tokens, histogram, max_act, mean_act from feature order by 1",
            "records": "select f.key, c.idx, r.role, r.split, r.rank, r.bin, r.max_act, r.acts from record r "
            "join feature f on f.id = r.feature_id join context c on c.id = r.context_id order by 1, 2",
        }
        return {k: con.execute(v).fetchall() for k, v in q.items()}
    finally:
        con.close()


def _in_process(cfg: Any, store: Any, subject: Any, ran: list[int]) -> Any:
    def run_shards(plan: ShardPlan) -> bool:
        for i in range(plan.n):
            if i not in plan.stored:
                collect_shard(cfg, store, plan.run_key, i, plan.n, subject=subject)
                ran.append(i)
        return True

    return run_shards


@pytest.fixture()
def single(tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path, tiny_subject: Any, collect_config: Any) -> Any:
    cfg = collect_config(tmp_path / "one", small_corpus, tiny_gpt2_dir)
    (tmp_path / "one").mkdir(exist_ok=True)
    store = open_store(cfg.db)
    run_collect(cfg, store, subject=tiny_subject)
    store.engine.dispose()
    return _dump(tmp_path / "one" / "a.sqlite")


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_shards_merge_into_the_rows_of_one_pass(
    tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path, tiny_subject: Any, collect_config: Any, single: Any,
    n_shards: int,
) -> None:  # fmt: skip
    d = tmp_path / f"s{n_shards}"
    d.mkdir()
    cfg = collect_config(d, small_corpus, tiny_gpt2_dir)
    store = open_store(cfg.db)
    ran: list[int] = []
    summary = collect_sharded(cfg, store, n_shards, _in_process(cfg, store, tiny_subject, ran), subject=tiny_subject)
    assert summary is not None and summary.status == "done" and ran == list(range(n_shards))
    assert not list((d / "checkpoints").glob("*.pt"))  # the shards' states are removed once written
    store.engine.dispose()
    got = _dump(d / "a.sqlite")
    assert len(got["records"]) > 100 and {r[2] for r in got["records"]} == {"top", "quantile", "random"}
    for table in ("contexts", "features", "records"):
        assert got[table] == single[table], table


def test_a_driver_that_dies_keeps_the_finished_shards(
    tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path, tiny_subject: Any, collect_config: Any, single: Any
) -> None:
    cfg = collect_config(tmp_path, small_corpus, tiny_gpt2_dir)
    store = open_store(cfg.db)
    first: list[int] = []

    def dies_after_two(plan: ShardPlan) -> bool:
        for i in range(2):
            collect_shard(cfg, store, plan.run_key, i, plan.n, subject=tiny_subject)
            first.append(i)
        raise KeyboardInterrupt  # the driver is stopped at once

    with pytest.raises(KeyboardInterrupt):
        collect_sharded(cfg, store, 4, dies_after_two, subject=tiny_subject)
    again: list[int] = []
    summary = collect_sharded(cfg, store, 4, _in_process(cfg, store, tiny_subject, again), subject=tiny_subject)
    assert summary is not None and summary.status == "done"
    assert first == [0, 1] and again == [2, 3]  # the stored shards are not collected again
    store.engine.dispose()
    got = _dump(tmp_path / "a.sqlite")
    assert got["features"] == single["features"] and got["records"] == single["records"]


def test_the_tree_sum_does_not_depend_on_the_split() -> None:
    g = torch.Generator().manual_seed(0)
    # values of very different sizes: a running sum rounds differently depending on where it is cut
    vals = [torch.randn(5, generator=g, dtype=torch.float64) * 10.0 ** float(torch.randint(-8, 9, (1,), generator=g))
            for _ in range(23)]  # fmt: skip
    one = PairwiseSum(5)
    for v in vals:
        one.add(v)
    for cuts in ([0, 23], [0, 1, 23], [0, 7, 8, 16, 23], [0, 3, 5, 6, 11, 22, 23]):
        merged = PairwiseSum(5)
        for lo, hi in zip(cuts, cuts[1:], strict=False):
            part = PairwiseSum(5)
            for i in range(lo, hi):
                part.add(vals[i], at=i)
            merged.absorb(PairwiseSum.from_state(5, part.state()))
        assert torch.equal(merged.total(), one.total()), cuts
    later = PairwiseSum(5)
    later.add(vals[5], at=5)
    with pytest.raises(ValueError, match="contiguous"):
        one.absorb(later)


def test_buffers_merge_ties_to_the_earlier_context() -> None:
    def offer(buf: KeyedBuffer, keys: list[float], ctx: list[int]) -> None:
        k = torch.tensor(keys, dtype=torch.float64)[:, None]
        buf.offer(k, torch.tensor(ctx), k.float(), lambda rows, feats: torch.ones((len(rows), 2)))  # noqa: ARG005

    one = KeyedBuffer(3, 1, 2)
    offer(one, [5.0, 2.0, 5.0, 5.0, 1.0], [0, 1, 2, 3, 4])
    a, b = KeyedBuffer(3, 1, 2), KeyedBuffer(3, 1, 2)
    offer(a, [5.0, 2.0], [0, 1])
    offer(b, [5.0, 5.0, 1.0], [2, 3, 4])
    a.absorb(b.state())
    one.merge()
    assert a.ctx[:, 0].tolist() == one.ctx[:, 0].tolist() == [0, 2, 3]
