"""The `sae train` stage: gather a site's activations over a corpus slice, train a TopK SAE, save it in SAELens
format and register it in the database."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from autointerp.collect.register import register_subject
from autointerp.config import RunConfig, SAETrainConfig
from autointerp.corpus import tokenize_corpus
from autointerp.jobs import Progress
from autointerp.store.engine import Store
from autointerp.store.tables import SAERow
from autointerp.store.writes import upsert_sae
from autointerp.subject.model import Subject, load_subject
from autointerp.subject.sae import sae_cfg_dict, save_sae, stable_id
from autointerp.subject.sae_train import TrainReport, train_topk_sae
from autointerp.subject.sites import capture, parse_site


@dataclass(frozen=True)
class SAETrainResult:
    path: str
    sae_id: str
    report: TrainReport
    gather_seconds: float


def gather_activations(
    subject: Subject, cfg: RunConfig, tcfg: SAETrainConfig, progress: Progress | None = None
) -> torch.Tensor:
    """[n_tokens, d] activations of tcfg.site, from a corpus slice seeded apart; the positions the collector never
    records (BOS and `collect.skip_positions` after it) are left out of training too."""
    ctx_len = cfg.corpus.ctx_len
    first = 1 + cfg.collect.skip_positions
    n_ctx = -(-tcfg.tokens // (ctx_len - first))
    corpus = tokenize_corpus(
        cfg.corpus.source,
        subject.tokenizer,
        tokenizer_name=subject.name,
        bos_token_id=subject.bos_token_id,
        ctx_len=ctx_len,
        max_tokens=n_ctx * ctx_len,
        seed=tcfg.corpus_seed,
    )
    tokens = torch.from_numpy(corpus.tokens).to(subject.device)
    bs = cfg.collect.batch_size
    chunks = []
    n_batches = -(-corpus.n_contexts // bs)
    for i in range(n_batches):
        acts = capture(subject.model, subject.layout, [tcfg.site], tokens[i * bs : (i + 1) * bs])[tcfg.site]
        chunks.append(acts[:, first:, :].reshape(-1, acts.shape[-1]).float().cpu())
        if progress:
            progress("activations", i + 1, n_batches)
    return torch.cat(chunks)[: tcfg.tokens]


def run_sae_train(
    cfg: RunConfig,
    store: Store,
    out: str | Path,
    *,
    tcfg: SAETrainConfig | None = None,
    subject: Subject | None = None,
    progress: Progress | None = None,
) -> SAETrainResult:
    tcfg = tcfg or cfg.sae_train
    parse_site(tcfg.site)
    subject = subject or load_subject(cfg.model.name, device=cfg.model.device, dtype=cfg.model.dtype)
    t0 = time.perf_counter()
    acts = gather_activations(subject, cfg, tcfg, progress)
    gather_seconds = time.perf_counter() - t0

    def step_progress(step: int, total: int, _loss: float) -> None:
        if progress:
            progress("train", step, total)

    sae, report = train_topk_sae(
        acts,
        width=tcfg.width,
        k=tcfg.k,
        site=tcfg.site,
        model_name=subject.name,
        epochs=float(tcfg.epochs),
        batch_size=tcfg.batch_size,
        seed=tcfg.seed,
        progress=step_progress,
    )
    path = save_sae(sae, out)
    sae_id = stable_id(path)
    register_subject(store, subject, [tcfg.site])
    upsert_sae(
        store,
        SAERow(
            id=sae_id,
            model_id=subject.name,
            site=tcfg.site,
            architecture="topk",
            d_in=sae.d_in,
            d_sae=sae.d_sae,
            k=tcfg.k,
            path=str(Path(path).resolve()),
            cfg=sae_cfg_dict(sae.cfg),
            train_report=asdict(report) | {"config": tcfg.model_dump(), "gather_seconds": gather_seconds},
        ),
    )
    return SAETrainResult(str(path), sae_id, report, gather_seconds)


def describe(res: SAETrainResult) -> str:
    r = res.report
    return (
        f"SAE {res.sae_id} saved to {res.path}: FVU={r.fvu:.3f} L0={r.l0:.1f} dead={r.dead_fraction:.1%} "
        f"({r.n_tokens} tokens, {r.steps} steps, {r.seconds:.0f}s training)"
    )


def train_missing_saes(
    cfg: RunConfig, store: Store, progress: Progress | None = None, say: Callable[[str], None] | None = None
) -> list[SAETrainResult]:
    """Train every SAE of `collect.saes` marked train_if_missing whose directory is missing or empty (a training
    that died before saving); an SAE of any format there counts as present. `collect` and `run` both call this
    before collecting, so a fresh clone's demo trains its SAE whichever command it runs."""
    done = []
    for spec in cfg.collect.saes:
        path = Path(spec.path)
        if not spec.train_if_missing or (path.is_dir() and any(path.iterdir())):
            continue
        tcfg = cfg.sae_train if spec.site is None else cfg.sae_train.model_copy(update={"site": spec.site})
        if say is not None:
            say(f"SAE {spec.path} missing: training it ({tcfg.site}, width {tcfg.width})")
        res = run_sae_train(cfg, store, spec.path, tcfg=tcfg, progress=progress)
        if say is not None:
            say(describe(res))
        done.append(res)
    return done
