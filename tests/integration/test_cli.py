"""End to end through the command line on a tiny random GPT-2: collect, list, show (JSON contract), SAE training,
and a collect killed with SIGKILL or stopped with Ctrl-C mid-run that a rerun resumes to the same database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from autointerp.cli import app

runner = CliRunner()


def _write_config(
    tmp: Path, corpus: Path, model: Path, sae: Path | None = None, max_tokens: int = 2000, **collect: Any
) -> Path:
    saes = f'saes = [{{ path = "{sae}" }}]' if sae else ""
    extra = "\n".join(f"{k} = {json.dumps(v)}" for k, v in collect.items())
    cfg = tmp / "cfg.toml"
    cfg.write_text(
        f"""db = "sqlite:///{tmp}/db.sqlite"
[model]
name = "{model}"
[corpus]
source = "{corpus}"
ctx_len = 16
max_tokens = {max_tokens}
[collect]
sites = ["blocks.1.mlp.post"]
batch_size = 4
top_k = 6
n_quantiles = 3
per_quantile = 2
n_random = 3
{saes}
{extra}
[sae_train]
site = "blocks.2.resid.post"
width = 96
k = 4
tokens = 1500
epochs = 2
batch_size = 256
"""
    )
    return cfg


def test_collect_list_show_json_contract(tmp_path: Path, small_corpus: Path, tiny_gpt2_dir: Path) -> None:
    cfg = _write_config(tmp_path, small_corpus, tiny_gpt2_dir)
    sae_dir = tmp_path / "sae"
    res = runner.invoke(app, ["sae", "train", "--config", str(cfg), "--out", str(sae_dir)])
    assert res.exit_code == 0, res.output
    assert (sae_dir / "cfg.json").exists() and "FVU=" in res.output
    res = runner.invoke(app, ["collect", "--config", str(cfg), "--sae", str(sae_dir)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["features", "list", "--config", str(cfg), "--json", "--all"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert len(rows) == 128 + 96  # every neuron of the site and every SAE latent, dead ones included
    for key in ("id", "site", "source", "index", "max", "density"):
        assert key in rows[0]
    assert {r["source"] for r in rows} >= {"neurons"}
    assert {r["site"] for r in rows} == {"blocks.1.mlp.post", "blocks.2.resid.post"}
    sae_rows = [r for r in rows if r["source"] != "neurons"]
    res = runner.invoke(app, ["features", "list", "--config", str(cfg), "--json", "--source", sae_rows[0]["source"]])
    assert {r["source"] for r in json.loads(res.stdout)} == {sae_rows[0]["source"]}
    res = runner.invoke(app, ["features", "show", rows[0]["id"], "--config", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    detail = json.loads(res.stdout)
    assert detail["id"] == rows[0]["id"]
    assert detail["records"], "a live feature has records"
    for rec in detail["records"]:
        assert rec["role"] in ("top", "quantile", "random") and rec["split"] in ("train", "test")
        assert len(rec["tokens"]) == len(rec["acts"]) == 14  # ctx_len 16 minus BOS and the skipped first token
        assert all(isinstance(t, str) for t in rec["tokens"])
    res = runner.invoke(app, ["features", "show", rows[0]["id"], "--config", str(cfg)])
    assert res.exit_code == 0 and "top #0" in res.output
    res = runner.invoke(app, ["features", "show", "nope/1", "--config", str(cfg)])
    assert res.exit_code != 0


def _dump(db: Path) -> list[Any]:
    import sqlite3

    con = sqlite3.connect(db)
    try:
        feats = con.execute(
            "select key, status, max_act, mean_act, density, histogram from feature order by key"
        ).fetchall()
        recs = con.execute(
            "select f.key, c.idx, r.role, r.split, r.rank, r.bin, r.max_act, r.acts from record r "
            "join feature f on f.id = r.feature_id join context c on c.id = r.context_id order by 1, 2"
        ).fetchall()
    finally:
        con.close()
    return [feats, recs]


@pytest.fixture(scope="module")
def long_collection(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path) -> tuple[Path, Path, list[Any]]:
    """A corpus large enough (~1,900 batches) that a signal sent after the first checkpoint always lands long before
    the run ends; the config of its uninterrupted collection; and that database's dump."""
    root = tmp_path_factory.mktemp("long")
    corpus = root / "big"
    corpus.mkdir()
    for i in range(120):
        (corpus / f"d{i}.txt").write_text(f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(600)))
    ref_dir = root / "ref"
    ref_dir.mkdir()
    ref = _write_config(ref_dir, corpus, tiny_gpt2_dir, max_tokens=120_000, checkpoint_tokens=640)
    subprocess.run([*_COLLECT, str(ref)], check=True, capture_output=True, env=_ENV)
    return corpus, ref, _dump(ref_dir / "db.sqlite")


