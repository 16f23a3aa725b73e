"""Streaming per-feature sampling with memory O(features x k x context length), whatever the corpus size.

Per feature:
- top:      the k contexts with the largest max activation (> 0),
- quantile: a uniform reservoir of the activating contexts (key = a hash of context and feature), split at the end
            by rank of max activation into equal-count bins: delphi's rank quantiles without keeping every
            activation,
- random:   contexts from one shared random pool drawn up front from the whole slice (a random sample of text, the
            baseline scorers need), minus those already chosen as top or quantile for the feature.
Keys are hashes of (context index, feature index), not draws from a stream, so the result does not depend on
batch order or size: a resumed run or a shard selects exactly what one uninterrupted pass selects.

Activations arrive dense ([B, P, F], neurons) or sparse (values and indices [B, P, K], TopK SAEs); the sparse path
never materializes [B, P, F] once the buffers are warm.

A batch holding a NaN or an infinity is refused (NonFiniteActivations) before it changes any state: one would
otherwise poison max, mean and the top-k of its feature for good. The test costs one reduction of the per-feature
sums the statistics compute anyway (a non-finite value makes its feature's sum non-finite).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from autointerp.collect.buffers import (
    N_HIST,
    SALT_QUANTILE,
    Batch,
    Dense,
    Gather,
    KeyedBuffer,
    PairwiseSum,
    Sparse,
    hash_uniform,
    hist_bins,
    hist_edges,
)


@dataclass(frozen=True)
class SamplerConfig:
    top_k: int = 40
    n_quantiles: int = 10
    per_quantile: int = 4
    n_random: int = 20
    # Reservoirs are oversampled so that dropping contexts already chosen as top still leaves enough.
    oversample: float = 2.0
    # Dense sources (neurons) add to the histogram only contexts with index % histogram_every == 0 (it costs
    # several passes over every activation otherwise); sparse sources are always counted in full.
    histogram_every: int = 4


ROLES = ("top", "quantile", "random")
SPLITS = ("train", "test")
_ROLE = np.array(ROLES, dtype=object)  # str objects shared by every record: no string per record
_SPLIT = np.array(SPLITS, dtype=object)


@dataclass(frozen=True)
class SampledRecords:
    """The records of a range of features as columns, one entry per record, ordered by feature then context.

    Columns rather than a tuple per record: a collection selects hundreds of thousands of records, and numpy
    selects and packs them for a whole chunk of features at once.
    """

    feature: np.ndarray  # int64 feature index
    context: np.ndarray  # int64 context index in the corpus slice
    role: np.ndarray  # str objects from ROLES
    split: np.ndarray  # str objects from SPLITS
    rank: np.ndarray  # int64 order within its role (top: 0 = highest; quantile: within its bin)
    bin: np.ndarray  # int64 quantile bin (0 = lowest), -1 for the other roles
    max_act: np.ndarray  # float64
    acts: np.ndarray  # [n, P] float16, little-endian

    def __len__(self) -> int:
        return len(self.feature)


def _group_rank(group: np.ndarray) -> np.ndarray:
    """Position of each entry within its run of equal values (`group` is sorted): 0, 1, 2, 0, 1, ..."""
    n = len(group)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    return np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))


def _pair(feat: np.ndarray, ctx: np.ndarray) -> np.ndarray:
    """One int64 per (feature, context) pair, for set membership tests."""
    return (feat.astype(np.int64) << 32) | ctx.astype(np.int64)


def _in_sorted(x: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """x in sorted_set, elementwise (a binary search: cheaper than np.isin for these sizes)."""
    if len(sorted_set) == 0:
        return np.zeros(x.shape, dtype=bool)
    at = np.searchsorted(sorted_set, x).clip(max=len(sorted_set) - 1)
    return sorted_set[at] == x


class NonFiniteActivations(ValueError):
    """A batch with NaN or infinite activations. Positions count within the recorded part of a context (after BOS
    and the skipped positions); the collect stage names the site and the batch (`located`)."""

    def __init__(
        self,
        n_values: int,
        features: list[int],
        context: int,
        position: int,
        value: float,
        where: str = "",
        hint: str = "",
    ) -> None:
        self.n_values, self.features = n_values, features
        self.context, self.position, self.value = context, position, value
        shown = ", ".join(map(str, features[:8])) + (", ..." if len(features) > 8 else "")
        if n_values:
            what = (
                f"{n_values} value(s) NaN or inf in {len(features)} feature(s) [{shown}], e.g. feature {features[0]}"
                f" = {value} at context {context}, position {position}"
            )
        else:
            what = f"finite values whose sum overflows float32 in feature(s) [{shown}]"
        super().__init__(f"non-finite activations{' ' + where if where else ''}: {what}{'; ' + hint if hint else ''}")

    def located(self, where: str, hint: str = "") -> NonFiniteActivations:
        return NonFiniteActivations(self.n_values, self.features, self.context, self.position, self.value, where, hint)


def _non_finite(acts: torch.Tensor, ctx: torch.Tensor, sums: torch.Tensor) -> NonFiniteActivations:
    """The error for a dense batch [B, P, F] whose per-feature `sums` are not all finite (the slow path)."""
    bad = ~torch.isfinite(acts)
    if not bad.any():  # finite values whose sum overflows
        return NonFiniteActivations(0, (~torch.isfinite(sums)).nonzero().squeeze(1).tolist(), -1, -1, math.nan)
    feats = bad.any(dim=1).any(dim=0).nonzero().squeeze(1).tolist()
    b, p, f = bad.nonzero()[0].tolist()
    return NonFiniteActivations(int(bad.sum()), feats, int(ctx[b]), p, float(acts[b, p, f]))


def _sum_of(n_features: int, state: dict[str, Any]) -> PairwiseSum:
    return PairwiseSum.from_state(n_features, {k: state[f"sum_{k}"] for k in ("levels", "positions", "values")})


@dataclass(frozen=True)
class FeatureResult:
    index: int
    status: str  # ok | dead
    max_act: float
    mean_act: float
    density: float
    n_tokens: int
    histogram: dict[str, Any]


class FeatureSampler:
    """Statistics and sampled contexts for F features of one source (neurons of a site, or one SAE)."""

    def __init__(
        self, n_features: int, n_pos: int, cfg: SamplerConfig, pool: np.ndarray, *, sparse: bool = False
    ) -> None:
        self.cfg = cfg
        self.sparse = sparse  # only changes how the histogram is documented; both update paths work either way
        self.n_features = n_features
        self.n_pos = n_pos
        n_res = math.ceil(cfg.n_quantiles * cfg.per_quantile * cfg.oversample)
        self.top = KeyedBuffer(cfg.top_k, n_features, n_pos)
        self.reservoir = KeyedBuffer(n_res, n_features, n_pos)
        self.pool = torch.as_tensor(pool, dtype=torch.int64)
        self.pool_slot = {int(c): i for i, c in enumerate(pool)}
        self.pool_acts = torch.zeros((len(pool), n_pos, n_features), dtype=torch.float16)
        self.pool_seen = torch.zeros(len(pool), dtype=torch.bool)
        self.feat_ids = torch.arange(n_features)
        self._hist_offsets = self.feat_ids * (N_HIST + 1)
        self.max = torch.full((n_features,), -math.inf, dtype=torch.float32)
        self.sum = PairwiseSum(n_features)  # per-batch sums over a fixed tree: shards merge to the same bits
        self.active = torch.zeros(n_features, dtype=torch.int64)
        self.hist = torch.zeros(n_features * N_HIST, dtype=torch.int64)
        self.n_tokens = 0

    def update(self, batch: Batch, ctx: torch.Tensor, at: int | None = None) -> None:
        """One batch of contexts (BOS already removed); ctx [B] are their indices in the corpus slice, `at` the
        batch's number in the pass (default: the one after the last; a shard starts at its first)."""
        self._final_cache = None
        if isinstance(batch, Sparse):
            ctx_max, gather = self._stats_sparse(batch, ctx, at)
        else:
            ctx_max, gather = self._stats_dense(batch.acts.float(), ctx, at)
        activating = ctx_max > 0
        neg = torch.tensor(-math.inf, dtype=torch.float64)
        self.top.offer(torch.where(activating, ctx_max.double(), neg), ctx, ctx_max, gather)
        u = hash_uniform(ctx[:, None], self.feat_ids[None, :], SALT_QUANTILE)
        self.reservoir.offer(torch.where(activating, u, neg), ctx, ctx_max, gather)
        for b, c in enumerate(ctx.tolist()):
            slot = self.pool_slot.get(c)
            if slot is not None:
                row = (
                    batch.acts[b]
                    if isinstance(batch, Dense)
                    else Sparse(batch.values[b : b + 1], batch.indices[b : b + 1], batch.n_features).dense()[0]
                )
                self.pool_acts[slot] = row.to(torch.float16)
                self.pool_seen[slot] = True

    def _stats_dense(self, acts: torch.Tensor, ctx: torch.Tensor, at: int | None) -> tuple[torch.Tensor, Gather]:
        b, p, _ = acts.shape
        sums = acts.sum(dim=(0, 1))
        if not bool(torch.isfinite(sums).all()):
            raise _non_finite(acts, ctx, sums)
        ctx_max = acts.amax(dim=1)  # [B, F]
        self.max = torch.maximum(self.max, ctx_max.amax(dim=0))
        self.sum.add(sums, at)
        self.active += torch.relu(acts).sign_().sum(dim=(0, 1)).to(torch.int64)  # cheaper than (acts > 0).sum
        self.n_tokens += b * p
        sel = (ctx % self.cfg.histogram_every == 0).nonzero().squeeze(1)
        if sel.numel():
            # Bin every element (non-positive ones into an overflow column) instead of masking: no gathers.
            sub = acts[sel]
            bins = torch.where(sub > 0, hist_bins(sub), N_HIST)
            counts = torch.bincount((bins + self._hist_offsets).reshape(-1), minlength=self.n_features * (N_HIST + 1))
            self.hist += counts.view(self.n_features, N_HIST + 1)[:, :N_HIST].reshape(-1)

        def gather(rows: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
            return acts[rows, :, feats]

        return ctx_max, gather

    def _stats_sparse(self, batch: Sparse, ctx: torch.Tensor, at: int | None) -> tuple[torch.Tensor, Gather]:
        b, p, k = batch.values.shape
        vals = batch.values.reshape(b, p * k)
        idx = batch.indices.reshape(b, p * k)
        if not bool(torch.isfinite(vals.sum(dtype=torch.float64))):
            raise _non_finite(batch.dense(), ctx, torch.full((1,), math.nan))
        ctx_max = torch.zeros((b, self.n_features), dtype=torch.float32)
        ctx_max.scatter_reduce_(1, idx, vals.float(), reduce="amax")
        self.max = torch.maximum(self.max, ctx_max.amax(dim=0))
        flat_v, flat_i = vals.reshape(-1), idx.reshape(-1)
        self.sum.add(torch.zeros(self.n_features, dtype=torch.float64).index_add_(0, flat_i, flat_v.double()), at)
        pos = flat_v > 0
        pv, pi = flat_v[pos], flat_i[pos]
        self.active += torch.bincount(pi, minlength=self.n_features)
        self.hist += torch.bincount(pi * N_HIST + hist_bins(pv.float()), minlength=self.hist.numel())
        self.n_tokens += b * p
        return ctx_max, batch.gather

    # ---- checkpointing -------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "top": self.top.state(),
            "reservoir": self.reservoir.state(),
            "pool_acts": self.pool_acts,
            "pool_seen": self.pool_seen,
            "max": self.max,
            **{f"sum_{k}": v for k, v in self.sum.state().items()},  # tensors only: levels, positions, values
            "active": self.active,
            "hist": self.hist,
            "n_tokens": self.n_tokens,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.top.load(state["top"])
        self.reservoir.load(state["reservoir"])
        self.pool_acts, self.pool_seen = state["pool_acts"], state["pool_seen"]
        self.max, self.active = state["max"], state["active"]
        self.sum = _sum_of(self.n_features, state)
        self.hist, self.n_tokens = state["hist"], int(state["n_tokens"])
        self._final_cache = None

    def absorb(self, state: dict[str, Any]) -> None:
        """Merge the state of a sampler of the same source that saw the batches right after these (a shard of the
        corpus): afterwards this sampler holds exactly what one pass over both ranges holds. Every part merges
        exactly: maxima, counts and histograms add up; the sums go through the same tree (PairwiseSum); top-k and
        reservoir keep the largest keys of both (keys are functions of (context, feature), ties to the earlier
        context); each random-pool context was seen by one shard only."""
        self._final_cache = None
        self.top.absorb(state["top"])
        self.reservoir.absorb(state["reservoir"])
        seen = state["pool_seen"]
        self.pool_acts[seen] = state["pool_acts"][seen]
        self.pool_seen = self.pool_seen | seen
        self.max = torch.maximum(self.max, state["max"])
        self.sum.absorb(_sum_of(self.n_features, state))
        self.active = self.active + state["active"]
        self.hist = self.hist + state["hist"]
        self.n_tokens += int(state["n_tokens"])

    # ---- results -------------------------------------------------------------------------------------------
    _final_cache: dict[str, Any] | None = None

    def _final(self) -> dict[str, Any]:
        """Buffers as numpy arrays, computed once for all result chunks (reset by update)."""
        if self._final_cache is None:
            self.top.merge()
            self.reservoir.merge()
            seen = self.pool_seen.numpy()
            self._final_cache = {
                "top_keys": self.top.keys.numpy(),
                "top_ctx": self.top.ctx.numpy(),
                "top_score": self.top.score.numpy(),
                "top_acts": self.top.acts.numpy(),
                "res_keys": self.reservoir.keys.numpy(),
                "res_ctx": self.reservoir.ctx.numpy(),
                "res_score": self.reservoir.score.numpy(),
                "res_acts": self.reservoir.acts.numpy(),
                "pool_ctx": self.pool.numpy()[seen],
                # [n_pool, P, F]: gathering the few rows used costs less than transposing the whole pool.
                "pool_acts": self.pool_acts.numpy()[seen],
                "edges": hist_edges(),
                "sum": self.sum.total(),
            }
        return self._final_cache

    def results(self, lo: int = 0, hi: int | None = None) -> list[FeatureResult]:
        """Statistics of features [lo, hi) (all by default); their records come from `records`."""
        hi = self.n_features if hi is None else min(hi, self.n_features)
        edges = self._final()["edges"]
        every = 1 if self.sparse else self.cfg.histogram_every
        n = max(self.n_tokens, 1)
        # tolist() gives the same Python floats as float() of each element, without a tensor index per value.
        max_l = self.max[lo:hi].tolist() if self.n_tokens else [0.0] * (hi - lo)
        sum_l = self._final()["sum"][lo:hi].tolist()
        active_l = self.active[lo:hi].tolist()
        hist_l = self.hist.view(self.n_features, N_HIST)[lo:hi].tolist()
        return [
            FeatureResult(
                index=j,
                status="ok" if active > 0 else "dead",
                max_act=mx,
                mean_act=sm / n,
                density=active / n,
                n_tokens=self.n_tokens,
                histogram={"edges": edges, "counts": counts, "every": every},
            )
            for j, mx, sm, active, counts in zip(range(lo, hi), max_l, sum_l, active_l, hist_l, strict=True)
        ]

    def records(self, lo: int = 0, hi: int | None = None) -> SampledRecords:
        """Records of features [lo, hi), selected for all of them at once:

        - top: highest first (ties by context); even ranks train, odd ranks test, so both splits span the top;
        - quantile: the reservoir split by rank of activation into equal-count bins (0 = lowest); within a bin,
          by reservoir key (random, deterministic), skipping contexts already chosen as top, `per_quantile` each,
          alternating train/test;
        - random: the shared pool in key order, minus contexts already chosen; all test (scoring baseline).
        """
        cfg, nq = self.cfg, self.cfg.n_quantiles
        hi = self.n_features if hi is None else min(hi, self.n_features)
        lo = min(lo, hi)
        nf, cols = hi - lo, slice(lo, hi)
        f = self._final()
        # Buffers are [slot, feature]: each selection sorts every feature's column at once (axis 0), and
        # np.nonzero over the transposed masks lists the picks feature by feature.

        # Top: by activation descending, ties by context; unfilled slots (key -inf) last.
        valid = np.isfinite(f["top_keys"][:, cols])
        ctx, score = f["top_ctx"][:, cols], f["top_score"][:, cols]
        order = np.lexsort((ctx, np.where(valid, -score, np.inf)), axis=0)
        feat, rank = np.nonzero(np.take_along_axis(valid, order, 0).T)
        slot = order[rank, feat]
        ctx, score = ctx[slot, feat], score[slot, feat]
        top = (feat, ctx, np.full(len(feat), 0), rank % 2, rank, np.full(len(feat), -1), score)
        top_acts = f["top_acts"][slot, lo + feat]

        # Quantile: bins by rank of activation (ties by context) among the filled slots of a feature; within a
        # bin by reservoir key descending, equal keys in activation order (the unfilled get bin nq, last).
        keys = f["res_keys"][:, cols]
        valid = np.isfinite(keys)
        by_act = np.lexsort((f["res_ctx"][:, cols], np.where(valid, f["res_score"][:, cols], np.inf)), axis=0)
        pos = np.broadcast_to(np.arange(len(keys))[:, None], keys.shape)
        m = valid.sum(axis=0)
        bins = np.where(pos < m, pos * nq // np.maximum(m, 1), nq)
        within = np.lexsort((pos, -np.take_along_axis(keys, by_act, 0), bins), axis=0)
        qfeat, i = np.nonzero((np.take_along_axis(bins, within, 0) < nq).T)
        slot = by_act[within[i, qfeat], qfeat]
        qctx, qbin = f["res_ctx"][slot, lo + qfeat], bins[within[i, qfeat], qfeat]
        free = ~_in_sorted(_pair(qfeat, qctx), np.sort(_pair(feat, ctx)))  # not already chosen as top
        slot, qfeat, qctx, qbin = slot[free], qfeat[free], qctx[free], qbin[free]
        taken = _group_rank(qfeat * nq + qbin)
        keep = taken < cfg.per_quantile
        slot, qfeat, qctx, qbin, taken = slot[keep], qfeat[keep], qctx[keep], qbin[keep], taken[keep]
        quant = (qfeat, qctx, np.full(len(qfeat), 1), taken % 2, taken, qbin, f["res_score"][slot, lo + qfeat])
        quant_acts = f["res_acts"][slot, lo + qfeat]

        # Random: the pool in key order, minus the contexts chosen above, n_random per feature.
        pool_ctx = f["pool_ctx"]
        free = np.ones((nf, len(pool_ctx)), dtype=bool)
        if len(pool_ctx):
            by_ctx = np.argsort(pool_ctx)
            chosen_feat, chosen_ctx = np.concatenate([feat, qfeat]), np.concatenate([ctx, qctx])
            at = by_ctx[np.searchsorted(pool_ctx[by_ctx], chosen_ctx).clip(max=len(pool_ctx) - 1)]
            hit = pool_ctx[at] == chosen_ctx
            free[chosen_feat[hit], at[hit]] = False
        taken = np.cumsum(free, axis=1) - 1
        rfeat, i = np.nonzero(free & (taken < cfg.n_random))
        rand_acts = f["pool_acts"][i, :, lo + rfeat]  # [n, P]
        n = len(i)
        rand = (rfeat, pool_ctx[i], np.full(n, 2), np.full(n, 1), taken[rfeat, i], np.full(n, -1), rand_acts.max(1))

        feat_c, ctx_c, role_c, split_c, rank_c, bin_c, max_c = (
            np.concatenate(c) for c in zip(top, quant, rand, strict=True)
        )
        # Feature then context: the order of the record table's key, so inserts append to its b-tree.
        order = np.argsort(_pair(feat_c, ctx_c))
        return SampledRecords(
            feature=feat_c[order] + lo,
            context=ctx_c[order].astype(np.int64),
            role=_ROLE[role_c[order]],
            split=_SPLIT[split_c[order]],
            rank=rank_c[order].astype(np.int64),
            bin=bin_c[order].astype(np.int64),
            max_act=max_c[order].astype(np.float64),  # exact: float32 and float16 values
            acts=np.concatenate([top_acts, quant_acts, rand_acts]).astype("<f2", copy=False)[order],
        )
