"""A small TopK SAE trainer for CPU (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Exists because no pretrained SAE can be downloaded here. Recipe: inputs scaled by one constant so that
the centred activations have mean squared norm d_in (folded back into the weights at the end, so the saved
SAE reads raw activations and its decoder rows stay unit-norm); b_dec initialised to the geometric median;
W_enc = W_dec^T at init; unit-norm decoder rows after every step, with the gradient component parallel to each
row removed; AuxK loss (the top-k_aux dead latents reconstruct the residual, coefficient 1/32); Adam; linear
warm-up and a linear decay over the last fifth of training.

Gradients are written by hand instead of autograd because only k of d_sae latents are active per token: the
decoder, the encoder gradient and the activation gradient are gathers and scatters over the k active latents,
so one step costs about one dense [B, d_in] x [d_in, d_sae] product plus the top-k.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from autointerp.subject.sae import SAE, SAEConfig

ProgressFn = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainReport:
    fvu: float
    """Fraction of variance unexplained on the held-out 5 % of tokens (raw activations)."""
    l0: float
    """Mean number of active latents per held-out token."""
    dead_fraction: float
    """Latents that fired neither on the held-out tokens nor in the last quarter of training."""
    n_tokens: int
    steps: int
    seconds: float


def default_lr(width: int) -> float:
    """2e-3 at 4096 latents, scaled by 1/sqrt(width) as in Gao et al.; tuned for short CPU runs (their 2e-4 at
    16k latents assumes millions of steps' worth of tokens)."""
    return 2e-3 / math.sqrt(width / 4096)


def _geometric_median(x: torch.Tensor, iters: int = 30) -> torch.Tensor:
    # Weiszfeld iterations; robust to the few huge-norm tokens that dominate a residual-stream mean.
    med = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - med).norm(dim=1).clamp_min(1e-8)
        med = (w[:, None] * x).sum(0) / w.sum()
    return med


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the two ops used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape)


