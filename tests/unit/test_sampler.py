"""Property tests of the streaming buffers: any batching of any stream keeps exactly the brute-force top-k."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autointerp.collect.buffers import Dense, KeyedBuffer, Sparse, hash_uniform, hist_bins, random_pool
from autointerp.collect.sampler import FeatureSampler, SamplerConfig


@settings(max_examples=60, deadline=None)
@given(
    n_ctx=st.integers(1, 60),
    n_feat=st.integers(1, 6),
    k=st.integers(1, 8),
    cuts=st.lists(st.integers(1, 7), min_size=1, max_size=20),
    seed=st.integers(0, 2**16),
    max_staged=st.integers(1, 50),
)
def test_keyed_buffer_equals_brute_force(
    n_ctx: int, n_feat: int, k: int, cuts: list[int], seed: int, max_staged: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    keys = torch.rand(n_ctx, n_feat, generator=g, dtype=torch.float64)
    keys[torch.rand(n_ctx, n_feat, generator=g) < 0.3] = -torch.inf  # ineligible contexts
    acts = torch.randn(n_ctx, 3, n_feat, generator=g)
    buf = KeyedBuffer(k, n_feat, 3, act_dtype=torch.float32)
    buf.max_staged = max_staged
    lo, i = 0, 0
    while lo < n_ctx:
        hi = min(n_ctx, lo + cuts[i % len(cuts)])
        b_acts = acts[lo:hi]
        buf.offer(keys[lo:hi], torch.arange(lo, hi), keys[lo:hi].float(), lambda r, f, a=b_acts: a[r, :, f])
        lo, i = hi, i + 1
    buf.merge()
    for f in range(n_feat):
        eligible = [c for c in range(n_ctx) if torch.isfinite(keys[c, f])]
        want = sorted(eligible, key=lambda c: -keys[c, f].item())[:k]
        got = [int(c) for c, kk in zip(buf.ctx[:, f], buf.keys[:, f], strict=True) if torch.isfinite(kk)]
        assert sorted(got) == sorted(want)
        for slot, c in enumerate(buf.ctx[:, f].tolist()):
            if c >= 0 and torch.isfinite(buf.keys[slot, f]):
                torch.testing.assert_close(buf.acts[slot, f], acts[c, :, f])


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 4), p=st.integers(1, 5), k=st.integers(1, 4), n=st.integers(4, 12), seed=st.integers(0, 999))
def test_sparse_gather_equals_dense(b: int, p: int, k: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b * p)]).view(b, p, k)
    sp = Sparse(torch.rand(b, p, k, generator=g), idx, n)
    dense = sp.dense()
    rows = torch.randint(0, b, (7,), generator=g)
    feats = torch.randint(0, n, (7,), generator=g)
    pairs = {(int(r), int(f)) for r, f in zip(rows, feats, strict=True)}
    rows = torch.tensor([r for r, _ in sorted(pairs)])
    feats = torch.tensor([f for _, f in sorted(pairs)])
    torch.testing.assert_close(sp.gather(rows, feats), dense[rows, :, feats])


def test_hash_keys_are_uniform_and_independent_of_batching() -> None:
    ctx = torch.arange(20000)
    u = hash_uniform(ctx[:, None], torch.arange(3)[None, :], 7)
    assert ((u >= 0) & (u < 1)).all()
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(torch.corrcoef(u.T)[0, 1])) < 0.05  # features draw different samples
    torch.testing.assert_close(hash_uniform(ctx[5:9, None], torch.arange(3)[None, :], 7), u[5:9])
    pool = random_pool(1000, 30, seed=3)
    assert len(set(pool.tolist())) == 30 and np.array_equal(pool, random_pool(1000, 30, seed=3))


def test_hist_bins_are_half_octaves() -> None:
    x = torch.tensor([2.0**-13, 2.0**-12, 1.0, 1.4142, 1.4143, 2.0, 2.0**11.9, 2.0**20])
    assert hist_bins(x).tolist() == [0, 0, 24, 24, 25, 26, 47, 47]


def _records_by_loop(sampler: FeatureSampler, lo: int, hi: int) -> list[tuple]:
    """The per-feature selection `records` replaced, kept as the reference it must equal record for record."""
    cfg, f = sampler.cfg, sampler._final()
    pool_ctx, pool_acts = f["pool_ctx"], f["pool_acts"]  # [n_pool], [n_pool, P, F]
    out: list[tuple] = []
    for j in range(lo, hi):
        chosen: set[int] = set()
        slots = np.flatnonzero(np.isfinite(f["top_keys"][:, j]))
        slots = slots[np.lexsort((f["top_ctx"][slots, j], -f["top_score"][slots, j]))]
        for r, sl in enumerate(slots):
            c = int(f["top_ctx"][sl, j])
            chosen.add(c)
            acts = f["top_acts"][sl, j]
            out.append((j, c, "top", "train" if r % 2 == 0 else "test", r, None, float(f["top_score"][sl, j]), acts))
        slots = np.flatnonzero(np.isfinite(f["res_keys"][:, j]))
        slots = slots[np.lexsort((f["res_ctx"][slots, j], f["res_score"][slots, j]))]
        m = len(slots)
        bin_of = (np.arange(m) * cfg.n_quantiles) // max(m, 1)
        for b in range(cfg.n_quantiles):
            members = slots[bin_of == b]
            members = members[np.argsort(-f["res_keys"][members, j], kind="stable")]
            taken = 0
            for sl in members:
                c = int(f["res_ctx"][sl, j])
                if taken >= cfg.per_quantile:
                    break
                if c in chosen:
                    continue
                chosen.add(c)
                split = "train" if taken % 2 == 0 else "test"
                out.append((j, c, "quantile", split, taken, b, float(f["res_score"][sl, j]), f["res_acts"][sl, j]))
                taken += 1
        taken = 0
        for i, c in enumerate(pool_ctx.tolist()):
            if taken >= cfg.n_random:
                break
            if c in chosen:
                continue
            acts = pool_acts[i, :, j]
            out.append((j, c, "random", "test", taken, None, float(acts.max()), acts))
            taken += 1
    return out


@settings(max_examples=40, deadline=None)
@given(
    n_ctx=st.integers(1, 40),
    n_feat=st.integers(1, 5),
    cfg=st.builds(
        SamplerConfig,
        top_k=st.integers(0, 5),
        n_quantiles=st.integers(0, 4),
        per_quantile=st.integers(0, 3),
        n_random=st.integers(0, 6),
    ),
    batch=st.integers(1, 7),
    chunk=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_records_equal_the_per_feature_selection(
    n_ctx: int, n_feat: int, cfg: SamplerConfig, batch: int, chunk: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    # Coarse values make ties in a context's max (broken by context index) and inactive contexts common.
    acts = torch.randint(-2, 4, (n_ctx, 3, n_feat), generator=g).float() / 2
    pool = random_pool(n_ctx, int(cfg.n_random * cfg.oversample), seed=seed)
    sampler = FeatureSampler(n_feat, 3, cfg, pool)
    for lo in range(0, n_ctx, batch):
        sampler.update(Dense(acts[lo : lo + batch]), torch.arange(lo, min(lo + batch, n_ctx)))
    for lo in range(0, n_feat, chunk):
        got = sampler.records(lo, lo + chunk)
        rows = zip(
            got.feature.tolist(),
            got.context.tolist(),
            got.role.tolist(),
            got.split.tolist(),
            got.rank.tolist(),
            [None if b < 0 else b for b in got.bin.tolist()],
            got.max_act.tolist(),
            list(got.acts),
            strict=True,
        )
        key = lambda r: (r[0], r[1])  # noqa: E731 - records come ordered by feature, then context
        want = sorted(_records_by_loop(sampler, lo, min(lo + chunk, n_feat)), key=key)
        got_rows = list(rows)
        assert [r[:7] for r in got_rows] == [r[:7] for r in want]
        for a, b in zip(got_rows, want, strict=True):
            assert a[7].dtype == np.dtype("<f2") and a[7].tobytes() == np.asarray(b[7], "<f2").tobytes()
