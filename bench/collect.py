"""Collector benchmark: bare forward vs our collector vs EleutherAI delphi, and memory growth with corpus size.

Measured side by side in one run, on the same model (SmolLM2-135M), corpus slice (SOTU) and batch size:
  forward    the same layers the collector runs (0..L), no hooks, no recording: the ceiling
  collector  neurons of blocks.L.mlp.post + a 4096-latent TopK SAE on blocks.L.resid.post, end to end
             (sampling, statistics and database writes included; model load and tokenization excluded)
  transcoder a 4096-latent JumpReLU skip transcoder reading blocks.L.mlp.in and writing blocks.L.mlp.out, alone
  CLT        the layer-L part of a circuit-tracer cross-layer transcoder (4096 latents writing layers L..end), alone
  delphi     the same collection by eai-delphi's LatentCache + example construction (own venv, bench/setup_delphi.sh)
  RSS        peak resident memory of a whole collect process at N and 8N tokens (separate processes)
The collector is reported end to end (ratio_vs_forward) and for its streaming pass alone (streaming_ratio: what
a long collection converges to, since the final writes cost a fixed ~10 s whatever the corpus size).
delphi runs on a smaller slice than the forward comparison (it holds every activation in memory), and is
compared with our collector on that same slice.
Forward and collector passes alternate and the median of each is reported, to damp noise on a shared machine.
transcoder_ratio and clt_ratio: the streaming pass of a collection of that source alone / the bare forward (the
fixed final writes excluded, as streaming_ratio); target >= 0.9.
Last line: ratio_vs_forward=... ratio_vs_delphi=... rss_growth=... transcoder_ratio=... clt_ratio=...

    .venv/bin/python bench/collect.py [--quick] [--no-delphi]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _sae_dir(layer: int, d_in: int, workdir: Path) -> tuple[Path, str]:
    trained = ROOT / "saes" / f"smollm2-l{layer}-resid-4096"
    if (trained / "cfg.json").exists():
        return trained, "trained"
    from autointerp.subject.sae import SAE, SAEConfig, save_sae

    g = torch.Generator().manual_seed(0)
    cfg = SAEConfig(d_in=d_in, d_sae=4096, architecture="topk", k=32, site=f"blocks.{layer}.resid.post")
    w = torch.randn(4096, d_in, generator=g)
    w = w / w.norm(dim=1, keepdim=True)
    sae = SAE(cfg, W_enc=w.T.contiguous(), b_enc=torch.zeros(4096), W_dec=w, b_dec=torch.zeros(d_in))
    return save_sae(sae, workdir / "random-sae"), "random"


def _transcoder_dir(layer: int, d: int, workdir: Path) -> Path:
    """A random JumpReLU skip transcoder at layer `layer`'s MLP (SAELens layout, as save_sae writes it)."""
    from autointerp.subject.sae import SAE, SAEConfig, save_sae

    g = torch.Generator().manual_seed(1)
    cfg = SAEConfig(
        d_in=d, d_sae=4096, architecture="jumprelu", apply_b_dec_to_input=False, site=f"blocks.{layer}.mlp.in",
        write_sites=(f"blocks.{layer}.mlp.out",), skip=True,
    )  # fmt: skip
    w = torch.randn(4096, d, generator=g)
    w = w / w.norm(dim=1, keepdim=True)
    tc = SAE(cfg, W_enc=w.T.contiguous(), b_enc=torch.zeros(4096), W_dec=w, b_dec=torch.zeros(d),
             threshold=torch.full((4096,), 0.5), W_skip=torch.zeros(d, d))  # fmt: skip
    return save_sae(tc, workdir / "transcoder")


def _clt_dir(layer: int, n_layers: int, d: int, workdir: Path) -> Path:
    """A random circuit-tracer CLT folder whose layer-`layer` part has 4096 latents writing every later layer. The
    other layers' files are 1-latent placeholders: collecting the part that reads blocks.L.mlp.in loads only its
    own files (and they keep the folder small)."""
    from safetensors.torch import save_file

    root = workdir / "clt"
    root.mkdir()
    (root / "config.yaml").write_text("feature_input_hook: ln2.hook_normalized\nfeature_output_hook: hook_mlp_out\n")
    g = torch.Generator().manual_seed(2)
    for i in range(n_layers):
        n = 4096 if i == layer else 1
        w = torch.randn(n, d, generator=g)
        w = w / w.norm(dim=1, keepdim=True)
        enc = {f"W_enc_{i}": w, f"b_enc_{i}": torch.full((n,), -0.5), f"b_dec_{i}": torch.zeros(d)}
        save_file(enc, str(root / f"W_enc_{i}.safetensors"))
        dec = torch.randn(n, n_layers - i, d, generator=g) / d**0.5
        save_file({f"W_dec_{i}": dec}, str(root / f"W_dec_{i}.safetensors"))
    return root


