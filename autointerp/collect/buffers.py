"""The building blocks of streaming sampling: hash keys of (context, feature) pairs, the fixed histogram bins, the
dense and sparse activation batches, a keyed top-k buffer per feature (collect.sampler puts them together), the
checksummed bytes their state is checkpointed to (a file, or parts in the database), and the points where tests
crash the process that writes it.

Keys are hashes, not draws from a stream, so which records are kept does not depend on batch order or size.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

_M32 = 0xFFFFFFFF
SALT_QUANTILE = 0x5A17
SALT_RANDOM = 0x0C0FFEE

# Histogram of positive activations: half-octave bins 2^(i/2) over [2^-12, 2^12); values outside are clamped into
# the end bins. Fixed edges make histograms mergeable across shards and comparable across features.
HIST_LO, HIST_HI, HIST_STEPS_PER_OCTAVE = -12, 12, 2
N_HIST = (HIST_HI - HIST_LO) * HIST_STEPS_PER_OCTAVE


def hist_edges() -> list[float]:
    return [2.0 ** (HIST_LO + i / HIST_STEPS_PER_OCTAVE) for i in range(N_HIST + 1)]


def hist_bins(vals: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each positive value (garbage for non-positive ones: callers mask them).

    frexp gives x = m * 2^e with m in [0.5, 1): floor(2 log2 x) = 2(e - 1) + [m >= sqrt(1/2)], with no log.
    """
    m, e = torch.frexp(vals.float())
    bins = (e.to(torch.int64) - 1 - HIST_LO) * HIST_STEPS_PER_OCTAVE + (m >= 0.7071067811865476)
    return bins.clamp_(0, N_HIST - 1)


def _hash32(x: torch.Tensor, salt: int) -> torch.Tensor:
    """A 32-bit integer finalizer over int64 values; constants < 2^27 keep every product inside int64."""
    x = (x.to(torch.int64) * 0x27D4EB2F + salt) & _M32
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def hash_uniform(ctx: torch.Tensor, feat: torch.Tensor, salt: int) -> torch.Tensor:
    """Deterministic uniform [0, 1) float64 keys for (context, feature) pairs; ctx broadcasts against feat.

    frac(a(c) * m(f) + b(f)) with a(c) uniform per context and m(f) an integer >= 1: for a fixed feature the keys
    are independent uniforms over contexts (what a reservoir needs), and different multipliers decorrelate
    features. Three float ops per pair, where hashing every pair would cost a dozen integer ops.
    """
    a = (_hash32(ctx, salt).to(torch.float64) + 0.5) / 4294967296.0
    hf = _hash32(feat, salt ^ 0x3C6EF372)
    m = (hf & 0xFFFFF).to(torch.float64) + 1.0
    b = (hf >> 12).to(torch.float64) / 1048576.0
    return torch.frac(a * m + b)


def random_pool(n_contexts: int, size: int, seed: int) -> np.ndarray:
    """The `size` context indices with the smallest hash keys: a seeded uniform sample, sorted by key."""
    keys = hash_uniform(torch.arange(n_contexts), torch.tensor(seed), SALT_RANDOM)
    order = torch.argsort(keys, stable=True)[: min(size, n_contexts)]
    return order.numpy()


@dataclass(frozen=True)
class Dense:
    acts: torch.Tensor  # [B, P, F]


