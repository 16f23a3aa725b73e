"""PostgreSQL against SQLite on the same work: a collection's write phase and an explain run, side by side.

  write    `collect` of the neurons of a random GPT-2 with a wide MLP (SmolLM2's tokenizer) over a SOTU slice, into
           each database: the time outside the streaming pass (the corpus's contexts, then every feature with its
           records: PostgreSQL's binary COPY against SQLite's multi-row inserts), and, as a check, the rows
           written compared by natural keys (they must be equal); and the same on PostgreSQL through the
           portable path (pipelined INSERTs: what COPY replaced), for copy_vs_portable
  explain  `explain` of N of those features with the LLM-free `tokens` explainer, then with the LLM explainer on
           the scripted `fake` backend (response cache and usage rows included), on each database
PostgreSQL 15 runs in a temporary directory on a free port of 127.0.0.1, as tests/conftest.py starts it (as the
`postgres` user when run as root), with fsync on and synchronous_commit off: durable at its WAL flushes, as
SQLite's WAL with synchronous=NORMAL is at its checkpoints. The two databases alternate and the median of the
repeats is reported, to damp noise on a shared machine.
Last line: postgres_vs_sqlite=... (write + explain), postgres_vs_sqlite_write=... postgres_vs_sqlite_explain=...
(PostgreSQL time / SQLite time) ...

    .venv/bin/python bench/postgres.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path(os.environ.get("AUTOINTERP_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server for the run (stopped at the end); yields the URL of its `postgres` database."""
    if not (PG_BIN / "initdb").exists():
        sys.exit(f"PostgreSQL is missing ({PG_BIN}/initdb): apt-get install postgresql-15")
    root = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    root.chmod(0o755)
    data, sock, log = root / "data", root / "sock", root / "server.log"
    sock.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        import pwd

        pw = pwd.getpwnam("postgres")
        for p in (root, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode:
            tail = log.read_text()[-2000:] if log.exists() else ""
            sys.exit(f"{' '.join(cmd[:2])} failed: {done.stderr[-2000:]}{tail}")

    port = _free_port()
    run(str(PG_BIN / "initdb"), "-D", str(data), "-U", "autointerp", "--auth=trust", "-E", "UTF8")
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c synchronous_commit=off"
    run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(log), "-w", "start")
    try:
        yield f"postgresql+psycopg://autointerp@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def new_database(server: str, name: str) -> str:
    import psycopg

    with psycopg.connect(server.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}"')
        con.execute(f'CREATE DATABASE "{name}"')
    return server.rsplit("/", 1)[0] + f"/{name}"