def _gather_dot(rows: torch.Tensor, idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """out[n, j] = rows[idx[n, j]] . g[n]; `idx` sorted along dim 1 (a sampled dense-dense product)."""
    b, k = idx.shape
    pattern = _csr(torch.arange(0, b * k + 1, k), idx.reshape(-1), g.new_zeros(b * k), (b, rows.shape[0]))
    return torch.sparse.sampled_addmm(pattern, g, rows.T, beta=0.0).values().view(b, k)


@dataclass(frozen=True)
class _LatentMajor:
    """The [d_sae, B] transpose of the top-k pattern, to sum per-token vectors into per-latent rows."""

    crow: torch.Tensor
    col: torch.Tensor
    order: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def of(cls, idx: torch.Tensor, n_latents: int) -> _LatentMajor:
        flat = idx.reshape(-1)
        order = flat.int().argsort(stable=True)  # stable: deterministic; int32 sorts ~2x faster
        crow = torch.zeros(n_latents + 1, dtype=torch.long)
        crow[1:] = torch.bincount(flat, minlength=n_latents).cumsum(0)
        return cls(crow, order // idx.shape[1], order, (n_latents, idx.shape[0]))

    def scatter(self, coef: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """out[l] = sum over (n, j) with idx[n, j] == l of coef[n, j] * vec[n]."""
        mat = _csr(self.crow, self.col, coef.reshape(-1)[self.order], self.shape)
        return torch.sparse.mm(mat, vec)


def _lr_factor(step: int, steps: int) -> float:
    warm = max(1, min(100, steps // 20))
    decay_from = int(steps * 0.8)
    if step < warm:
        return (step + 1) / warm
    if step >= decay_from:
        return max(0.0, (steps - step) / max(1, steps - decay_from))
    return 1.0


def train_topk_sae(
    acts: torch.Tensor,
    *,
    width: int,
    k: int,
    site: str,
    model_name: str,
    steps: int | None = None,
    epochs: float = 8.0,
    batch_size: int = 4096,
    lr: float | None = None,
    seed: int = 0,
    aux_k: int | None = None,
    aux_coef: float = 1.0 / 32.0,
    dead_after_tokens: int | None = None,
    progress: ProgressFn | None = None,
) -> tuple[SAE, TrainReport]:
    """Train a TopK SAE on `acts` [N, d_in] (any float dtype, CPU); deterministic for a fixed seed.

    `steps` defaults to `epochs` passes over the 95 % training split. `aux_k` defaults to d_in // 2 (Gao
    et al.); a latent counts as dead for AuxK when it has not fired in the last `dead_after_tokens` training
    tokens (default: min(training tokens, 100k)). `progress(step, steps, loss)` is called after every step
    with the normalized reconstruction loss (≈ training FVU).
    """
    if acts.ndim != 2 or not acts.is_floating_point():
        raise ValueError(f"acts must be a 2-D float tensor [N, d_in], got {acts.dtype} {tuple(acts.shape)}")
    n_all, d_in = acts.shape
    if n_all < 40:
        raise ValueError(f"need at least 40 activation vectors to train and evaluate, got {n_all}")
    if not 0 < k <= width:
        raise ValueError(f"need 0 < k <= width, got k={k}, width={width}")
    if not bool(torch.isfinite(acts).all()):
        raise ValueError("acts contains non-finite values")
    t0 = time.perf_counter()
    acts = acts.cpu()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_all, generator=gen)
    n_eval = max(1, n_all // 20)
    eval_idx, train_idx = perm[:n_eval], perm[n_eval:]
    n_train = train_idx.numel()
    batch_size = min(batch_size, n_train)
    if steps is None:
        steps = max(1, math.ceil(epochs * n_train / batch_size))
    lr = default_lr(width) if lr is None else lr
    aux_k = d_in // 2 if aux_k is None else aux_k
    dead_after = min(n_train, 100_000) if dead_after_tokens is None else dead_after_tokens

    # One scale for all dims: centred inputs get mean squared norm d_in, so lr and init are unit-free.
    sample = acts[train_idx[:16384]].float()
    centred_sq = (sample - sample.mean(0)).pow(2).sum(1).mean().item()
    scale = math.sqrt(d_in / max(centred_sq, 1e-12))
    sample.mul_(scale)

    W_dec = torch.randn(width, d_in, generator=gen)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    enc = W_dec.clone()  # encoder rows: W_enc = enc.T
    b_enc = torch.zeros(width)
    b_dec = _geometric_median(sample[:8192])
    del sample
    params = [enc, b_enc, W_dec, b_dec]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=6.25e-10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))

    last_fired = torch.zeros(width, dtype=torch.long)
    fired_late = torch.zeros(width, dtype=torch.bool)
    late_from = int(steps * 0.75)
    tokens_seen = 0
    order = train_idx[torch.randperm(n_train, generator=gen)]
    cursor = 0
    for step in range(steps):
        if cursor + batch_size > n_train:  # new epoch: reshuffle, drop the ragged tail
            order = train_idx[torch.randperm(n_train, generator=gen)]
            cursor = 0
        x = acts[order[cursor : cursor + batch_size]].float().mul_(scale)
        cursor += batch_size
        bsz = x.shape[0]
        norm = 1.0 / (bsz * d_in)  # inputs are scaled so this makes the loss ≈ FVU

        xc = x - b_dec
        pre = torch.addmm(b_enc, xc, enc.T)
        vals, idx = pre.topk(k, dim=1, sorted=False)
        idx, perm = idx.sort(dim=1)  # CSR patterns want sorted columns per row
        vals = vals.gather(1, perm)
        act = vals.clamp_min(0)
        x_hat = F.embedding_bag(idx, W_dec, per_sample_weights=act, mode="sum").add_(b_dec)
        err = x_hat.sub_(x)
        loss = err.pow(2).sum().item() * norm

        g = err.mul_(2 * norm)  # dL/dx_hat; err is not needed after this
        pattern = _LatentMajor.of(idx, width)
        g_b_dec = g.sum(0)
        g_dec = pattern.scatter(act, g)
        g_pre = _gather_dot(W_dec, idx, g).mul_(vals > 0)
        g_enc = pattern.scatter(g_pre, xc)
        g_b_enc = torch.bincount(idx.reshape(-1), weights=g_pre.reshape(-1), minlength=width).to(g_pre.dtype)

        fired = torch.zeros(width, dtype=torch.bool)
        fired[idx[act > 0]] = True
        tokens_seen += bsz
        last_fired[fired] = tokens_seen
        if step >= late_from:
            fired_late |= fired

        dead = (tokens_seen - last_fired) >= dead_after
        n_dead = int(dead.sum())
        if n_dead and aux_k > 0 and aux_coef > 0:
            # AuxK on the dead sub-matrix, dense: cheaper than gathers once k_aux is in the hundreds.
            dead_idx = dead.nonzero().squeeze(1)
            kk = min(aux_k, n_dead)
            pre_dead = pre.index_select(1, dead_idx)
            v2, j2 = pre_dead.topk(kk, dim=1, sorted=False)
            a2 = torch.zeros_like(pre_dead).scatter_(1, j2, v2.clamp_min(0))
            dec_dead = W_dec.index_select(0, dead_idx)
            # Target: the main residual x - x_hat = -err; g currently holds 2*norm*err.
            e2 = torch.addmm(g, a2, dec_dead, beta=1 / (2 * norm))
            g2 = e2.mul_(2 * norm * aux_coef)
            g_dec.index_add_(0, dead_idx, a2.T @ g2)
            g_a2 = (g2 @ dec_dead.T).mul_(a2 > 0)
            g_enc.index_add_(0, dead_idx, g_a2.T @ xc)
            g_b_enc.index_add_(0, dead_idx, g_a2.sum(0))

        g_b_dec -= g_b_enc @ enc  # encoder path: xc = x - b_dec
        # Keep decoder rows on the unit sphere: drop the radial part of their gradient, renormalise after.
        g_dec -= (g_dec * W_dec).sum(1, keepdim=True) * W_dec
        for p, grad in zip(params, (g_enc, g_b_enc, g_dec, g_b_dec), strict=True):
            p.grad = grad
        opt.step()
        sched.step()
        W_dec /= W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if progress is not None:
            progress(step + 1, steps, loss)

    # Fold the input scale back: the pre-activations and feature activations come out in raw units.
    cfg = SAEConfig(
        d_in=d_in, d_sae=width, architecture="topk", k=k, apply_b_dec_to_input=True, site=site,
        model_name=model_name,
        raw={"trainer": "autointerp.topk", "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
             "aux_k": aux_k, "n_tokens": n_all, "input_scale": scale},
    )  # fmt: skip
    sae = SAE(
        cfg,
        W_enc=enc.T.contiguous(),
        b_enc=b_enc / scale,
        W_dec=W_dec.clone(),
        b_dec=b_dec / scale,
    )
    fvu, l0, fired_eval = _evaluate(sae, acts[eval_idx])
    dead_fraction = float((~(fired_eval | fired_late)).float().mean())
    report = TrainReport(
        fvu=fvu,
        l0=l0,
        dead_fraction=dead_fraction,
        n_tokens=n_all,
        steps=steps,
        seconds=time.perf_counter() - t0,
    )
    return sae, report


@torch.no_grad()
def _evaluate(sae: SAE, x_all: torch.Tensor, chunk: int = 4096) -> tuple[float, float, torch.Tensor]:
    x_all = x_all.float()
    mean = x_all.mean(0)
    sse = sst = 0.0
    active = 0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    for s in range(0, x_all.shape[0], chunk):
        x = x_all[s : s + chunk]
        z = sae.encode(x)
        x_hat = sae.decode(z)
        sse += (x - x_hat).pow(2).sum().item()
        sst += (x - mean).pow(2).sum().item()
        nz = z > 0
        active += int(nz.sum())
        fired |= nz.any(0)
    fvu = sse / sst if sst > 0 else float("nan")
    return fvu, active / x_all.shape[0], fired
