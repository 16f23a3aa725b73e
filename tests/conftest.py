"""Shared fixtures, and a hermetic session: before any fixture runs, the network is blocked (connections and DNS
lookups of anything but loopback) in this process and in every Python subprocess the tests start, hub libraries
are told they are offline, and AUTOINTERP_HOME points into a temporary directory (the converted model is linked
from the user's cache when it is there, so it is converted at most once per machine and never written there).

The fixtures here are the ones more than one test folder uses (unit, integration, browser), each defined once:
helpers are fixtures that return functions, since no test file imports another (tests/unit/test_suite_layout.py).
What one folder alone uses is in its own conftest.py; the fake LLM client is the library's (autointerp.llm.fake)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from autointerp.store.engine import Store

# Installed here and, through sitecustomize, in every Python subprocess: one text, so both behave the same.
NETWORK_GUARD = r"""
import socket as _socket

def _local(host):
    if isinstance(host, bytes):
        host = host.decode()
    return host is None or (isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1", "")))

_connect, _connect_ex, _getaddrinfo = _socket.socket.connect, _socket.socket.connect_ex, _socket.getaddrinfo

def _check(sock, address):
    host = address[0] if isinstance(address, tuple) else address
    if sock.family != getattr(_socket, "AF_UNIX", -1) and not _local(host):
        raise RuntimeError(f"test tried to reach the network: {address!r}")

def _guarded_connect(self, address):
    _check(self, address)
    return _connect(self, address)

def _guarded_connect_ex(self, address):
    _check(self, address)
    return _connect_ex(self, address)

def _guarded_getaddrinfo(host, *args, **kwargs):
    if not _local(host):
        raise RuntimeError(f"test tried to resolve a network name: {host!r}")
    return _getaddrinfo(host, *args, **kwargs)

_socket.socket.connect = _guarded_connect
_socket.socket.connect_ex = _guarded_connect_ex
_socket.getaddrinfo = _guarded_getaddrinfo
_socket.gethostbyname = lambda host: _guarded_getaddrinfo(host, None)[0][4][0]
"""

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
_SESSION_DIR: Path | None = None


def _link_converted_model(home: Path) -> None:
    """Link the default model's converted copy from the user's cache into the session home, if it exists there."""
    try:
        from autointerp.subject.files import DEFAULT_MODEL, converted_dir, resolve
    except ImportError:  # a broken install: the tests themselves will say so
        return
    real = Path(os.environ.get("AUTOINTERP_HOME_REAL", Path.home() / ".cache" / "autointerp"))
    try:
        resolved = resolve(DEFAULT_MODEL)
    except Exception:  # noqa: BLE001 (the model package is missing: the tests that need it will fail clearly)
        return
    name = converted_dir(resolved, home=real)
    if (name / "config.json").exists():
        (home / "models").mkdir(parents=True, exist_ok=True)
        (home / "models" / name.name).symlink_to(name, target_is_directory=True)


def pytest_configure(config: pytest.Config) -> None:  # noqa: ARG001
    global _SESSION_DIR
    exec(NETWORK_GUARD, {})  # noqa: S102 (our own constant)
    _SESSION_DIR = Path(tempfile.mkdtemp(prefix="autointerp-tests-"))
    home = _SESSION_DIR / "home"
    home.mkdir()
    site = _SESSION_DIR / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NETWORK_GUARD, encoding="utf-8")
    _link_converted_model(home)
    os.environ.update(OFFLINE_ENV)
    os.environ["AUTOINTERP_HOME"] = str(home)
    os.environ["HF_HOME"] = str(_SESSION_DIR / "hf")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)


def pytest_unconfigure(config: pytest.Config) -> None:  # noqa: ARG001
    if _SESSION_DIR is not None:
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a cached safetensors directory (converted once from the GGUF)."""
    from autointerp.subject.files import DEFAULT_MODEL, materialize, resolve

    return materialize(resolve(DEFAULT_MODEL))


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer alone, saved as an HF directory: no weights loaded or converted, so unit tests may use it.
    Read from the converted model's directory when the machine has one (a second), else from the GGUF's metadata
    (the conversion reads it the same way, so both give the same tokenizer)."""
    from transformers import AutoTokenizer

    from autointerp.subject.files import DEFAULT_MODEL, converted_dir, resolve

    resolved = resolve(DEFAULT_MODEL)
    converted = converted_dir(resolved)
    if (converted / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(converted)
    else:
        tok = AutoTokenizer.from_pretrained(resolved.path.parent, gguf_file=resolved.path.name)
    out = tmp_path_factory.mktemp("smol-tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer_dir: Path) -> Path:
    """A small randomly initialised GPT-2 (3 blocks, d=64) with SmolLM2's tokenizer, saved as an HF directory."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
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


def collect_tiny(url: str, root: Path, model_dir: Path) -> None:
    """Collect tiny GPT-2 neurons over a small corpus into the database at `url` (any backend)."""
    from autointerp.collect.run import run_collect
    from autointerp.config import load_config
    from autointerp.store import open_store

    corpus = root / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text((SPEECH * (3 + i)).replace("1862", str(1800 + 7 * i)), encoding="utf-8")
    cfg = load_config(
        None,
        {
            "db": url,
            "model.name": str(model_dir),
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


@pytest.fixture(scope="session")
def collect_into(tiny_gpt2_dir: Path):  # type: ignore[no-untyped-def]
    """collect_into(url, root): the collected_db_file collection into any database (e.g. a PostgreSQL one)."""
    return lambda url, root: collect_tiny(url, root, tiny_gpt2_dir)


@pytest.fixture(scope="session")
def collected_db_file(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path) -> Path:
    """A feature database collected once per session: tiny GPT-2 neurons over a small corpus (copy it to write)."""
    root = tmp_path_factory.mktemp("collected")
    db = root / "db.sqlite"
    collect_tiny(f"sqlite:///{db}", root, tiny_gpt2_dir)
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


# ----------------------------------------------------------------------------------------------------
# Explanations, scores and verdicts written over a collected database: the search, export, review and store tests
# (unit, integration and browser) read the same rows. (feature position, explainer, text); scores and verdicts
# below refer to the texts.
EXPLANATIONS = [
    (0, "llm", "tax policy"),
    (1, "llm", "taxes and tariffs on imported goods"),
    (2, "llm", "the word tax in budget debates"),
    (3, "llm", "foreign policy and diplomacy"),
    (4, "llm", "numbers and dates"),
    (5, "llm", "capitalized names of places"),
    (6, "llm", "war and military conflict"),
    (7, "llm", "negations such as not and never"),
    (8, "llm", "the end of a sentence"),
    (9, "llm", "money, taxation and government revenue"),
    (0, "tokens", 'the tokens "tax" and "taxes"'),
    (6, "tokens", 'the tokens "war" and "army"'),
]
SCORES = [  # (text, method, scorer model, value)
    ("tax policy", "simulation", "s1", 0.8),
    ("tax policy", "detection", "s1", 0.9),
    ("taxes and tariffs on imported goods", "simulation", "s1", 0.6),
    ("taxes and tariffs on imported goods", "simulation", "s2", 0.45),
    ("taxes and tariffs on imported goods", "detection", "s1", 0.4),
    ("the word tax in budget debates", "simulation", "s1", 0.3),
    ("foreign policy and diplomacy", "simulation", "s1", 0.7),
    ("money, taxation and government revenue", "simulation", "s1", 0.55),
    ('the tokens "tax" and "taxes"', "simulation", "s1", 0.2),
]
VERDICTS = [  # (text, verdict, age in minutes): the latest one counts
    ("tax policy", "verified", 0),
    ("taxes and tariffs on imported goods", "verified", 10),
    ("taxes and tariffs on imported goods", "unverified", 1),
    ("foreign policy and diplomacy", "contradicted", 0),
    ('the tokens "tax" and "taxes"', "verified", 0),
]


def _seed(store: Store) -> dict[str, int]:
    """Write the explanations, scores and verdicts; return explanation id by text."""
    from datetime import timedelta

    from autointerp.store.explanations import write_explanations
    from autointerp.store.interventions import write_verdict
    from autointerp.store.scores import write_scores
    from autointerp.store.tables import Explanation, Feature, Score, Verdict, utcnow

    with store.session() as s:
        feats = list(s.exec(Feature.__table__.select().order_by(Feature.__table__.c.id).limit(12)).all())  # type: ignore[attr-defined]
    rows = [
        Explanation(feature_id=feats[k].id, explainer=who, model="fake:scripted" if who == "llm" else "", prompt="p",
                    prompt_hash="h", config_hash="c", status="ok", text=t)
        for k, who, t in EXPLANATIONS
    ]  # fmt: skip
    failed = dict(prompt_hash="h", config_hash="c", status="failed", error="unparsable", raw="tax")
    rows.append(Explanation(feature_id=feats[10].id, explainer="llm", model="fake:scripted", prompt="p", **failed))
    write_explanations(store, rows)
    with store.session() as s:
        ids = {e.text: e.id for e in s.exec(Explanation.__table__.select()).all() if e.text}  # type: ignore[attr-defined]
    fid = {e.text: e.feature_id for e in rows if e.text}
    write_scores(store, [
        Score(explanation_id=ids[t], feature_id=fid[t], method=m, model=who, status="ok", value=v, ci_low=v - 0.1,
              ci_high=v + 0.1, n=30)
        for t, m, who, v in SCORES
    ])  # fmt: skip
    for t, v, age in VERDICTS:
        row = write_verdict(store, Verdict(explanation_id=ids[t], feature_id=fid[t], verdict=v, config_hash=f"v{age}"))
        with store.session() as s:  # the age decides which is the latest
            row = s.get(Verdict, row.id)
            assert row is not None
            row.created_at = utcnow() - timedelta(minutes=age)
            s.add(row)
            s.commit()
    return ids


@pytest.fixture(scope="session")
def seed() -> Callable[[Store], dict[str, int]]:
    """seed(store): write EXPLANATIONS with their scores and verdicts over a collected database's first 12
    features (and one failed explanation on the 11th); returns explanation id by text."""
    return _seed


@pytest.fixture()
def seeded(collected_db: str, seed: Callable[[Store], dict[str, int]]) -> tuple[Store, dict[str, int]]:
    """A private copy of the collected database with seed()'s rows: (store, explanation id by text)."""
    from autointerp.store import open_store

    store = open_store(collected_db)
    return store, seed(store)


@pytest.fixture(scope="session")
def seed_explanations() -> list[tuple[int, str, str]]:
    """What seed() writes: (feature position, explainer, text) of every explanation that has a text."""
    return list(EXPLANATIONS)


# ----------------------------------------------------------------------------------------------------
# A store with one model and one corpus, for the store tests on either database.


def _tiny_store(url: str = "sqlite://", n_ctx: int = 5, ctx_len: int = 4) -> tuple[Store, Any]:
    import numpy as np
    from sqlalchemy import text
    from sqlmodel import SQLModel

    from autointerp.store import open_store
    from autointerp.store.tables import Corpus, SubjectModel
    from autointerp.store.writes import upsert_model, write_corpus

    store = open_store(url)
    if store.engine.dialect.name == "postgresql":  # a PostgreSQL database outlives a Hypothesis example
        names = ", ".join(t.name for t in SQLModel.metadata.sorted_tables if t.name != "schema_version")
        with store.engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    upsert_model(
        store,
        SubjectModel(id="m", family="llama", source="x", n_layers=2, d_model=8),
        {"blocks.0.mlp.post": 16},
    )
    toks = np.arange(n_ctx * ctx_len).reshape(n_ctx, ctx_len)
    corpus = Corpus(
        id="c", name="c", source="c", tokenizer="m", ctx_len=ctx_len, bos_token_id=1, n_docs=1, n_contexts=n_ctx, seed=0
    )
    ids = write_corpus(store, corpus, ["doc"], toks, np.zeros(n_ctx, int), np.arange(n_ctx) * 3)
    return store, ids


@pytest.fixture(scope="session")
def tiny_store() -> Callable[..., tuple[Store, Any]]:
    """tiny_store(url="sqlite://", n_ctx=5, ctx_len=4) -> (store, context ids): the database at `url` emptied but for
    its schema version (each in-memory SQLite store is a new database), holding model "m" (16 neurons at
    blocks.0.mlp.post) and corpus "c" of n_ctx contexts of ctx_len tokens in one document."""
    return _tiny_store


# ----------------------------------------------------------------------------------------------------
# What an export holds against what its database holds (the export tests, on either database).

SCORE_KEYS = ("method", "model", "prompt_hash", "config_hash", "status", "value", "ci_low", "ci_high", "n", "n_failed")


def _export_lines(store: Store, **kw: Any) -> list[dict[str, Any]]:
    import io
    import json

    from autointerp.query.export import export

    buf = io.StringIO()
    export(store, buf, **kw)
    return [json.loads(x) for x in buf.getvalue().splitlines()]


def _db_scores(store: Store) -> set[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT f.key, e.text, " + ", ".join(f"s.{k}" for k in SCORE_KEYS) + " FROM score s "
            "JOIN explanation e ON e.id = s.explanation_id JOIN feature f ON f.id = s.feature_id"
        ).all()
    return {tuple(r) for r in rows}


def _exported_scores(objs: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    return {
        (o["id"], e["text"], *(s[k] for k in SCORE_KEYS)) for o in objs for e in o["explanations"] for s in e["scores"]
    }


@pytest.fixture(scope="session")
def export_lines() -> Callable[..., list[dict[str, Any]]]:
    """export_lines(store, **export options): the JSON objects `autointerp export` writes, one per line."""
    return _export_lines


@pytest.fixture(scope="session")
def db_scores() -> Callable[[Store], set[tuple[Any, ...]]]:
    """db_scores(store): every score row of the database as (feature key, explanation text, *SCORE_KEYS)."""
    return _db_scores


@pytest.fixture(scope="session")
def exported_scores() -> Callable[[list[dict[str, Any]]], set[tuple[Any, ...]]]:
    """exported_scores(objs): every score of exported objects, as db_scores() spells a row."""
    return _exported_scores


# ----------------------------------------------------------------------------------------------------
# The review page's tests (unit and integration): its CSRF token, the review rows, a feature's key.


def _page_csrf(page: str) -> str:
    import re

    m = re.search(r'name="csrf" value="([^"]+)"', page)
    assert m is not None
    return m.group(1)


def _review_rows(store: Store) -> list[tuple[Any, ...]]:
    from autointerp.store.tables import Review

    with store.session() as s:
        rows = s.exec(Review.__table__.select().order_by(Review.__table__.c.id)).all()  # type: ignore[attr-defined]
    return [(r.reviewer, r.explanation_id, r.decision, r.text) for r in rows]


def _feature_key_of(store: Store, explanation_id: int) -> str:
    with store.engine.connect() as conn:
        return str(
            conn.exec_driver_sql(
                f"SELECT f.key FROM explanation e JOIN feature f ON f.id = e.feature_id WHERE e.id = {explanation_id}"
            ).scalar_one()
        )


@pytest.fixture(scope="session")
def page_csrf() -> Callable[[str], str]:
    """page_csrf(html): the CSRF token a review page's forms carry."""
    return _page_csrf


@pytest.fixture(scope="session")
def review_rows() -> Callable[[Store], list[tuple[Any, ...]]]:
    """review_rows(store): every review as (reviewer, explanation id, decision, text), in the order written."""
    return _review_rows


@pytest.fixture(scope="session")
def feature_key_of() -> Callable[[Store, int], str]:
    """feature_key_of(store, explanation id): the key of the feature the explanation explains."""
    return _feature_key_of


# ----------------------------------------------------------------------------------------------------
# `autointerp run` over a collected database with the scripted LLM (the job tests, unit and integration).

JOB_LLM = {"fake": {"backend": "fake", "model": "scripted", "price_prompt": 1.0, "price_completion": 2.0}}


def _job_config(db: str, **over: Any) -> Any:
    from autointerp.config import load_config

    base = {
        "db": db,
        "llm": JOB_LLM,
        "explain.llm": "fake",
        "explain.features": "all",
        "explain.limit": 6,
        "explain.chunk": 2,
        "score.llm": "fake",
        "score.methods": ["detection", "fuzzing"],
        "score.max_per_role": 3,
        "intervene.llm": "fake",
        "intervene.explainer": "llm",
        "intervene.target_kl": 0.05,
        "intervene.n_prompts": 2,
        "intervene.max_new_tokens": 4,
        "run.stages": ["explain", "score", "intervene"],
        "run.explainers": ["llm", "tokens"],
        "run.poll_s": 0.05,
    }
    return load_config(None, base | over)


def _job_rows(db: str) -> dict[str, list[tuple[Any, ...]]]:
    from sqlmodel import select

    from autointerp.store import open_store
    from autointerp.store.tables import Explanation, InterventionRow, Score, Verdict

    store = open_store(db)
    with store.session() as s:
        return {
            "explanation": sorted((e.feature_id, e.explainer, e.status, e.text) for e in s.exec(select(Explanation))),
            "score": sorted((r.explanation_id, r.method, r.status, r.value) for r in s.exec(select(Score))),
            "intervention": sorted((r.feature_id, r.status, r.strength) for r in s.exec(select(InterventionRow))),
            "verdict": sorted((v.explanation_id, v.verdict) for v in s.exec(select(Verdict))),
        }


def _llm_calls(db: str) -> int:
    from sqlmodel import select

    from autointerp.store import open_store
    from autointerp.store.tables import LLMCall

    with open_store(db).session() as s:
        return len(s.exec(select(LLMCall)).all())


@pytest.fixture(scope="session")
def job_config() -> Callable[..., Any]:
    """job_config(db, **overrides): the config of a job over every stage but collect on `db` with the scripted fake
    LLM (priced, so budgets bite): 6 features, chunks of 2, detection and fuzzing, 2 steering prompts."""
    return _job_config


@pytest.fixture(scope="session")
def job_rows() -> Callable[[str], dict[str, list[tuple[Any, ...]]]]:
    """job_rows(db): the result rows by natural key and content (ids and run ids left out)."""
    return _job_rows


@pytest.fixture(scope="session")
def llm_calls() -> Callable[[str], int]:
    """llm_calls(db): how many LLM calls the database's log holds."""
    return _llm_calls


# ----------------------------------------------------------------------------------------------------
# The migration tests' version 4 database (on either database).


def _as_schema_v4(url: str) -> None:
    from sqlalchemy import text

    from autointerp.store import open_store

    store = open_store(url)
    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE run DROP COLUMN worker"))
        conn.execute(text("ALTER TABLE run DROP COLUMN heartbeat_at"))
        conn.execute(
            text(
                "INSERT INTO run (stage, key, status, progress, total, started_at) "
                "VALUES ('collect', 'k', 'done', 1, 1, '2026-01-01 00:00:00')"
            )
        )
        conn.execute(text("UPDATE schema_version SET version = 4"))
    store.engine.dispose()


@pytest.fixture(scope="session")
def as_schema_v4() -> Callable[[str], None]:
    """as_schema_v4(url): today's schema at `url` made into version 4's (the run table without the two columns
    schema 5 added), with one collect run."""
    return _as_schema_v4


# ----------------------------------------------------------------------------------------------------
# The site tests (a tiny GPT-2 in unit, SmolLM2 in integration) and the hook counts of the intervention tests.


def _random_ids(subject: Any, n: int = 2, t: int = 12) -> Any:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 5000, (n, t), generator=g)
    ids[:, 0] = subject.bos_token_id
    return ids


def _n_hooks(model: Any) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _check_sites(subject: Any, layer: int, mlp_post: Any) -> None:
    import torch

    from autointerp.subject.sites import capture, parse_site

    model = subject.model
    ids = _random_ids(subject)
    sites = [f"blocks.{layer}.{k}" for k in ("mlp.post", "resid.post", "resid.pre", "mlp.out", "attn.out")]
    got = capture(model, subject.layout, sites, ids)
    with torch.inference_mode():
        hs = model(ids, output_hidden_states=True).hidden_states
    before = _n_hooks(model)  # transformers installs output-capturing hooks of its own on first use
    got = capture(model, subject.layout, sites, ids)
    torch.testing.assert_close(got[f"blocks.{layer}.resid.pre"], hs[layer])
    if layer + 1 < len(hs) - 1:  # the last hidden state has the final norm applied in HF models
        torch.testing.assert_close(got[f"blocks.{layer}.resid.post"], hs[layer + 1])
    # resid.post = resid.pre + attn.out + mlp.out for both families (pre-norm blocks).
    recon = got[f"blocks.{layer}.resid.pre"] + got[f"blocks.{layer}.attn.out"] + got[f"blocks.{layer}.mlp.out"]
    torch.testing.assert_close(got[f"blocks.{layer}.resid.post"], recon, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[f"blocks.{layer}.mlp.post"], mlp_post(got, layer), rtol=1e-4, atol=1e-4)
    assert got[f"blocks.{layer}.mlp.post"].shape[-1] == subject.layout.site_width(model, parse_site(sites[0]))
    assert _n_hooks(model) == before


@pytest.fixture(scope="session")
def random_ids() -> Callable[..., Any]:
    """random_ids(subject, n=2, t=12): an [n, t] batch of token ids drawn with seed 0, each row starting with BOS."""
    return _random_ids


@pytest.fixture(scope="session")
def n_hooks() -> Callable[[Any], int]:
    """n_hooks(model): how many forward hooks and pre-hooks its modules hold."""
    return _n_hooks


@pytest.fixture(scope="session")
def check_sites() -> Callable[[Any, int, Any], None]:
    """check_sites(subject, layer, mlp_post): the block's sites capture what a plain forward computes (hidden states,
    resid.post = resid.pre + attn.out + mlp.out, mlp.post = mlp_post(captured, layer)), and no hook stays."""
    return _check_sites


# ----------------------------------------------------------------------------------------------------
# The collector tests' config (unit on SQLite, integration on both databases).


def _random_sae(tmp: Path, arch: str, d_in: int, d_sae: int = 48, k: int | None = 4) -> Path:
    import math

    import torch

    from autointerp.subject.sae import SAE, SAEConfig, save_sae

    g = torch.Generator().manual_seed(1 if arch == "topk" else 2)
    cfg = SAEConfig(
        d_in=d_in, d_sae=d_sae, architecture=arch, k=k if arch == "topk" else None, site="blocks.1.resid.post"
    )  # type: ignore[arg-type]
    sae = SAE(
        cfg,
        W_enc=torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in),
        b_enc=torch.randn(d_sae, generator=g) * 0.1 - 0.05,
        W_dec=torch.randn(d_sae, d_in, generator=g) / math.sqrt(d_sae),
        b_dec=torch.randn(d_in, generator=g) * 0.01,
    )
    return save_sae(sae, tmp / f"sae-{arch}")


def _collect_config(tmp: Path, corpus: Path, model_dir: Path, db: str | None = None, **collect: Any) -> Any:
    from autointerp.config import RunConfig

    base = {
        "db": db or f"sqlite:///{tmp}/a.sqlite",
        "model": {"name": str(model_dir)},
        "corpus": {"source": str(corpus), "ctx_len": 16, "max_tokens": None, "seed": 3},
        "collect": {
            "sites": ["blocks.1.mlp.post"],
            "saes": [{"path": str(_random_sae(tmp, "topk", 64))}, {"path": str(_random_sae(tmp, "relu", 64))}],
            "batch_size": 3,
            "top_k": 5,
            "n_quantiles": 3,
            "per_quantile": 2,
            "n_random": 4,
            "histogram_every": 1,
            "checkpoint_tokens": 100,
            "write_batch_features": 7,
        }
        | collect,
    }
    return RunConfig.model_validate(base)


@pytest.fixture(scope="session")
def random_sae() -> Callable[..., Path]:
    """random_sae(tmp, arch, d_in, d_sae=48, k=4): a randomly initialised SAE of `arch` (seeded) on
    blocks.1.resid.post, saved under `tmp`; returns its path."""
    return _random_sae


@pytest.fixture(scope="session")
def collect_config() -> Callable[..., Any]:
    """collect_config(tmp, corpus, model_dir, db=None, **collect): the collector tests' RunConfig: the neurons of
    blocks.1.mlp.post and two random SAEs (TopK, ReLU) of blocks.1.resid.post, 16-token contexts, small batches, a
    checkpoint every 100 tokens; its database a SQLite file in `tmp` unless `db` names one; `collect` overrides."""
    return _collect_config


# ----------------------------------------------------------------------------------------------------
# The `autointerp` entry point run in-process, as a shell would, for the CLI tests.


@pytest.fixture()
def run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[[list[str]], tuple[int, str, str]]:
    """run_main(args): (exit code, stdout, stderr) of `autointerp ARGS`."""

    def run(args: list[str]) -> tuple[int, str, str]:
        from autointerp.cli import main

        monkeypatch.setattr(sys, "argv", ["autointerp", *args])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = int(exc.code or 0)
        got = capsys.readouterr()
        return code, got.out, got.err

    return run


# ----------------------------------------------------------------------------------------------------
# A real PostgreSQL server on loopback, for the store tests and the jobs tests that run on both databases.

PG_BIN = Path(os.environ.get("AUTOINTERP_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """PostgreSQL 15 started for the session in a temporary directory on a free port of 127.0.0.1 (initdb, then
    pg_ctl; stopped at the end). Yields the URL of its `postgres` database. As root, the server runs as the
    `postgres` user the Debian package creates (PostgreSQL refuses to run as root)."""
    import subprocess

    if not (PG_BIN / "initdb").exists():
        pytest.fail(f"PostgreSQL is missing ({PG_BIN}/initdb): apt-get install postgresql-15 (make test does)")
    # Not under pytest's tmp directory: its parents are private to the user running the tests.
    root = Path(tempfile.mkdtemp(prefix="autointerp-pg-"))
    root.chmod(0o755)
    data, sock, log = root / "data", root / "sock", root / "server.log"
    sock.mkdir()

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode:
            tail = log.read_text()[-2000:] if log.exists() else ""
            pytest.fail(f"{' '.join(cmd[:2])} failed: {done.stderr[-2000:]}{done.stdout[-500:]}{tail}")

    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        for p in (root, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    run(str(PG_BIN / "initdb"), "-D", str(data), "-U", "autointerp", "--auth=trust", "-E", "UTF8", "--no-sync")
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
    run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(log), "-w", "start")
    try:
        yield f"postgresql+psycopg://autointerp@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def postgres_db(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the session's server for one test (dropped afterwards)."""
    import uuid

    import psycopg

    admin = postgres_server.replace("postgresql+psycopg://", "postgresql://")
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_server.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def run_cli(run_main: Callable[[list[str]], tuple[int, str, str]]) -> Callable[[list[str]], tuple[int, str]]:
    """run_cli(args): (exit code, stdout + stderr) of `autointerp ARGS`."""

    def run(args: list[str]) -> tuple[int, str]:
        code, out, err = run_main(args)
        return code, out + err

    return run
