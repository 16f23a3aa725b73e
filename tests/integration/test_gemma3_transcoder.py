"""A Gemma Scope 2 transcoder on the real Gemma 3 270M (alias `gemma3-270m`, converted once from its GGUF as in
test_gemma3_gguf.py): a folder in the published layout (config.json with Hugging Face module paths, lowercase
params.safetensors) with random weights at the model's real width (d_model 640) at layer 6, collected and steered
through the CLI. Its hooks map through the gemma3_text table: it reads pre_feedforward_layernorm's output
(blocks.6.mlp.in) and writes post_feedforward_layernorm's output (blocks.6.mlp.out); the stored activations are the
published encoding of a hook on the first, and steering moves the second along the latent's decoder row."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from autointerp.cli import app

runner = CliRunner()
ALIAS = "gemma3-270m"
LAYER, D, D_SAE = 6, 640, 2048
READ, WRITE = f"blocks.{LAYER}.mlp.in", f"blocks.{LAYER}.mlp.out"


@pytest.fixture(scope="module")
def gemma() -> Any:
    from autointerp.subject.files import converted_dir, materialize, resolve
    from autointerp.subject.model import load_subject

    resolved = resolve(ALIAS)
    real = Path(os.environ.get("AUTOINTERP_HOME_REAL", Path.home() / ".cache" / "autointerp"))
    done, here = converted_dir(resolved, home=real), converted_dir(resolved)
    if (done / "config.json").exists() and not here.exists():  # the user's converted copy, as test_gemma3_gguf
        here.parent.mkdir(parents=True, exist_ok=True)
        here.symlink_to(done, target_is_directory=True)
    materialize(resolved)
    return load_subject(ALIAS)


def _params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)

    def f32(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return {
        "w_enc": f32(D, D_SAE, scale=D**-0.5),
        "w_dec": f32(D_SAE, D, scale=D_SAE**-0.5),
        "b_enc": f32(D_SAE, scale=0.1),
        "b_dec": f32(D, scale=0.1),
        "threshold": np.abs(f32(D_SAE, scale=1.0)),
        "affine_skip_connection": f32(D, D, scale=D**-0.5),
    }


def _transcoder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    save_file({k: torch.from_numpy(v) for k, v in _params().items()}, str(folder / "params.safetensors"))
    cfg = {"architecture": "jump_relu", "model_name": "gemma-3-270m", "width": D_SAE, "affine_connection": True,
           "hf_hook_point_in": f"model.layers.{LAYER}.pre_feedforward_layernorm.output",
           "hf_hook_point_out": f"model.layers.{LAYER}.post_feedforward_layernorm.output"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return folder


def _output(gemma: Any, module: torch.nn.Module, ids: torch.Tensor, *ivs: Any) -> torch.Tensor:
    """`module`'s output in a forward pass under `ivs` (the hook registered after theirs, so it sees the result)."""
    from autointerp.intervene.hooks import intervene

    seen: list[torch.Tensor] = []
    with torch.inference_mode(), intervene(gemma, *ivs):
        handle = module.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().float().clone()))
        try:
            gemma.model(ids)
        finally:
            handle.remove()
    return seen[0]


@pytest.mark.slow
def test_gemma_scope_2_transcoder_collected_and_steered_on_gemma3(
    tmp_path: Path, small_corpus: Path, gemma: Any
) -> None:
    from autointerp.config import load_config
    from autointerp.corpus import tokenize_corpus
    from autointerp.intervene.hooks import Intervention, load_target
    from autointerp.store import open_store
    from autointerp.store.queries import sae_path

    folder = _transcoder(tmp_path / "transcoder" / f"layer_{LAYER}_width_2k")
    db = f"sqlite:///{tmp_path}/db.sqlite"
    res = runner.invoke(app, ["collect", "--db", db, "--model", ALIAS, "--sae", str(folder), "--sites", "",
                              "--corpus", str(small_corpus), "--tokens", "256", "--batch-size", "8"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = json.loads(runner.invoke(app, ["features", "list", "--db", db, "--json", "--all"]).stdout)
    assert len(rows) == D_SAE and {r["site"] for r in rows} == {READ}
    rows.sort(key=lambda r: r["index"])

    # Every stored maximum is the published JumpReLU of pre_feedforward_layernorm's output at layer 6, by hand.
    cfg = load_config(None, {"corpus.source": str(small_corpus), "corpus.max_tokens": 256})
    corpus = tokenize_corpus(cfg.corpus.source, gemma.tokenizer, tokenizer_name=gemma.name,
                             bos_token_id=gemma.bos_token_id, ctx_len=cfg.corpus.ctx_len,
                             max_tokens=cfg.corpus.max_tokens, seed=cfg.corpus.seed)  # fmt: skip
    block = gemma.layout.blocks(gemma.model)[LAYER]
    x = _output(gemma, block.pre_feedforward_layernorm, torch.from_numpy(corpus.tokens))
    p = {k: torch.from_numpy(v) for k, v in _params().items()}
    pre = x[:, 1 + cfg.collect.skip_positions :] @ p["w_enc"] + p["b_enc"]
    want = (pre * (pre > p["threshold"])).amax(dim=(0, 1))
    assert int((want > 0).sum()) > D_SAE // 4
    got = torch.tensor([r["max"] for r in rows])
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))

    # Steer the strongest latent: `steer` (the CLI) changes the next-token distribution, and the intervention it
    # loads moves post_feedforward_layernorm's output by exactly alpha x the latent's unit decoder row.
    top = max(rows, key=lambda r: r["max"])
    res = runner.invoke(app, ["steer", top["id"], "--db", db, "--prompt", "The weather today is", "--strength",
                              "200", "--max-new-tokens", "3", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["kl"] > 0
    store = open_store(db)
    target = load_target(gemma, READ, top["source"], top["index"], sae_path(store, top["source"]))
    ids = gemma.tokenizer("The capital of France is Paris", return_tensors="pt").input_ids
    alpha, start = 200.0, 1
    before = _output(gemma, block.post_feedforward_layernorm, ids)
    after = _output(gemma, block.post_feedforward_layernorm, ids, Intervention.add(target, alpha, start=start))
    row = p["w_dec"][top["index"]]
    want_delta = (alpha * row / row.norm()).expand(ids.shape[1] - start, -1)
    torch.testing.assert_close(after[0, start:] - before[0, start:], want_delta, rtol=1e-3, atol=1e-3)
    assert torch.equal(after[0, :start], before[0, :start])
    store.engine.dispose()
