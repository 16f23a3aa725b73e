"""Peer benchmark: EleutherAI delphi (eai-delphi 0.1.3) activation collection on CPU.

Run with the venv made by bench/setup_delphi.sh:

    bench/.venv-delphi/bin/python bench/delphi_worker.py --model-dir DIR \
        --tokens TOKENS.npy --layer L --sae-dir SAE_DIR --batch-size B [--n-tokens N]

Collects, the delphi way, what our collector collects for one layer L:
  * the MLP neurons of layer L (input of model.model.layers[L].mlp.down_proj, i.e.
    act(gate) * up), as a dense identity "encoder";
  * the TopK SAE latents on layer L's residual output (output of model.model.layers[L]).

Delphi's LatentCache has one global `transcode` flag: all hookpoints capture either the
module *input* (transcode=True) or its *output*. In the default --mode single we use one
LatentCache with transcode=True, hooking the input of `model.layers.L.mlp.down_proj`
(neurons) and the input of `model.layers.{L+1}` (== output of layer L; `model.norm` for
the last layer), so one forward pass serves both, as in our collector. --mode two-pass
instead runs delphi the textbook way: one cache with transcode=False on `model.layers.L`
and a second with transcode=True on `model.layers.L.mlp.down_proj` (two forward passes).

Then (unless --no-examples) delphi's own example-building step: LatentCache.save_splits
+ save_config to a temp dir, then LatentDataset (constructor: max-activation windows and
random non-activating windows; sampler: top quantile train/test sets with decoded tokens)
iterated over every latent of both hookpoints.

The last stdout line is a JSON object with the measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

try:
    import delphi
    import numpy as np
    import torch
    from delphi.config import CacheConfig, ConstructorConfig, SamplerConfig
    from delphi.latents import LatentCache, LatentDataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
except ImportError as exc:  # pragma: no cover - environment guard
    venv = Path(__file__).resolve().parent / ".venv-delphi"
    sys.exit(
        f"delphi_worker: cannot import delphi stack ({exc}).\n"
        f"Create the venv with `bash {Path(__file__).resolve().parent}/setup_delphi.sh` "
        f"and run this script with {venv}/bin/python."
    )


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def load_topk_sae(sae_dir: Path, dtype: torch.dtype):
    """SAELens-format TopK SAE -> encode fn [B, S, d_in] -> dense [B, S, d_sae]."""
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    w = load_file(str(sae_dir / "sae_weights.safetensors"))
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if k is None:
        raise SystemExit(f"delphi_worker: no TopK 'k' in {sae_dir / 'cfg.json'}")
    k = int(k)
    W_enc, b_enc = w["W_enc"].to(dtype), w["b_enc"].to(dtype)
    b_dec = w["b_dec"].to(dtype)
    d_in, d_sae = W_enc.shape
    if (cfg.get("d_in", d_in), cfg.get("d_sae", d_sae)) != (d_in, d_sae):
        raise SystemExit(f"delphi_worker: W_enc shape {tuple(W_enc.shape)} != cfg d_in/d_sae")
    sub_b_dec = bool(cfg.get("apply_b_dec_to_input", False))

    def encode(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype)
        if sub_b_dec:
            x = x - b_dec
        pre = x @ W_enc + b_enc
        top = pre.topk(k, dim=-1)
        out = torch.zeros_like(pre)
        return out.scatter_(-1, top.indices, top.values.relu())

    return encode, d_in, d_sae, k


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def save_splits_per_hookpoint(cache, widths, n_splits, save_dir, cfg, model_name) -> None:
    """LatentCache.save_splits + save_config, one hookpoint at a time.

    LatentCache keeps a single `width` (taken from the first hookpoint it saw) and splits
    every hookpoint by it, which would silently drop SAE latents >= 1536 when neurons
    and SAE latents share a cache. Saving each hookpoint with its own width avoids that.
    """
    all_locs = cache.cache.latent_locations
    try:
        for hp, locs in all_locs.items():
            cache.width = widths[hp]
            cache.cache.latent_locations = {hp: locs}
            cache.save_splits(n_splits=n_splits, save_dir=save_dir)
            cache.save_config(save_dir=save_dir, cfg=cfg, model_name=model_name)
    finally:
        cache.cache.latent_locations = all_locs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--tokens", required=True, type=Path, help=".npy int [n_ctx, ctx_len]")
    ap.add_argument("--layer", required=True, type=int)
    ap.add_argument("--sae-dir", required=True, type=Path)
    ap.add_argument("--batch-size", required=True, type=int)
    ap.add_argument(
        "--n-tokens",
        type=int,
        default=None,
        help="tokens to process (default: all); delphi drops a partial last batch",
    )
    ap.add_argument("--mode", choices=["single", "two-pass"], default="single")
    ap.add_argument("--no-examples", action="store_true", help="skip save_splits+LatentDataset")
    ap.add_argument("--example-ctx-len", type=int, default=32, help="delphi default 32")
    ap.add_argument(
        "--min-examples",
        type=int,
        default=1,
        help="delphi default is 200; 1 so small runs still build every record",
    )
    ap.add_argument("--n-splits", type=int, default=CacheConfig().n_splits)
    ap.add_argument("--threads", type=int, default=None, help="default: torch's default")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    n_layers = model.config.num_hidden_layers
    L = args.layer
    if not 0 <= L < n_layers:
        raise SystemExit(f"delphi_worker: --layer {L} out of range (model has {n_layers})")
    tokens = torch.from_numpy(np.load(args.tokens).astype(np.int64))
    if tokens.ndim != 2:
        raise SystemExit(f"delphi_worker: tokens must be 2-D, got {tuple(tokens.shape)}")
    n_tokens = args.n_tokens if args.n_tokens is not None else tokens.numel()
    n_ctx = min(n_tokens // tokens.shape[1], tokens.shape[0])
    if n_ctx // args.batch_size < 1:
        raise SystemExit(
            f"delphi_worker: LatentCache only runs whole batches; {n_ctx} contexts < --batch-size {args.batch_size}"
        )
    sae_encode, d_in, d_sae, k = load_topk_sae(args.sae_dir, torch.float32)
    if d_in != model.config.hidden_size:
        raise SystemExit(f"delphi_worker: SAE d_in {d_in} != hidden {model.config.hidden_size}")

    # Hookpoints are full names from model.named_modules() (exact string match).
    neuron_hp = f"model.layers.{L}.mlp.down_proj"
    if args.mode == "single":
        resid_hp = f"model.layers.{L + 1}" if n_layers > L + 1 else "model.norm"
        plans = [(True, {neuron_hp: identity, resid_hp: sae_encode})]
    else:
        resid_hp = f"model.layers.{L}"
        plans = [(False, {resid_hp: sae_encode}), (True, {neuron_hp: identity})]
    names = dict(model.named_modules())
    for _, hp_map in plans:
        for hp in hp_map:
            if hp not in names:
                raise SystemExit(f"delphi_worker: hookpoint {hp!r} not in model.named_modules()")

    rss_before = rss_mb()
    load_before = os.getloadavg()[0]
    caches: list[LatentCache] = []
    t0 = time.perf_counter()
    for transcode, hp_map in plans:
        cache = LatentCache(model, hp_map, batch_size=args.batch_size, transcode=transcode)
        with torch.inference_mode():
            cache.run(n_tokens, tokens)
        caches.append(cache)
    cache_seconds = time.perf_counter() - t0

    first = caches[0].cache
    processed = int(next(iter(first.tokens.values())).numel())
    stored = {
        ("sae" if hp == resid_hp else "neurons"): int(c.cache.latent_activations[hp].numel())
        for c in caches
        for hp in c.cache.latent_activations
    }

    examples_seconds = save_seconds = None
    n_records = None
    if not args.no_examples:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        cache_cfg = CacheConfig(
            batch_size=args.batch_size,
            cache_ctx_len=tokens.shape[1],
            n_tokens=n_tokens,
            n_splits=args.n_splits,
        )
        constructor_cfg = ConstructorConfig(example_ctx_len=args.example_ctx_len, min_examples=args.min_examples)
        with tempfile.TemporaryDirectory(prefix="delphi-latents-") as tmp:
            raw = Path(tmp)
            t1 = time.perf_counter()
            widths = {neuron_hp: model.config.intermediate_size, resid_hp: d_sae}
            for c in caches:
                save_splits_per_hookpoint(c, widths, args.n_splits, raw, cache_cfg, str(args.model_dir))
            save_seconds = time.perf_counter() - t1
            dataset = LatentDataset(
                raw, SamplerConfig(), constructor_cfg, tokenizer=tokenizer, modules=[neuron_hp, resid_hp]
            )
            n_records = sum(1 for _ in dataset)
            examples_seconds = time.perf_counter() - t1

    total = cache_seconds + (examples_seconds or 0.0)
    result = {
        "tokens": processed,
        "seconds": round(total, 4),
        "tok_s": round(processed / total, 2),
        "cache_seconds": round(cache_seconds, 4),
        "cache_tok_s": round(processed / cache_seconds, 2),
        "examples_seconds": None if examples_seconds is None else round(examples_seconds, 4),
        "save_splits_seconds": None if save_seconds is None else round(save_seconds, 4),
        "n_records": n_records,
        "stored_activations": stored,
        "peak_rss_mb": round(rss_mb(), 1),
        "rss_before_collection_mb": round(rss_before, 1),
        "mode": args.mode,
        "hookpoints": {"neurons": neuron_hp, "sae": resid_hp},
        "transcode": [t for t, _ in plans],
        "sae": {"d_in": d_in, "d_sae": d_sae, "k": k},
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        # 1-min load average before/after: >> threads means other processes competed for CPU
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "delphi_version": delphi.__version__,
        "torch_version": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
