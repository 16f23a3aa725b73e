"""Property tests of the streaming buffers: any batching of any stream keeps exactly the brute-force top-k."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autointerp.collect.sampler import KeyedBuffer, Sparse, hash_uniform, hist_bins, random_pool


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
