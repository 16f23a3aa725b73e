"""Intervention benchmark: what the causal check of one explained feature costs on the default model.

One run, on SmolLM2-135M with neurons of blocks.L.mlp.post and latents of a TopK SAE on blocks.L.resid.post (the
demo SAE under saes/ when `make demo` has trained it, else one trained here on a small slice; --quick without the
demo SAE: neurons only):
  1. collect a small corpus slice, explain a sample of features with the LLM-free token baseline;
  2. `intervene` them: calibrate to the target KL, direct effects, greedy baseline / steered continuations, the
     feature's activation on them, and the judge (the local SmolLM2 by default; `--judge fake` for a scripted one).
Reported per feature: forward passes (calibration evaluations, steered generation, the activation read, and the
baselines, which are shared by every feature of a run and amortized here), generated tokens, judge calls, and the
time split between the model part and the judge. Times are given as ratios to one batched forward pass over the
calibration prompts measured in the same run (the machines are shared and noisy).
Last line: forward_passes_per_feature=... judge_calls_per_feature=... (and the other figures)

    .venv/bin/python bench/intervene.py [--quick] [--features N] [--judge local|fake]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _sae(layer: int, work: Path, tokens: int) -> tuple[Path | None, str]:
    demo = ROOT / "saes" / f"smollm2-l{layer}-resid-4096"
    if (demo / "cfg.json").exists():
        return demo, "demo SAE (4096 latents)"
    if tokens == 0:
        return None, "none (neurons only; `make demo` trains the demo SAE)"
    from autointerp.collect.train_sae import run_sae_train
    from autointerp.config import RunConfig
    from autointerp.store import open_store

    out = work / "sae"
    cfg = RunConfig.model_validate(
        {
            "db": f"sqlite:///{work}/sae.sqlite",
            "sae_train": {"site": f"blocks.{layer}.resid.post", "width": 1024, "k": 16, "tokens": tokens, "epochs": 2},
        }
    )
    res = run_sae_train(cfg, open_store(cfg.db), out)
    return out, f"trained here (1024 latents, {tokens} tokens, FVU {res.report.fvu:.2f})"


def _bare_forward(subject: Any, repeats: int = 7) -> float:
    """Median seconds of one batched forward pass over the calibration prompts (the unit of the ratios)."""
    from autointerp.intervene.hooks import NEUTRAL_PROMPTS
    from autointerp.intervene.steer import next_token_logprobs

    next_token_logprobs(subject, NEUTRAL_PROMPTS)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        next_token_logprobs(subject, NEUTRAL_PROMPTS)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="few features, small slice (about two minutes)")
    ap.add_argument("--features", type=int, default=None, help="features verified (default 4 quick, 12 full)")
    ap.add_argument("--judge", choices=["local", "fake"], default="local", help="judge LLM (fake: scripted)")
    ap.add_argument("--layer", type=int, default=12)
    args = ap.parse_args()
    n_features = args.features or (4 if args.quick else 12)
    tokens = 6_000 if args.quick else 50_000

    from autointerp.collect.run import run_collect
    from autointerp.config import RunConfig
    from autointerp.explain.run import build_explainer, run_explain
    from autointerp.intervene.measure import Measurer
    from autointerp.intervene.run import run_intervene
    from autointerp.jobs import make_client
    from autointerp.store import open_store
    from autointerp.store.tables import InterventionRow

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        sae, sae_note = _sae(args.layer, work, 0 if args.quick else 60_000)
        cfg = RunConfig.model_validate(
            {
                "db": f"sqlite:///{work}/bench.sqlite",
                "corpus": {"max_tokens": tokens},
                "collect": {
                    "sites": [f"blocks.{args.layer}.mlp.post"],
                    "saes": [] if sae is None else [{"path": str(sae)}],
                },
                "explain": {"explainer": "tokens", "features": "sample", "limit": n_features},
                "intervene": {"llm": "judge", "limit": n_features},
                "llm": {"judge": {"backend": args.judge, "model": "smollm2-135m-instruct"}},
            }
        )
        store = open_store(cfg.db)
        run_collect(cfg, store)
        run_explain(cfg, store, explainer=build_explainer(cfg, store))
        setup_s = time.perf_counter() - t0
        print(f"setup: SAE {sae_note}; collected {tokens} tokens, explained {n_features} features ({setup_s:.0f}s)")

        client = make_client(cfg, store, "judge", stage="intervene")
        judge_s = [0.0]
        chat_many = client.chat_many

        def timed(reqs: Any) -> Any:
            t = time.perf_counter()
            try:
                return chat_many(reqs)
            finally:
                judge_s[0] += time.perf_counter() - t

        client.chat_many = timed  # type: ignore[method-assign]
        measurer = Measurer(cfg, store)
        t = time.perf_counter()
        res = run_intervene(cfg, store, client=client, measurer=measurer)
        total_s = time.perf_counter() - t
        again = run_intervene(cfg, store, client=make_client(cfg, store, "judge", stage="intervene"))
        subject = measurer.subject(next(iter(measurer._subjects)))
        fwd_s = _bare_forward(subject)

        with store.session() as s:
            from sqlmodel import select

            rows = [r for r in s.exec(select(InterventionRow)).all() if r.status == "ok"]
        n = len(rows)
        if n == 0:
            raise SystemExit("no feature was verified")
        evals = [len(r.config.get("trace", [])) for r in rows]
        measure_s = sum(r.seconds for r in rows)
        fwd = res.forward_passes / n
        gen = res.generated_tokens / n
        calls = res.judge_calls / n
        print(
            f"{n} features ({res.explanations} explanations), judge {client.name}: verdicts {res.verdicts}; "
            f"{sum(r.converged for r in rows)}/{n} calibrations reached KL {cfg.intervene.target_kl} "
            f"(median {statistics.median(evals):.0f} evaluations)"
        )
        print(
            f"per feature: {fwd:.1f} forward passes ({statistics.mean(evals) + 1:.1f} batched calibration passes), "
            f"{gen:.1f} generated tokens, {calls:.1f} judge calls"
        )
        print(
            f"time per feature: model part {measure_s / n:.2f}s = {measure_s / n / fwd_s:.0f} x a batched forward "
            f"({fwd_s * 1000:.0f} ms); judge {judge_s[0] / n:.2f}s; total {total_s / n:.2f}s"
        )
        print(f"rerun: {again.judge_calls} judge calls, {again.forward_passes} forward passes, {again.seconds:.1f}s")
        print(
            f"forward_passes_per_feature={fwd:.1f} judge_calls_per_feature={calls:.1f} "
            f"generated_tokens_per_feature={gen:.1f} calibration_evals_per_feature={statistics.mean(evals):.1f} "
            f"model_x_forward={measure_s / n / fwd_s:.0f} judge_share={judge_s[0] / total_s:.2f} "
            f"rerun_judge_calls={again.judge_calls}"
        )


if __name__ == "__main__":
    main()