def _cfg(  # type: ignore[no-untyped-def]
    db: str, tokens: int, layer: int, sae: Path, batch: int, *, neurons: bool = True, site: str | None = None
):
    from autointerp.config import RunConfig

    return RunConfig.model_validate(
        {
            "db": db,
            "corpus": {"max_tokens": tokens},
            "collect": {
                "sites": [f"blocks.{layer}.mlp.post"] if neurons else [],
                "saes": [{"path": str(sae), "site": site}],
                "batch_size": batch,
            },
        }
    )


def bare_forward(subject, tokens: torch.Tensor, layer: int, batch: int) -> float:  # type: ignore[no-untyped-def]
    from autointerp.subject.sites import base_model

    base = base_model(subject.model)
    blocks = subject.layout.blocks(subject.model)
    full = list(blocks)
    # Same layers as the collector (0..layer); the LM head and later blocks are never run by either.
    subject.model.model.layers = torch.nn.ModuleList(full[: layer + 1])
    try:
        t = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(tokens), batch):
                base(input_ids=tokens[i : i + batch], use_cache=False)
        return tokens.numel() / (time.perf_counter() - t)
    finally:
        subject.model.model.layers = torch.nn.ModuleList(full)


def collector(subject, corpus, cfg) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(end-to-end tok/s including database writes, tok/s of the streaming pass alone)."""
    from autointerp.collect.run import run_collect
    from autointerp.store import open_store

    t = time.perf_counter()
    summary = run_collect(cfg, open_store(cfg.db), subject=subject, corpus=corpus)
    return corpus.n_tokens / (time.perf_counter() - t), summary.tokens_per_second


def rss_child(tokens: int, layer: int, sae: Path, batch: int, workdir: Path) -> float:
    """Peak RSS (MB) of a fresh process that loads the model and collects `tokens` tokens."""
    code = f"""
