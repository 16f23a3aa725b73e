"""SQLModel tables: the contract between stages.

Natural unique keys (model+name, corpus+idx, feature+context) make every write an idempotent upsert, so a rerun or
a resumed job never duplicates rows. Per-token data are compact blobs (see blobs.py), not one row per token.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel

# Bump when a table changes; store/migrations.py holds the step from each older version.
SCHEMA_VERSION = 6


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class SchemaVersion(SQLModel, table=True):
    __tablename__ = "schema_version"
    id: int = Field(default=1, primary_key=True)
    version: int
    updated_at: datetime = Field(default_factory=utcnow)


class SubjectModel(SQLModel, table=True):
    """A model under study. `id` is a short stable name (e.g. smollm2-135m-instruct)."""

    __tablename__ = "subject_model"
    id: str = Field(primary_key=True)
    family: str
    source: str  # where it was loaded from (directory or GGUF file)
    n_layers: int
    d_model: int
    weights_hash: str = ""
    created_at: datetime = Field(default_factory=utcnow)


class Site(SQLModel, table=True):
    __tablename__ = "site"
    __table_args__ = (UniqueConstraint("model_id", "name"),)
    id: int | None = Field(default=None, primary_key=True)
    model_id: str = Field(foreign_key="subject_model.id")
    name: str  # e.g. blocks.12.mlp.post
    width: int  # number of neurons / dimension at this site


class SAERow(SQLModel, table=True):
    """An SAE attached to a site. `id` is a content hash of its weights and cfg (see subject.sae.stable_id)."""

    __tablename__ = "sae"
    id: str = Field(primary_key=True)
    model_id: str = Field(foreign_key="subject_model.id")
    site: str
    architecture: str
    d_in: int
    d_sae: int
    k: int | None = None
    path: str
    cfg: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    train_report: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)


class Corpus(SQLModel, table=True):
    """A tokenized corpus slice. `id` hashes source, tokenizer, context length, seed and size."""

    __tablename__ = "corpus"
    id: str = Field(primary_key=True)
    name: str
    source: str
    tokenizer: str
    ctx_len: int
    bos_token_id: int
    n_docs: int
    n_contexts: int
    seed: int
    created_at: datetime = Field(default_factory=utcnow)


class Document(SQLModel, table=True):
    __tablename__ = "document"
    __table_args__ = (UniqueConstraint("corpus_id", "idx"),)
    id: int | None = Field(default=None, primary_key=True)
    corpus_id: str = Field(foreign_key="corpus.id")
    idx: int
    name: str


class Context(SQLModel, table=True):
    """A fixed-length window of token ids (BOS first), stored once and shared by all features."""

    __tablename__ = "context"
    __table_args__ = (UniqueConstraint("corpus_id", "idx"),)
    id: int | None = Field(default=None, primary_key=True)
    corpus_id: str = Field(foreign_key="corpus.id", index=True)
    idx: int  # position in the corpus slice (after the seeded shuffle)
    doc_idx: int
    offset: int  # token offset of the first non-BOS token inside its document
    tokens: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # int32 LE, ctx_len ids


class Feature(SQLModel, table=True):
    """A neuron or SAE latent with its activation statistics over one collection.

    `key` is the public id: MODEL/SITE/SOURCE/INDEX. Statistics exclude BOS positions.
    """

    __tablename__ = "feature"
    __table_args__ = (
        UniqueConstraint("model_id", "site", "source", "index"),
        Index("ix_feature_site_source", "site", "source"),
    )
    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(unique=True, index=True)
    model_id: str = Field(foreign_key="subject_model.id")
    site: str
    source: str  # "neurons" or an SAE id
    index: int
    status: str = "ok"  # ok | dead
    max_act: float = 0.0
    mean_act: float = 0.0
    density: float = 0.0  # fraction of (non-BOS) tokens with activation > 0
    n_tokens: int = Field(default=0, sa_type=BigInteger)  # 64-bit (schema 6): collections pass 2**31 tokens
    histogram: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    corpus_id: str = Field(foreign_key="corpus.id")
    run_id: int | None = Field(default=None, foreign_key="run.id")
    created_at: datetime = Field(default_factory=utcnow)


class Record(SQLModel, table=True):
    """One feature on one context: per-token activations (float16, positions after BOS)."""

    __tablename__ = "record"
    # Clustered by (feature, context) on SQLite: one b-tree per insert instead of table + index, and a feature's
    # records are one contiguous range. Other databases ignore the option.
    __table_args__ = {"sqlite_with_rowid": False}
    feature_id: int = Field(foreign_key="feature.id", primary_key=True)
    context_id: int = Field(foreign_key="context.id", primary_key=True)
    role: str  # top | quantile | random
    split: str  # train | test
    rank: int  # order within its role (top: 0 = highest)
    bin: int | None = None  # quantile bin (0 = lowest), for role quantile
    max_act: float
    acts: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class Run(SQLModel, table=True):
    """One execution of a stage. `key` hashes the config so a rerun finds (and resumes) its run."""

    __tablename__ = "run"
    id: int | None = Field(default=None, primary_key=True)
    stage: str
    key: str = Field(unique=True, index=True)
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    status: str = "running"  # running | done | failed | interrupted
    progress: int = 0  # stage-defined unit (collect: batches done and checkpointed)
    total: int = 0
    counts: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    checkpoint: str | None = None
    error: str | None = None
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    # Schema 5, for a job runner: which process runs it (host:pid) and when it last wrote (a stale heartbeat on a
    # running row means its process died).
    worker: str | None = None
    heartbeat_at: datetime | None = None


class CheckpointPart(SQLModel, table=True):
    """A collection's sampler checkpoint kept in the database (schema 6; used on PostgreSQL, so that a collection
    started on one machine resumes on any other): the bytes of the checkpoint file format (collect.buffers: the
    torch.save payload, then magic, length and SHA-256), cut into parts ordered by `part` (one bytea value is
    limited to 1 GB, and a part at a time is all a write holds in memory). Written in one transaction per
    checkpoint, which replaces every part of the previous one."""

    __tablename__ = "checkpoint"
    key: str = Field(primary_key=True)  # the collect run's key
    part: int = Field(primary_key=True)
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    written_at: datetime = Field(default_factory=utcnow)


class LLMCacheEntry(SQLModel, table=True):
    """A successful LLM response keyed by a hash of the full request (backend, model, messages, parameters)."""

    __tablename__ = "llm_cache"
    key: str = Field(primary_key=True)
    backend: str
    model: str
    request: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    response: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)


class LLMCall(SQLModel, table=True):
    """One LLM call (cache hits are not calls): tokens, latency and cost, summed by `autointerp usage`."""

    __tablename__ = "llm_call"
    id: int | None = Field(default=None, primary_key=True)
    backend: str = Field(index=True)
    model: str
    kind: str  # chat | logprobs
    stage: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cost_usd: float = 0.0
    status: str = "ok"  # ok | error
    error: str | None = None
    attempts: int = 1
    created_at: datetime = Field(default_factory=utcnow)


class Explanation(SQLModel, table=True):
    """One explainer's answer for one feature: a text when status is ok; failures and skips keep their reason.

    The unique key (feature, explainer, model, prompt hash, config hash) makes `explain` idempotent: a rerun finds
    the row and does nothing, and a changed prompt or setting makes a new row beside the old one.
    """

    __tablename__ = "explanation"
    __table_args__ = (UniqueConstraint("feature_id", "explainer", "model", "prompt_hash", "config_hash"),)
    id: int | None = Field(default=None, primary_key=True)
    feature_id: int = Field(foreign_key="feature.id", index=True)
    explainer: str  # llm | tokens
    model: str  # backend:model for LLM explainers, "" for the token baseline
    prompt: str  # prompt name ("" when no prompt)
    prompt_hash: str
    config_hash: str
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    status: str  # ok | failed | skipped
    text: str | None = None
    error: str | None = None
    raw: str | None = None  # the LLM's answer as received (also kept for failures)
    n_records: int = 0
    prompt_tokens: int = 0
    attempts: int = 1
    run_id: int | None = Field(default=None, foreign_key="run.id")
    created_at: datetime = Field(default_factory=utcnow)


class Score(SQLModel, table=True):
    """One scorer's verdict on one explanation, computed on the test split.

    `value` is None when the score is undefined (e.g. constant simulated activations) or the scorer failed; `status`
    and `reason` say which. Never a 0 standing in for a failure. `details` keeps what is needed to show the score
    (e.g. per-record simulated activations).
    """

    __tablename__ = "score"
    __table_args__ = (UniqueConstraint("explanation_id", "method", "model", "prompt_hash", "config_hash"),)
    id: int | None = Field(default=None, primary_key=True)
    explanation_id: int = Field(foreign_key="explanation.id", index=True)
    feature_id: int = Field(foreign_key="feature.id", index=True)
    method: str  # simulation | detection | fuzzing | embedding | intervention
    model: str  # backend:model of the scoring LLM, or the embedding model
    prompt: str = ""
    prompt_hash: str = ""
    config_hash: str = ""
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    status: str  # ok | undefined | failed
    value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int = 0
    n_failed: int = 0
    reason: str | None = None
    details: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    run_id: int | None = Field(default=None, foreign_key="run.id")
    created_at: datetime = Field(default_factory=utcnow)


class InterventionRow(SQLModel, table=True):
    """One feature's causal check (the `intervene` stage): the calibrated strength and the KL it reached, the direct
    logit effects of its output direction, and the baseline / steered continuations the judge compares.

    Unique per (feature, config hash): the hash covers everything that changes the numbers (mode, target KL,
    prompts, lengths, seed), so a rerun finds the row and redoes nothing; a failed row is tried again.
    """

    __tablename__ = "intervention"
    __table_args__ = (UniqueConstraint("feature_id", "config_hash"),)
    id: int | None = Field(default=None, primary_key=True)
    feature_id: int = Field(foreign_key="feature.id", index=True)
    mode: str  # add | clamp
    config_hash: str
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    status: str  # ok | failed
    strength: float | None = None  # add: alpha along the unit direction; clamp: the value set
    target_kl: float = 0.0
    kl: float | None = None  # mean next-token KL(base || steered) over the calibration prompts, in nats
    converged: bool = False  # |kl - target_kl| within tolerance
    start: int = 0  # first absolute position modified
    # Direct effects: [{"token_id", "token", "value"}], most promoted / most suppressed first.
    promoted: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    suppressed: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    # One per verification prompt: {"prompt", "baseline", "steered", "act_baseline", "act_steered", token counts}.
    samples: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    act_baseline: float | None = None  # the feature's mean activation over the baseline continuations' tokens
    act_steered: float | None = None  # ... over the steered continuations' tokens (unsteered model reading them)
    act_increase: float | None = None  # (act_steered - act_baseline) / the feature's max activation
    n_forward: int = 0  # forward passes spent on this feature (calibration, generation, measurement)
    n_generated: int = 0  # tokens generated for this feature
    seconds: float = 0.0
    error: str | None = None
    run_id: int | None = Field(default=None, foreign_key="run.id")
    created_at: datetime = Field(default_factory=utcnow)


class Verdict(SQLModel, table=True):
    """Whether one explanation passes both its best correlational score and the causal check: verified, unverified
    or contradicted, with the figures it rests on. Recomputed (upserted) on every `intervene` run, since the
    correlational scores may arrive later; unique per (explanation, config hash of judge and thresholds)."""

    __tablename__ = "verdict"
    __table_args__ = (UniqueConstraint("explanation_id", "config_hash"),)
    id: int | None = Field(default=None, primary_key=True)
    explanation_id: int = Field(foreign_key="explanation.id", index=True)
    feature_id: int = Field(foreign_key="feature.id", index=True)
    verdict: str  # verified | unverified | contradicted
    reason: str = ""
    causal_score_id: int | None = Field(default=None, foreign_key="score.id")
    causal_value: float | None = None  # judge accuracy over decided pairs
    causal_ci_low: float | None = None
    causal_ci_high: float | None = None
    act_increase: float | None = None
    correlational_score_id: int | None = Field(default=None, foreign_key="score.id")
    correlational_method: str | None = None  # simulation | detection | fuzzing
    correlational_value: float | None = None
    config_hash: str
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    run_id: int | None = Field(default=None, foreign_key="run.id")
    created_at: datetime = Field(default_factory=utcnow)


class Unit(SQLModel, table=True):
    """One unit of work of `autointerp run`: a feature in one stage for one identity, with its lease while a worker
    holds it (store.units claims and finishes them)."""

    __tablename__ = "unit"
    __table_args__ = (
        UniqueConstraint("stage", "identity", "feature_id"),
        Index("ix_unit_claim", "stage", "status", "rank"),
        Index("ix_unit_feature", "feature_id", "stage"),
    )
    id: int | None = Field(default=None, primary_key=True)
    stage: str
    identity: str  # hash of the stage's identity (explainer, scorers, judge, with prompt and config hashes)
    feature_id: int  # 0 for a unit of the whole job (the collection); no foreign key, so that one can exist
    rank: int = 0  # claim order within the stage (the stage's own order of features)
    status: str = "pending"  # pending | leased | done
    outcome: str | None = None  # done: the status of its rows (ok, failed, skipped, mixed)
    worker: str | None = None
    lease_expires_at: datetime | None = None
    heartbeat_at: datetime | None = None
    attempts: int = 0
    run_id: int | None = Field(default=None, foreign_key="run.id")
    error: str | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class Review(SQLModel, table=True):
    """One reviewer's decision on one explanation (the review page): accept, reject, edit (`text` holds the
    reviewer's wording, saved as a human explanation, `human_explanation_id`) or flag. Rows are only added, and
    removed by undo; the machine's explanation is never changed. Several reviewers each keep their own rows; a
    reviewer's latest row on an explanation is their decision.

    A table that older code ignores, made by create_all: adding it needs no schema version (workers of schema 6
    keep writing to a database that people review)."""

    __tablename__ = "review"
    __table_args__ = (
        Index("ix_review_feature_decision", "feature_id", "decision"),
        Index("ix_review_reviewer_explanation", "reviewer", "explanation_id"),
    )
    id: int | None = Field(default=None, primary_key=True)
    explanation_id: int = Field(foreign_key="explanation.id", index=True)
    feature_id: int = Field(foreign_key="feature.id")
    reviewer: str
    decision: str  # accept | reject | edit | flag
    text: str | None = None
    note: str | None = None
    human_explanation_id: int | None = Field(default=None, foreign_key="explanation.id")
    created_at: datetime = Field(default_factory=utcnow)
