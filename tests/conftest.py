"""Shared fixtures. The network is blocked for every test; models come from disk only."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach the network: any non-loopback connection fails loudly."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else address
        if (
            isinstance(host, str)
            and (host.startswith("127.") or host in ("localhost", "::1"))
            or self.family == socket.AF_UNIX
        ):
            return real_connect(self, address)  # type: ignore[arg-type]
        raise RuntimeError(f"test tried to reach the network: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a cached safetensors directory (converted once from the GGUF)."""
    from autointerp.subject.files import DEFAULT_MODEL, materialize, resolve

    return materialize(resolve(DEFAULT_MODEL))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, smol_dir: Path) -> Path:
    """A small randomly initialised GPT-2 (3 blocks, d=64) with SmolLM2's tokenizer, saved as an HF directory."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(smol_dir)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=128,
        n_embd=64,
        n_layer=3,
        n_head=4,
        n_inner=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    out = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_subject(tiny_gpt2_dir: Path):  # type: ignore[no-untyped-def]
    from autointerp.subject.model import load_subject

    return load_subject(str(tiny_gpt2_dir))


@pytest.fixture(scope="session")
def smol_subject(smol_dir: Path):  # type: ignore[no-untyped-def]
    from autointerp.subject.model import load_subject

    return load_subject("smollm2-135m-instruct")


SPEECH = (
    "The state of the Union is strong. We will build roads, schools and hospitals in every State.\n\n"
    "In 1862 the Congress passed 37 acts; in 1863 it passed 41. Our nation's café owners pay 12 per cent.\n"
    "Fellow-Citizens of the Senate and House of Representatives: peace, commerce and honest friendship.\n"
)


@pytest.fixture()
def small_corpus(tmp_path: Path) -> Path:
    """A directory of small text documents with digits, capitals, newlines and a multi-byte character."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(6):
        (d / f"doc{i}.txt").write_text((SPEECH * (3 + i)).replace("1862", str(1800 + 7 * i)), encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def collected_db_file(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path) -> Path:
    """A feature database collected once per session: tiny GPT-2 neurons over a small corpus (copy it to write)."""
    from autointerp.collect.run import run_collect
    from autointerp.config import load_config
    from autointerp.store import open_store

    root = tmp_path_factory.mktemp("collected")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text((SPEECH * (3 + i)).replace("1862", str(1800 + 7 * i)), encoding="utf-8")
    db = root / "db.sqlite"
    cfg = load_config(
        None,
        {
            "db": f"sqlite:///{db}",
            "model.name": str(tiny_gpt2_dir),
            "corpus.source": str(corpus),
            "corpus.ctx_len": 24,
            "corpus.max_tokens": 3000,
            "collect.sites": ["blocks.1.mlp.post"],
            "collect.batch_size": 8,
            "collect.top_k": 8,
            "collect.n_quantiles": 3,
            "collect.per_quantile": 2,
            "collect.n_random": 4,
            "collect.checkpoint_tokens": 100_000,
        },
    )
    store = open_store(cfg.db)
    run_collect(cfg, store)
    store.engine.dispose()
    import sqlite3

    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # copies of the file then hold everything
    con.close()
    return db


@pytest.fixture()
def collected_db(tmp_path: Path, collected_db_file: Path) -> str:
    """A private copy of the collected database, as a URL."""
    import shutil

    dst = tmp_path / "db.sqlite"
    shutil.copy(collected_db_file, dst)
    return f"sqlite:///{dst}"