_COLLECT = [sys.executable, "-m", "autointerp.cli", "collect", "--config"]
_ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def _start_and_signal(cfg: Path, sig: signal.Signals) -> subprocess.Popen[str]:
    """Start a collect, wait for its first checkpoint, send `sig`, and wait for the process to end."""
    proc = subprocess.Popen(
        [*_COLLECT, str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_ENV
    )
    ckpts = cfg.parent / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(ckpts.glob("*.pt")):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before a checkpoint was written"
    time.sleep(0.1)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


def _run_row(db: Path) -> tuple[str, str | None, dict[str, Any], int]:
    import sqlite3

    con = sqlite3.connect(db)
    try:
        status, error, counts, progress = con.execute("select status, error, counts, progress from run").fetchone()
    finally:
        con.close()
    return status, error, json.loads(counts), progress


def test_kill_9_then_rerun_equals_uninterrupted(
    tmp_path: Path, tiny_gpt2_dir: Path, long_collection: tuple[Path, Path, list[Any]]
) -> None:
    corpus, _, reference = long_collection
    cut = _write_config(tmp_path, corpus, tiny_gpt2_dir, max_tokens=120_000, checkpoint_tokens=640)
    proc = _start_and_signal(cut, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    assert any((tmp_path / "checkpoints").glob("*.pt")), "no checkpoint to resume from"
    _, _, _, saved = _run_row(tmp_path / "db.sqlite")
    done = subprocess.run([*_COLLECT, str(cut)], capture_output=True, text=True, env=_ENV)
    assert done.returncode == 0, done.stderr
    status, error, counts, _ = _run_row(tmp_path / "db.sqlite")
    # It resumed (from the checkpoint on disk: at or after the one the run row had recorded), not started over.
    assert status == "done" and error is None and counts["resumed_at_batch"] >= max(saved, 1), counts
    assert _dump(tmp_path / "db.sqlite") == reference


def test_ctrl_c_exits_130_marks_the_run_interrupted_and_a_rerun_resumes(
    tmp_path: Path, tiny_gpt2_dir: Path, long_collection: tuple[Path, Path, list[Any]]
) -> None:
    corpus, _, reference = long_collection
    cut = _write_config(tmp_path, corpus, tiny_gpt2_dir, max_tokens=120_000, checkpoint_tokens=640)
    proc = _start_and_signal(cut, signal.SIGINT)
    stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if "interrupted" in line]
    assert lines and lines[-1].startswith("collect interrupted with "), stderr
    assert "batches done; rerun the same command to resume from its checkpoint (" in lines[-1], stderr
    assert "Traceback" not in stderr, stderr
    status, error, _, saved = _run_row(tmp_path / "db.sqlite")
    assert status == "interrupted" and error is not None and error.startswith("KeyboardInterrupt: collect interrupted")
    assert saved > 0 and f"its checkpoint ({saved} batches)" in error
    done = subprocess.run([*_COLLECT, str(cut)], capture_output=True, text=True, env=_ENV)
    assert done.returncode == 0, done.stderr
    status, error, counts, _ = _run_row(tmp_path / "db.sqlite")
    assert status == "done" and error is None and counts["resumed_at_batch"] == saved
    assert _dump(tmp_path / "db.sqlite") == reference


def test_explain_show_usage_and_llm_check_through_the_cli(tmp_path: Path, collected_db: str) -> None:
    cfg = tmp_path / "explain.toml"
    cfg.write_text(
        f"""db = "{collected_db}"
[explain]
llm = "scripted"
features = "all"
limit = 4
min_examples = 1
[llm.scripted]
backend = "fake"
model = "echo-first-mark"
price_prompt = 1.0
price_completion = 2.0
"""
    )
    res = runner.invoke(app, ["explain", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "4 features selected" in res.output
    res = runner.invoke(app, ["features", "list", "--config", str(cfg), "--json", "--all", "--sort", "index"])
    first = json.loads(res.stdout)[0]["id"]
    res = runner.invoke(app, ["features", "show", first, "--config", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    expl = json.loads(res.stdout)["explanations"]
    assert expl and {"text", "explainer", "model", "prompt", "status"} <= set(expl[0])
    assert expl[0]["model"] == "fake:echo-first-mark" and expl[0]["explainer"] == "llm"
    res = runner.invoke(app, ["features", "show", first, "--config", str(cfg)])
    assert "explanation" in res.output
    res = runner.invoke(app, ["usage", "--config", str(cfg), "--json"])
    usage = json.loads(res.stdout)
    assert usage["calls"] >= 1 and usage["cost_usd"] > 0 and usage["by_model"][0]["stage"] == "explain"
    # a rerun makes no call: same usage
    res = runner.invoke(app, ["explain", "--config", str(cfg)])
    assert res.exit_code == 0 and "0 LLM calls" in res.output and "4 already done" in res.output
    assert json.loads(runner.invoke(app, ["usage", "--config", str(cfg), "--json"]).stdout)["calls"] == usage["calls"]
    res = runner.invoke(app, ["explain", "--config", str(cfg), "--explainer", "tokens", "--limit", "2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["llm", "check", "--config", str(cfg), "--llm", "scripted", "--json"])
    assert res.exit_code == 0, res.output
    check = json.loads(res.stdout)
    # one uncached round trip through the configured backend: the fake's own answer, no usage row, no cache entry
    answer = ("fake", "echo-first-mark", "Explanation: no clear pattern")
    assert (check["backend"], check["model"], check["answer"]) == answer
    assert json.loads(runner.invoke(app, ["usage", "--config", str(cfg), "--json"]).stdout)["calls"] == usage["calls"]
    res = runner.invoke(app, ["explain", "--config", str(cfg), "--llm", "nope"])
    assert res.exit_code != 0 and "nope" in str(res.exception)  # main() prints it as one line, exit 2
