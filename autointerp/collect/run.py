"""The collect stage: one batched pass over a corpus slice, hooks on the read sites of its sources (loaded through
subject.sources), streaming samplers per source, periodic checkpoints, then the features and their records written
in transactions.

Resuming: the sampler state is checkpointed atomically every `checkpoint_tokens`, and once more when the pass ends
(in a file beside a SQLite database; in the database on PostgreSQL, so that any machine can resume it); a rerun of
the same config finds its run row, reloads the checkpoint and continues from the next batch. The
samplers are deterministic, so the final database equals that of an uninterrupted run. Writing the corpus and the
features is idempotent, so a crash while writing is repaired by the rerun too. A checkpoint carries a SHA-256 of
its bytes: a truncated or damaged one is never resumed from; the collection starts again with a warning, also
recorded in the run's counts (`checkpoint_rejected`). Ctrl-C marks the run `interrupted` and keeps the checkpoint.
Tests crash it at chosen points (AUTOINTERP_TEST_KILL_AT, see buffers.KillSwitch).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from autointerp.collect.buffers import KILL_ENV, Batch, CheckpointError, Dense, KillSwitch, Sparse, random_pool
from autointerp.collect.checkpoint import Checkpoint, checkpoint_for, ctrl_c_after
from autointerp.collect.register import register_sources
from autointerp.collect.sampler import (
    FeatureSampler,
    NonFiniteActivations,
    SamplerConfig,
)
from autointerp.config import RunConfig, config_hash
from autointerp.corpus import TokenizedCorpus, tokenize_corpus
from autointerp.jobs import Progress
from autointerp.store.engine import Store
from autointerp.store.runs import get_or_create_run, set_run
from autointerp.store.tables import Corpus
from autointerp.store.writes import FeatureRow, RecordBatch, write_corpus, write_features
from autointerp.subject.model import Subject, load_subject
from autointerp.subject.sites import capture
from autointerp.subject.sources import (
    FeatureSource,
    NeuronSpec,
    SAESource,
    SourceSpec,
    TokenSpec,
    load_sources,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectSummary:
    run_id: int
    status: str  # done | already-done
    n_tokens: int
    n_features: int
    n_dead: int
    seconds: float
    tokens_per_second: float
    sources: tuple[str, ...]
    resumed_at_batch: int = 0  # first batch of this execution's pass (0: from the start)
    checkpoint_rejected: str | None = None  # why a checkpoint found was not resumed from


def sampler_config(cfg: RunConfig) -> SamplerConfig:
    c = cfg.collect
    return SamplerConfig(
        top_k=c.top_k,
        n_quantiles=c.n_quantiles,
        per_quantile=c.per_quantile,
        n_random=c.n_random,
        histogram_every=c.histogram_every,
    )


def source_specs(cfg: RunConfig) -> list[SourceSpec]:
    """What the config collects: the neurons of each site, each SAE (or folder of several), the planted features."""
    specs: list[SourceSpec] = [NeuronSpec(site) for site in cfg.collect.sites]
    if cfg.collect.planted:
        from autointerp.collect.planted import PLANTED, RULES, planted_for

        # Planted features are functions of the token alone: they sit on the embedding site of block 0.
        specs.append(TokenSpec(PLANTED, "blocks.0.resid.pre", len(RULES), planted_for))
    specs += [SAESource(spec.path, site=spec.site) for spec in cfg.collect.saes]
    return specs


def _batch(source: FeatureSource, x: torch.Tensor) -> Batch:
    """The source's activations on a batch: x is the read site's tensor [B, P, d], or token ids [B, P]."""
    if source.sparse:
        values, indices = source.encode_sparse(x)
        return Sparse(values, indices, source.n_features)
    return Dense(source.encode(x))


def _write_corpus(store: Store, corpus: TokenizedCorpus, hook: Callable[[], None]) -> dict[int, int]:
    row = Corpus(
        id=corpus.id,
        name=corpus.name,
        source=corpus.source,
        tokenizer=corpus.tokenizer,
        ctx_len=corpus.ctx_len,
        bos_token_id=corpus.bos_token_id,
        n_docs=len(corpus.doc_names),
        n_contexts=corpus.n_contexts,
        seed=corpus.seed,
    )
    return write_corpus(store, row, corpus.doc_names, corpus.tokens, corpus.doc_idx, corpus.offsets, on_commit=hook)


@dataclass
class _Pass:
    """Everything the batch loop needs; built once per run."""

    subject: Subject
    corpus: TokenizedCorpus
    sources: list[FeatureSource]
    new_samplers: Callable[[], list[FeatureSampler]]
    batch_size: int
    first: int  # first recorded position (1 + skip_positions)
    checkpoint_every: int  # batches
    ckpt: Checkpoint
    kill: KillSwitch

    def __post_init__(self) -> None:
        self.samplers = self.new_samplers()
        self.done = 0  # batches in the samplers
        self.saved = 0  # batches in the checkpoint on disk

    @property
    def n_batches(self) -> int:
        return -(-self.corpus.n_contexts // self.batch_size)

    def resume_point(self) -> tuple[int, str | None]:
        """(first batch to run, why the checkpoint found was rejected); a rejected one starts from batch 0."""
        self.ckpt.clean()
        if not self.ckpt.exists():
            return 0, None
        try:
            next_batch = self.ckpt.restore(self.samplers, self.n_batches)
        except Exception as exc:  # noqa: BLE001 (any failure: the state may be half loaded, so start afresh)
            reason = str(exc) if isinstance(exc, CheckpointError) else f"cannot load it: {type(exc).__name__}: {exc}"
            log.warning("collect: checkpoint %s not resumed from (%s); collecting from batch 0", self.ckpt, reason)
            self.samplers = self.new_samplers()
            self.ckpt.remove()
            return 0, reason
        self.done = self.saved = next_batch
        return next_batch, None

    def checkpoint(self, store: Store, run_id: int, next_batch: int) -> None:
        with ctrl_c_after():
            digest = self.ckpt.save(next_batch, self.samplers, lambda: self.kill("checkpoint-write"))
            self.saved = next_batch
            self.kill("checkpoint-replace")
            set_run(store, run_id, progress=next_batch, checkpoint=self.ckpt.label(digest))

    def step(self, i: int) -> None:
        """Batch `i` of the pass into the samplers."""
        sites = sorted({s.read_site for s in self.sources if not s.from_tokens})
        n_ctx, bs = self.corpus.n_contexts, self.batch_size
        lo, hi = i * bs, min((i + 1) * bs, n_ctx)
        tokens = torch.from_numpy(self.corpus.tokens[lo:hi]).to(self.subject.device)
        acts = capture(self.subject.model, self.subject.layout, sites, tokens) if sites else {}
        ctx = torch.arange(lo, hi)
        try:
            for source, sampler in zip(self.sources, self.samplers, strict=True):
                if source.from_tokens:
                    sampler.update(_batch(source, tokens[:, self.first :]), ctx, at=i)
                    continue
                x = acts[source.read_site][:, self.first :, :]  # collected where the source reads
                sampler.update(_batch(source, x.float().cpu() if x.device.type != "cpu" else x), ctx, at=i)
        except NonFiniteActivations as exc:  # refused before it changed a sampler; say where
            batch = f"batch {i + 1} of {self.n_batches} (contexts {lo}-{hi - 1})"
            dtype = str(self.subject.model.dtype).removeprefix("torch.")
            hint = f"broken weights, or an overflow of the model's {dtype} (model.dtype); nothing was written"
            raise exc.located(f"at site {source.read_site} ({source.name}) in {batch}", hint) from None

    def run(
        self, store: Store, run_id: int, start: int, progress: Progress | None, on_batch: Callable[[int], None] | None
    ) -> None:
        n_batches = self.n_batches
        for i in range(start, n_batches):
            self.step(i)
            self.done = done = i + 1
            if on_batch is not None:
                on_batch(i)
            if done % self.checkpoint_every == 0 and done < n_batches:
                self.checkpoint(store, run_id, done)
            if progress:
                progress("collect", done, n_batches)
        if start < n_batches:
            # The pass is over: a crash in the final write then resumes here instead of redoing the pass.
            self.checkpoint(store, run_id, n_batches)


def write_results(
    store: Store,
    p: _Pass,
    run_id: int,
    ctx_ids: np.ndarray,
    chunk: int,
    progress: Progress | None,
) -> tuple[int, int]:
    """Features and records of every source, `chunk` features per transaction; returns (features, dead).

    A writer thread inserts chunk i while this thread selects chunk i + 1 (numpy, and SQLite releases the GIL
    inside its b-tree work). At most two chunks are in flight, so memory stays bounded.
    """
    n_features = n_dead = 0
    total = sum(s.n_features for s in p.sources)
    pending: list[Future[int]] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="autointerp-writer") as writer:
        for source, sampler in zip(p.sources, p.samplers, strict=True):
            for lo in range(0, source.n_features, chunk):
                rows = [
                    FeatureRow(
                        model_id=p.subject.name,
                        site=source.read_site,
                        source=source.name,
                        index=r.index,
                        status=r.status,
                        max_act=r.max_act,
                        mean_act=r.mean_act,
                        density=r.density,
                        n_tokens=r.n_tokens,
                        histogram=r.histogram,
                        corpus_id=p.corpus.id,
                        run_id=run_id,
                    )
                    for r in sampler.results(lo, lo + chunk)
                ]
                sel = sampler.records(lo, lo + chunk)
                records = RecordBatch(
                    feature=sel.feature - lo,
                    context_id=ctx_ids[sel.context],
                    role=sel.role,
                    split=sel.split,
                    rank=sel.rank,
                    bin=sel.bin,
                    max_act=sel.max_act,
                    acts=sel.acts,
                )
                n_dead += sum(r.status == "dead" for r in rows)
                while len(pending) >= 2:
                    n_features += pending.pop(0).result()
                    p.kill("final-write")
                    if progress:
                        progress("write", n_features, total)
                pending.append(writer.submit(write_features, store, rows, records))
        for fut in pending:
            n_features += fut.result()
            p.kill("final-write")
            if progress:
                progress("write", n_features, total)
    return n_features, n_dead


@dataclass
class Collection:
    """What a collection of `cfg` is, before anything is written: the subject, the corpus, the sources, and the key
    of its run (`run_key`: model weights, corpus, sources, sampler settings, batching). Every shard of a sharded
    collection builds the same one from the config alone and checks the key against the driver's."""

    cfg: RunConfig
    subject: Subject
    corpus: TokenizedCorpus
    sources: list[FeatureSource]
    scfg: SamplerConfig
    first: int  # first recorded position (1 + skip_positions)
    key_material: dict[str, Any]
    run_key: str
    n_pos: int  # recorded positions per context
    n_batches: int
    names: tuple[str, ...]  # the sources'

    def new_samplers(self) -> list[FeatureSampler]:
        n_pool = int(self.scfg.n_random * self.scfg.oversample)
        pool = random_pool(self.corpus.n_contexts, n_pool, seed=self.corpus.seed)
        return [FeatureSampler(s.n_features, self.n_pos, self.scfg, pool, sparse=s.sparse) for s in self.sources]

    def new_pass(self, ckpt: Checkpoint, kill: KillSwitch | None = None) -> _Pass:
        bs = self.cfg.collect.batch_size
        every = max(1, self.cfg.collect.checkpoint_tokens // (bs * self.corpus.ctx_len))
        return _Pass(self.subject, self.corpus, self.sources, self.new_samplers, bs, self.first, every, ckpt,
                     kill or KillSwitch(os.environ.get(KILL_ENV)))  # fmt: skip


def prepare_collection(
    cfg: RunConfig,
    *,
    subject: Subject | None = None,
    corpus: TokenizedCorpus | None = None,
    sources: Sequence[FeatureSource] | None = None,
) -> Collection:
    """Load what `cfg` collects (the subject, the tokenized corpus, the sources) and key its run; writes nothing.
    `subject` and `sources`, when given, are cfg's loaded already (the CLI loads them before creating a database)."""
    subject = subject or load_subject(cfg.model.name, device=cfg.model.device, dtype=cfg.model.dtype)
    corpus = corpus or tokenize_corpus(
        cfg.corpus.source,
        subject.tokenizer,
        tokenizer_name=subject.name,
        bos_token_id=subject.bos_token_id,
        ctx_len=cfg.corpus.ctx_len,
        max_tokens=cfg.corpus.max_tokens,
        seed=cfg.corpus.seed,
    )
    sources = list(sources) if sources is not None else load_sources(subject, source_specs(cfg))
    if not sources:
        raise ValueError("nothing to collect: give at least one site (--sites) or SAE (--sae)")
    first = 1 + cfg.collect.skip_positions  # BOS and the attention-sink positions after it are never recorded
    if corpus.ctx_len - first < 1:
        raise ValueError(f"ctx_len {corpus.ctx_len} leaves no position after skipping {first}")
    scfg = sampler_config(cfg)
    key_material: dict[str, Any] = {
        "model": [subject.name, subject.weights_hash],
        "corpus": corpus.id,
        "sources": [[s.read_site, s.name] for s in sources],
        "sampler": asdict(scfg),
        "skip_positions": cfg.collect.skip_positions,
        "batch_size": cfg.collect.batch_size,
    }
    run_key = "collect-" + config_hash(key_material)
    n_batches = -(-corpus.n_contexts // cfg.collect.batch_size)
    return Collection(cfg, subject, corpus, sources, scfg, first, key_material, run_key, corpus.ctx_len - first,
                      n_batches, tuple(s.name for s in sources))  # fmt: skip


def begin_run(c: Collection, store: Store) -> tuple[Any, Checkpoint]:
    register_sources(store, c.subject, c.sources)
    conf = {"run": c.cfg.model_dump(mode="json"), "resolved": c.key_material}
    run = get_or_create_run(store, "collect", c.run_key, conf, total=c.n_batches)
    return run, checkpoint_for(store, c.run_key)


def write_corpus_ids(store: Store, c: Collection, kill: KillSwitch) -> np.ndarray:
    id_of = _write_corpus(store, c.corpus, lambda: kill("corpus-write"))
    return np.array([id_of[i] for i in range(c.corpus.n_contexts)], dtype=np.int64)


def run_collect(
    cfg: RunConfig,
    store: Store,
    *,
    subject: Subject | None = None,
    corpus: TokenizedCorpus | None = None,
    sources: Sequence[FeatureSource] | None = None,
    progress: Progress | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> CollectSummary:
    """Collect every source of `cfg` into `store`; resumes a matching unfinished run, skips a finished one."""
    t0 = time.perf_counter()
    c = prepare_collection(cfg, subject=subject, corpus=corpus, sources=sources)
    n_batches, bs, n_pos = c.n_batches, cfg.collect.batch_size, c.n_pos
    run, ckpt = begin_run(c, store)
    assert run.id is not None
    if run.status == "done":
        ckpt.remove()  # left by a process killed between finishing and cleaning up
        return CollectSummary(run.id, "already-done", c.corpus.n_contexts * n_pos, 0, 0, 0.0, 0.0, c.names)

    p: _Pass | None = None
    kill = KillSwitch(os.environ.get(KILL_ENV))
    try:
        ctx_ids = write_corpus_ids(store, c, kill)
        p = c.new_pass(ckpt, kill)
        start, rejected = p.resume_point()
        if rejected is not None:
            set_run(store, run.id, counts={"checkpoint_rejected": rejected})
        t_loop = time.perf_counter()
        p.run(store, run.id, start, progress, on_batch)
        loop_seconds = time.perf_counter() - t_loop
        n_features, n_dead = write_results(store, p, run.id, ctx_ids, cfg.collect.write_batch_features, progress)
    except KeyboardInterrupt:  # Ctrl-C: recorded and said, then raised (the CLI exits with 130)
        msg = _interrupted_message(p, n_batches)
        log.warning("%s", msg)
        set_run(store, run.id, status="interrupted", error=f"KeyboardInterrupt: {msg}")
        raise
    except Exception as exc:  # recorded, then raised: the checkpoint stays, so a rerun resumes
        set_run(store, run.id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    seconds = time.perf_counter() - t0
    n_tok = c.corpus.n_contexts * n_pos
    counts: dict[str, Any] = {
        "tokens": n_tok,
        "features": n_features,
        "dead": n_dead,
        "resumed_at_batch": start,
        "loop_seconds": round(loop_seconds, 3),
        "seconds": round(seconds, 3),
    }
    if rejected is not None:
        counts["checkpoint_rejected"] = rejected
    set_run(store, run.id, status="done", progress=n_batches, counts=counts, error=None)
    ckpt.remove()
    loop_tokens = (n_batches - start) * bs * c.corpus.ctx_len
    rate = loop_tokens / max(loop_seconds, 1e-9)
    return CollectSummary(run.id, "done", n_tok, n_features, n_dead, seconds, rate, c.names, start, rejected)


def _interrupted_message(p: _Pass | None, n_batches: int) -> str:
    if p is None:
        return "collect interrupted while writing the corpus; rerun the same command to go on"
    if p.saved >= n_batches:
        return "collect interrupted while writing the features; rerun the same command to finish (the pass is saved)"
    resume = f"resume from its checkpoint ({p.saved} batches)" if p.saved else "start again (no checkpoint yet)"
    return f"collect interrupted with {p.done} of {n_batches} batches done; rerun the same command to {resume}"