import resource
from autointerp.collect.run import run_collect
from autointerp.store import open_store
from bench.collect import _cfg
cfg = _cfg("sqlite:///{workdir}/rss-{tokens}.sqlite", {tokens}, {layer}, __import__("pathlib").Path("{sae}"), {batch})
run_collect(cfg, open_store(cfg.db))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def delphi(tokens_npy: Path, model_dir: Path, layer: int, sae: Path, batch: int) -> dict | None:
    py = HERE / ".venv-delphi" / "bin" / "python"
    setup = subprocess.run(["bash", str(HERE / "setup_delphi.sh")], capture_output=True, text=True)
    if setup.returncode != 0 or not py.exists():
        print(f"delphi: setup failed, skipped\n{setup.stderr[-2000:]}")
        return None
    cmd = [
        str(py),
        str(HERE / "delphi_worker.py"),
        "--model-dir",
        str(model_dir),
        "--tokens",
        str(tokens_npy),
        "--layer",
        str(layer),
        "--sae-dir",
        str(sae),
        "--batch-size",
        str(batch),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"delphi: worker failed\n{out.stderr[-2000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small slices, one repeat (about two minutes)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per forward/collector pass (N)")
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-delphi", action="store_true")
    ap.add_argument("--no-rss", action="store_true")
    args = ap.parse_args()
    n = args.tokens or (16_384 if args.quick else 131_072)
    # delphi keeps every non-zero activation in memory (8 GB at 65k tokens here): compare at a slice it survives.
    n_delphi = min(n, 8_192 if args.quick else 32_768)
    n_rss = 8_192 if args.quick else 32_768
    repeats = args.repeats or (1 if args.quick else 2)
    sys.path.insert(0, str(ROOT))

    from autointerp.corpus import tokenize_corpus
    from autointerp.subject.files import materialize, resolve
    from autointerp.subject.model import load_subject

    subject = load_subject()
    work = Path(tempfile.mkdtemp(prefix="bench-collect-"))
    sae, sae_kind = _sae_dir(args.layer, subject.d_model, work)

    def slice_of(tokens: int):  # type: ignore[no-untyped-def]
        return tokenize_corpus(
            "sotu",
            subject.tokenizer,
            tokenizer_name=subject.name,
            bos_token_id=subject.bos_token_id,
            ctx_len=64,
            max_tokens=tokens,
            seed=0,
        )

    corpus = slice_of(n)
    tokens = torch.from_numpy(corpus.tokens)
    print(
        f"model={subject.name} layer={args.layer} tokens={corpus.n_tokens} batch={args.batch_size} "
        f"sae={sae_kind} threads={torch.get_num_threads()} load={os.getloadavg()[0]:.1f}"
    )

    bare_forward(subject, tokens[: args.batch_size], args.layer, args.batch_size)  # warm-up
    fwd, col, stream = [], [], []
    for r in range(repeats):
        fwd.append(bare_forward(subject, tokens, args.layer, args.batch_size))
        cfg = _cfg(f"sqlite:///{work}/c{r}.sqlite", n, args.layer, sae, args.batch_size)
        tok_s, loop_tok_s = collector(subject, corpus, cfg)
        col.append(tok_s)
        stream.append(loop_tok_s)
        print(
            f"repeat {r}: forward {fwd[-1]:.0f} tok/s, collector {col[-1]:.0f} tok/s end to end "
            f"({stream[-1]:.0f} tok/s in the streaming pass)"
        )
    f_med, c_med, s_med = statistics.median(fwd), statistics.median(col), statistics.median(stream)
    ratio_fwd, ratio_stream = c_med / f_med, s_med / f_med
    print(
        f"forward_tok_s={f_med:.0f} collector_tok_s={c_med:.0f} ratio={ratio_fwd:.3f} "
        f"streaming_ratio={ratio_stream:.3f}"
    )

    # Transcoders: each source collected alone, at its read site blocks.L.mlp.in, against the same bare forward.
    d_model, n_layers = subject.d_model, subject.n_layers
    tc_sources = {
        "transcoder": (_transcoder_dir(args.layer, d_model, work), None),
        "clt": (_clt_dir(args.layer, n_layers, d_model, work), f"blocks.{args.layer}.mlp.in"),
    }
    tc_ratio: dict[str, float] = {}
    for name, (path, site) in tc_sources.items():
        fw, st = [], []
        for r in range(repeats):
            fw.append(bare_forward(subject, tokens, args.layer, args.batch_size))
            tcfg = _cfg(f"sqlite:///{work}/{name}{r}.sqlite", n, args.layer, path, args.batch_size, neurons=False,
                        site=site)  # fmt: skip
            st.append(collector(subject, corpus, tcfg)[1])
            print(f"repeat {r}: forward {fw[-1]:.0f} tok/s, {name} {st[-1]:.0f} tok/s in the streaming pass")
        tc_ratio[name] = statistics.median(st) / statistics.median(fw)
        print(f"{name}_ratio={tc_ratio[name]:.3f}")

    ratio_delphi = float("nan")
    if not args.no_delphi:
        small = slice_of(n_delphi)
        npy = work / "tokens.npy"
        np.save(npy, small.tokens)
        d = delphi(npy, materialize(resolve("smollm2-135m-instruct")), args.layer, sae, args.batch_size)
        ours, _ = collector(
            subject, small, _cfg(f"sqlite:///{work}/d.sqlite", n_delphi, args.layer, sae, args.batch_size)
        )
        if d:
            ratio_delphi = ours / d["tok_s"]
            print(
                f"at {small.n_tokens} tokens: autointerp {ours:.0f} tok/s, delphi {d['tok_s']:.0f} tok/s "
                f"(cache {d.get('cache_seconds')}s, examples {d.get('examples_seconds')}s, "
                f"peak RSS {d.get('peak_rss_mb')} MB) ratio_vs_delphi={ratio_delphi:.2f}"
            )

    growth = float("nan")
    if not args.no_rss:
        r1 = rss_child(n_rss, args.layer, sae, args.batch_size, work)
        r8 = rss_child(8 * n_rss, args.layer, sae, args.batch_size, work)
        growth = r8 / r1 - 1
        print(f"peak_rss_mb N={n_rss}: {r1:.0f}  8N={8 * n_rss}: {r8:.0f}  growth={growth:.1%}")
    print(
        f"ratio_vs_forward={ratio_fwd:.3f} ratio_vs_delphi={ratio_delphi:.2f} rss_growth={growth:.3f} "
        f"streaming_ratio={ratio_stream:.3f} forward_tok_s={f_med:.0f} collector_tok_s={c_med:.0f} tokens={n} "
        f"transcoder_ratio={tc_ratio['transcoder']:.3f} clt_ratio={tc_ratio['clt']:.3f}"
    )


if __name__ == "__main__":
    main()
