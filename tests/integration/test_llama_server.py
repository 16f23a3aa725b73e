"""A real OpenAI-compatible server: llama.cpp's (llama-cpp-python[server], installed by `make test`) serving the
shipped SmolLM2 GGUF on 127.0.0.1. The `openai` backend checks it, explains real collected features through it,
and the API key given through the environment never reaches the database."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autointerp.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()
SECRET = "sk-autointerp-test-NEVER-STORE-4242"


def _config(tmp: Path, db: str, url: str, concurrency: int = 2) -> Path:
    cfg = tmp / "server.toml"
    cfg.write_text(
        f"""db = "{db}"
[explain]
llm = "server"
features = "all"
limit = 4
min_examples = 1
n_top = 6
n_quantile = 2
[llm.server]
backend = "openai"
model = "smollm2"
base_url = "{url}"
api_key_env = "AUTOINTERP_TEST_KEY"
concurrency = {concurrency}
timeout_s = 300
"""
    )
    return cfg


def test_llm_check_against_llama_cpp(tmp_path: Path, llama_server_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOINTERP_TEST_KEY", SECRET)
    cfg = _config(tmp_path, f"sqlite:///{tmp_path}/x.sqlite", llama_server_url)
    res = runner.invoke(app, ["llm", "check", "--config", str(cfg), "--llm", "server", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["backend"] == "openai" and info["model"] == "smollm2" and info["latency_s"] > 0
    assert info["answer"], "the server answered"
    assert info["prompt_logprobs"] is True, info["note"]  # served with logits_all: echo + logprobs work


def test_explain_through_llama_cpp_server(
    tmp_path: Path, collected_db: str, llama_server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOINTERP_TEST_KEY", SECRET)
    cfg = _config(tmp_path, collected_db, llama_server_url)
    res = runner.invoke(app, ["explain", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    path = collected_db.split("///", 1)[1]
    con = sqlite3.connect(path)
    rows = con.execute("select status, text, error, raw, model, prompt_hash from explanation").fetchall()
    assert len(rows) == 4
    assert {r[4] for r in rows} == {"openai:smollm2"} and all(len(r[5]) == 12 for r in rows)
    assert all(r[0] in ("ok", "failed") for r in rows)
    assert any(r[0] == "ok" and r[1] for r in rows), rows  # at least one usable phrase from the real model
    assert all(r[3] for r in rows), "every answer is kept raw, usable or not"
    calls = con.execute("select count(*), sum(prompt_tokens) from llm_call where backend = 'openai'").fetchone()
    assert calls[0] == 4 and calls[1] > 0
    # a rerun costs no call
    res = runner.invoke(app, ["explain", "--config", str(cfg)])
    assert res.exit_code == 0 and "0 LLM calls" in res.output, res.output
    con.close()
    # the API key was sent to the server but is nowhere in the database files
    for f in Path(path).parent.glob(Path(path).name + "*"):
        assert SECRET.encode() not in f.read_bytes(), f"API key found in {f}"