@dataclass(frozen=True)
class Sparse:
    """The K largest activations per token (TopK SAE): values [B, P, K] >= 0, feature indices [B, P, K]."""

    values: torch.Tensor
    indices: torch.Tensor
    n_features: int

    def dense(self) -> torch.Tensor:
        b, p, _ = self.values.shape
        out = torch.zeros((b, p, self.n_features), dtype=self.values.dtype)
        return out.scatter_(2, self.indices, self.values)

    def gather(self, rows: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Per-token activations [n, P] of feature feats[i] in context rows[i], straight from the sparse form.

        Each sparse entry (b, p, j) is matched to its pair by a binary search over the sorted pair keys, so the
        cost is O(B * P * K * log n) and no [B, P, F] tensor is ever built.
        """
        b, p, k = self.values.shape
        n = rows.numel()
        out = torch.zeros((n, p), dtype=self.values.dtype)
        if n == 0:
            return out
        pair_keys = rows * self.n_features + feats
        order = torch.argsort(pair_keys)
        sorted_keys = pair_keys[order]
        entry_keys = (torch.arange(b)[:, None, None] * self.n_features + self.indices).reshape(-1)
        at = torch.searchsorted(sorted_keys, entry_keys).clamp_(max=n - 1)
        hit = sorted_keys[at] == entry_keys
        entry_pos = torch.arange(p)[None, :, None].expand(b, p, k).reshape(-1)
        out[order[at[hit]], entry_pos[hit]] = self.values.reshape(-1)[hit]
        return out


Batch = Dense | Sparse


class PairwiseSum:
    """A running sum of per-batch vectors whose rounding does not depend on how the batches are split up: a fixed
    binary tree over batch numbers, node (level, j) covering batches [j * 2^level, (j + 1) * 2^level), each node's
    value always left + right. `nodes` holds the complete subtrees of the batches added so far, left to right (a
    binary counter: O(log batches) vectors). A shard of contiguous batches keeps its own nodes; `absorb` pushes the
    next shard's nodes on, completing the same nodes one pass completes, so the merged sum equals the single pass's
    bit for bit (float addition is not associative: a plain running sum would differ in the last bits)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.nodes: list[tuple[int, int, torch.Tensor]] = []  # (level, position, value)

    def end(self) -> int:
        """The batch after the last one added (0 when empty)."""
        if not self.nodes:
            return 0
        level, pos, _ = self.nodes[-1]
        return (pos + 1) << level

    def add(self, value: torch.Tensor, at: int | None = None) -> None:
        """Add batch `at`'s vector (default: the batch after the last one)."""
        self._push(0, self.end() if at is None else at, value.to(torch.float64))

    def _push(self, level: int, pos: int, value: torch.Tensor) -> None:
        if self.nodes and self.end() != pos << level:
            raise ValueError(
                f"batches {pos << level}.. do not follow batch {self.end() - 1}: shards must be contiguous"
            )
        while pos % 2 == 1 and self.nodes and self.nodes[-1][0] == level:
            value = self.nodes.pop()[2] + value  # the left sibling (pos - 1) is on top: the node is complete
            level, pos = level + 1, pos // 2
        self.nodes.append((level, pos, value))

    def absorb(self, other: PairwiseSum) -> None:
        """Add the batches of `other`, which start where these end."""
        for level, pos, value in other.nodes:
            self._push(level, pos, value)

    def total(self) -> torch.Tensor:
        out = torch.zeros(self.n, dtype=torch.float64)
        for k, (_, _, value) in enumerate(self.nodes):
            out = value.clone() if k == 0 else out + value
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "levels": torch.tensor([n[0] for n in self.nodes], dtype=torch.int64),
            "positions": torch.tensor([n[1] for n in self.nodes], dtype=torch.int64),
            "values": torch.stack([n[2] for n in self.nodes]) if self.nodes else torch.zeros((0, self.n)),
        }

    @classmethod
    def from_state(cls, n: int, state: dict[str, torch.Tensor]) -> PairwiseSum:
        out = cls(n)
        values = state["values"].to(torch.float64)
        out.nodes = [(int(lv), int(p), values[k]) for k, (lv, p) in enumerate(zip(state["levels"], state["positions"],
                                                                                  strict=True))]  # fmt: skip
        return out