def wide_model(root: Path, width: int) -> Path:
    """A random 2-block GPT-2 whose MLP has `width` neurons, with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from autointerp.subject.files import DEFAULT_MODEL, materialize, resolve

    tok = AutoTokenizer.from_pretrained(materialize(resolve(DEFAULT_MODEL)))
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2, n_head=4, n_inner=width,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    out = root / f"gpt2-{width}"
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def config(db: str, model: Path, tokens: int, n_explain: int) -> Any:
    from autointerp.config import load_config

    return load_config(
        None,
        {
            "db": db,
            "model.name": str(model),
            "corpus.max_tokens": tokens,
            "collect.sites": ["blocks.1.mlp.post"],
            "collect.batch_size": 32,
            "explain.features": "sample",
            "explain.limit": n_explain,
            "explain.llm": "fake",
            "llm": {"fake": {"backend": "fake"}},
        },
    )


def collect(cfg: Any, subject: Any, corpus: Any, portable: bool = False) -> tuple[float, int]:
    """(seconds of the collection outside its streaming pass, records written); `portable`: through the portable
    write path (as any database without a fast path)."""
    from sqlmodel import func, select

    from autointerp.collect.run import run_collect
    from autointerp.store import open_store, writes
    from autointerp.store.tables import Record, Run

    store = open_store(cfg.db)
    own = writes._fast_path
    if portable:
        writes._fast_path = lambda _conn: None  # type: ignore[assignment]
    try:
        t = time.perf_counter()
        run_collect(cfg, store, subject=subject, corpus=corpus)
        total = time.perf_counter() - t
    finally:
        writes._fast_path = own
    with store.session() as s:
        loop = s.exec(select(Run)).one().counts["loop_seconds"]
        n = s.exec(select(func.count()).select_from(Record)).one()
    store.engine.dispose()
    return total - loop, int(n)


def explain(cfg: Any) -> tuple[float, float, int]:
    """(seconds of the tokens explainer, seconds of the LLM explainer on the fake backend, LLM calls)."""
    from autointerp.explain.run import build_explainer, run_explain
    from autointerp.store import open_store

    store = open_store(cfg.db)
    t = time.perf_counter()
    run_explain(cfg, store, explainer=build_explainer(cfg, store, kind="tokens"))
    t_tokens = time.perf_counter() - t
    t = time.perf_counter()
    res = run_explain(cfg, store)
    t_llm = time.perf_counter() - t
    store.engine.dispose()
    return t_tokens, t_llm, res.llm_calls


def rows(url: str) -> dict[str, Any]:
    """What the collection and the explain runs wrote, by natural keys (row ids and timestamps left out)."""
    from sqlmodel import select

    from autointerp.store import open_store
    from autointerp.store.tables import Context, Explanation, Feature, Record

    store = open_store(url)
    with store.session() as s:
        ctx = {c.id: c.idx for c in s.exec(select(Context)).all()}
        feats = s.exec(select(Feature)).all()
        key = {f.id: f.key for f in feats}
        out = {
            "features": sorted((f.key, f.max_act, f.mean_act, f.density, f.n_tokens, str(f.histogram)) for f in feats),
            "records": sorted(
                (key[r.feature_id], ctx[r.context_id], r.role, r.rank, r.max_act, bytes(r.acts))
                for r in s.exec(select(Record)).all()
            ),  # fmt: skip
            "explanations": sorted(
                (key[e.feature_id], e.explainer, e.status, e.text or "") for e in s.exec(select(Explanation)).all()
            ),  # fmt: skip
        }
    store.engine.dispose()
    return out


def measure(quick: bool, repeats: int | None = None, say: Any = print) -> dict[str, Any]:
    """The side-by-side figures (bench/jobs.py reports them too): PostgreSQL time / SQLite time, and the rest."""
    width, tokens, n_explain = (1024, 16_384, 64) if quick else (4096, 65_536, 400)
    repeats = repeats or (1 if quick else 3)
    sys.path.insert(0, str(ROOT))

    from autointerp.corpus import tokenize_corpus
    from autointerp.subject.model import load_subject

    work = Path(tempfile.mkdtemp(prefix="bench-postgres-"))
    try:
        model = wide_model(work, width)
        subject = load_subject(str(model))
        corpus = tokenize_corpus("sotu", subject.tokenizer, tokenizer_name=subject.name,
                                 bos_token_id=subject.bos_token_id, ctx_len=64, max_tokens=tokens, seed=0)  # fmt: skip
        say(f"neurons={width} tokens={corpus.n_tokens} explain={n_explain} load={os.getloadavg()[0]:.1f}")
        times: dict[str, dict[str, list[float]]] = {"sqlite": {}, "postgresql": {}}
        with postgres_server() as server:
            for r in range(repeats):
                urls = {"sqlite": f"sqlite:///{work}/r{r}.sqlite", "postgresql": new_database(server, f"r{r}")}
                for name, url in urls.items():  # alternating, so that a noisy stretch hits both
                    cfg = config(url, model, tokens, n_explain)
                    write_s, n_records = collect(cfg, subject, corpus)
                    t_tokens, t_llm, calls = explain(cfg)
                    for k, v in (("write", write_s), ("tokens", t_tokens), ("llm", t_llm)):
                        times[name].setdefault(k, []).append(v)
                    say(f"repeat {r} {name:>10}: write {write_s:.2f}s ({n_records} records), explain tokens "
                        f"{t_tokens:.2f}s + llm {t_llm:.2f}s ({calls} fake calls)")  # fmt: skip
                if r == 0:
                    same = rows(urls["sqlite"]) == rows(urls["postgresql"])
                    say(f"rows equal on both databases: {same}")
                portable_url = new_database(server, f"p{r}")
                portable, _ = collect(config(portable_url, model, tokens, n_explain), subject, corpus, portable=True)
                times["postgresql"].setdefault("portable", []).append(portable)
                say(f"repeat {r} postgresql, portable path: write {portable:.2f}s")
        med = {db: {k: statistics.median(v) for k, v in t.items()} for db, t in times.items()}
        explain_pg = med["postgresql"]["tokens"] + med["postgresql"]["llm"]
        explain_sq = med["sqlite"]["tokens"] + med["sqlite"]["llm"]
        return {
            "postgres_vs_sqlite": (med["postgresql"]["write"] + explain_pg) / (med["sqlite"]["write"] + explain_sq),
            "postgres_vs_sqlite_write": med["postgresql"]["write"] / med["sqlite"]["write"],
            "postgres_vs_sqlite_explain": explain_pg / explain_sq,
            "sqlite_write_s": med["sqlite"]["write"],
            "postgres_write_s": med["postgresql"]["write"],
            "sqlite_explain_s": explain_sq,
            "postgres_explain_s": explain_pg,
            "records": n_records,
            "copy_vs_portable": med["postgresql"]["write"] / med["postgresql"]["portable"],
            "rows_equal": same,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smaller model and slice, one repeat (under 2 minutes)")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    figures = measure(args.quick, args.repeats)
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