Gather = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class KeyedBuffer:
    """Per feature, the k (key, context) pairs with the largest keys, with each context's per-token activations.

    `offer` only stages the pairs whose key beats the feature's current k-th key (a cheap comparison over
    [batch, features]); `merge` folds the staged pairs in with one sort, every few batches. The floor used to
    stage is stale between merges, which only admits extra candidates, never loses one. Ties are broken by
    arrival order, so a run is deterministic for its batching (see merge).
    """

    def __init__(self, k: int, n_features: int, n_pos: int, act_dtype: torch.dtype = torch.float16) -> None:
        self.k, self.n_features, self.n_pos = k, n_features, n_pos
        self.keys = torch.full((k, n_features), -math.inf, dtype=torch.float64)
        self.ctx = torch.full((k, n_features), -1, dtype=torch.int64)
        self.score = torch.zeros((k, n_features), dtype=torch.float32)
        self.acts = torch.zeros((k, n_features, n_pos), dtype=act_dtype)
        self.floor = torch.full((n_features,), -math.inf, dtype=torch.float64)
        self._staged: list[tuple[torch.Tensor, ...]] = []
        self._n_staged = 0
        self.max_staged = max(4096, k * n_features)

    def offer(self, keys: torch.Tensor, ctx: torch.Tensor, scores: torch.Tensor, gather: Gather) -> None:
        """keys/scores [B, F] (key -inf = not eligible), ctx [B]; gather(rows, feats) -> acts [n, P]."""
        if self.k == 0:
            return
        rows, feats = (keys > self.floor[None, :]).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return
        acts = gather(rows, feats).to(self.acts.dtype)
        self._staged.append((keys[rows, feats], ctx[rows], scores[rows, feats], feats, acts))
        self._n_staged += rows.numel()
        if self._n_staged >= self.max_staged:
            self.merge()

    def merge(self) -> None:
        if not self._staged:
            return
        k, nf = self.k, self.n_features
        s_keys, s_ctx, s_score, s_feat, s_acts = (torch.cat(t) for t in zip(*self._staged, strict=False))
        self._staged, self._n_staged = [], 0
        slot_feat = torch.arange(nf).repeat(k)  # buffer entry (slot, f) flattened row-major
        keys = torch.cat([self.keys.reshape(-1), s_keys])
        ctx = torch.cat([self.ctx.reshape(-1), s_ctx])
        feat = torch.cat([slot_feat, s_feat])
        # Order by feature, then key descending (two stable sorts, last key first). Equal keys keep arrival
        # order (buffer first), which is deterministic for a given batching; collect fixes the batching per run.
        order = torch.argsort(keys, descending=True, stable=True)
        order = order[torch.argsort(feat[order], stable=True)]
        f_sorted = feat[order]
        counts = torch.bincount(f_sorted, minlength=nf)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel()) - starts[f_sorted]
        keep = rank < k
        src, dst_slot, dst_feat = order[keep], rank[keep], f_sorted[keep]
        n_buf = k * nf
        new_keys = torch.full((k, nf), -math.inf, dtype=torch.float64)
        new_ctx = torch.full((k, nf), -1, dtype=torch.int64)
        new_score = torch.zeros((k, nf), dtype=torch.float32)
        # Slots left without an entry keep key -inf and are never read, so their activations need no zeroing.
        new_acts = torch.empty((k, nf, self.n_pos), dtype=self.acts.dtype)
        new_keys[dst_slot, dst_feat] = keys[src]
        new_ctx[dst_slot, dst_feat] = ctx[src]
        new_score[dst_slot, dst_feat] = torch.cat([self.score.reshape(-1), s_score])[src]
        from_buf = src < n_buf
        new_acts[dst_slot[from_buf], dst_feat[from_buf]] = self.acts.reshape(n_buf, self.n_pos)[src[from_buf]]
        new_acts[dst_slot[~from_buf], dst_feat[~from_buf]] = s_acts[src[~from_buf] - n_buf]
        self.keys, self.ctx, self.score, self.acts = new_keys, new_ctx, new_score, new_acts
        self.floor = self.keys.min(dim=0).values  # slots are filled by rank, so this is the k-th key

    def absorb(self, state: dict[str, torch.Tensor]) -> None:
        """Take in another buffer's pairs (its state): the k largest keys of both are kept. Equal keys keep the
        order they are staged in: this buffer's, then the other's by rank, so a shard of later contexts absorbed
        after the earlier ones ties as one pass over both would (the earlier context first)."""
        keys = state["keys"]
        if keys.shape != self.keys.shape:
            raise ValueError(f"a buffer of shape {tuple(keys.shape)} cannot merge into {tuple(self.keys.shape)}")
        self.merge()
        slots, feats = torch.isfinite(keys).nonzero(as_tuple=True)  # row-major: each feature's pairs by rank
        if slots.numel() == 0:
            return
        self._staged.append((keys[slots, feats], state["ctx"][slots, feats], state["score"][slots, feats], feats,
                             state["acts"][slots, feats].to(self.acts.dtype)))  # fmt: skip
        self._n_staged += slots.numel()
        self.merge()

    def state(self) -> dict[str, torch.Tensor]:
        self.merge()
        return {"keys": self.keys, "ctx": self.ctx, "score": self.score, "acts": self.acts}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.keys, self.ctx, self.score, self.acts = (
            state["keys"],
            state["ctx"],
            state["score"],
            state["acts"],
        )
        self.floor = self.keys.min(dim=0).values
        self._staged, self._n_staged = [], 0


# ---- state files -----------------------------------------------------------------------------------------------
# The torch.save bytes of a state dict, then a trailer: magic, payload length, SHA-256 of the payload.
_MAGIC = b"AICKPT1\n"
_TRAILER = len(_MAGIC) + 8 + 32


class CheckpointError(ValueError):
    """A state file that cannot be trusted (truncated, damaged, or not one of ours)."""


class _HashingWriter:
    """A write-only file for torch.save that hashes what passes through: the checksum costs no second read."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.n += len(b)
        return int(self.f.write(b))

    def flush(self) -> None:
        self.f.flush()


def write_state(out: Any, state: dict[str, Any], on_written: Callable[[], None] | None = None) -> str:
    """Write `state` and its trailer to the writable `out` (a file, or a database checkpoint's sink); returns the
    SHA-256 in hex. `on_written` runs once the state is written, before its trailer (a test's kill point)."""
    hashed = _HashingWriter(out)
    torch.save(state, hashed)  # type: ignore[arg-type]
    if on_written is not None:
        on_written()
    digest = hashed.sha.digest()
    out.write(_MAGIC + hashed.n.to_bytes(8, "little") + digest)
    return digest.hex()


def save_state(path: Path, state: dict[str, Any], on_written: Callable[[], None] | None = None) -> str:
    """Write `state` and its checksum to `path` atomically (a temporary file, then a rename); returns the SHA-256
    in hex (see write_state).

    No fsync: a file that a power cut leaves incomplete fails its checksum and is never read back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}")
    with tmp.open("wb") as f:
        digest = write_state(f, state, on_written)
    os.replace(tmp, path)  # atomic: a kill -9 leaves the old file or the new one, never half of one
    return digest


def read_state(path: Path) -> dict[str, Any]:
    """The state written by `save_state`, once its length and SHA-256 check out; else CheckpointError."""
    return state_from_bytes(path.read_bytes())


def state_from_bytes(data: bytes, what: str = "file") -> dict[str, Any]:
    """The state in the bytes `write_state` wrote, once their length and SHA-256 check out; else CheckpointError
    (naming `what` holds them when the checksum does not match)."""
    size = len(data)
    if size < _TRAILER:
        raise CheckpointError(f"{size} bytes, too short for a checkpoint (truncated)")
    payload, trailer = memoryview(data)[: size - _TRAILER], data[size - _TRAILER :]
    magic, length, digest = trailer[: len(_MAGIC)], int.from_bytes(trailer[len(_MAGIC) : -32], "little"), trailer[-32:]
    if magic != _MAGIC:
        raise CheckpointError("no checksum at its end (truncated, damaged, or written by an older autointerp)")
    if length != len(payload):
        raise CheckpointError(f"{len(payload)} bytes of state, its trailer says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"SHA-256 mismatch: the {what} is damaged")
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as exc:  # noqa: BLE001 (a checksummed file torch cannot read: written by another version)
        raise CheckpointError(f"unreadable: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"holds a {type(state).__name__}, not a state dict")
    return state


# ---- crash points ----------------------------------------------------------------------------------------------
KILL_ENV = "AUTOINTERP_TEST_KILL_AT"
KILL_POINTS = (
    "corpus-write",  # after a transaction of the corpus write (the corpus and documents, then each context chunk)
    "checkpoint-write",  # a checkpoint's bytes written to its temporary file, not yet complete nor renamed
    "checkpoint-replace",  # a checkpoint renamed into place, the run row not yet updated
    "final-write",  # after a chunk of the final feature write is committed
)


class KillSwitch:
    """The test hook AUTOINTERP_TEST_KILL_AT=POINT[:N]: SIGKILL (no cleanup runs, as in a crash) the N-th time the
    process reaches POINT (N = 1 by default). Unset, each point costs one comparison."""

    def __init__(self, spec: str | None) -> None:
        self.point, self.at, self.seen = None, 1, 0
        if not spec:
            return
        point, _, nth = spec.partition(":")
        if point not in KILL_POINTS or (nth and not nth.isdigit()):
            raise ValueError(f"{KILL_ENV}={spec!r}: expected POINT[:N] with POINT one of {', '.join(KILL_POINTS)}")
        self.point, self.at = point, int(nth or 1)

    def __call__(self, point: str) -> None:
        if point != self.point:
            return
        self.seen += 1
        if self.seen == self.at:
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
