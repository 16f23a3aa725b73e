"""Job-runner benchmark: what `autointerp run` costs over calling the stages by hand, what a second worker buys
when the LLM is the bottleneck, and how good the dry run's estimate is. Side by side in one run, on a small
collection of a random tiny GPT-2 (the runner's overhead does not depend on the subject model):

  runner_ratio        explain + score of N features: the stages called one after the other (run_explain with
                      each explainer, then run_score) over `autointerp run` of the same, each on its own copy of
                      one database, with a scripted LLM that takes a fixed time per call (>= 0.97: the runner
                      costs at most 3 %)
  two_worker_speedup  the LLM explainer against OpenAI-compatible stub servers on 127.0.0.1 that take a fixed time
                      per request and serve one request at a time: one worker with one server vs two worker
                      processes with a server each, on one database (>= 1.8); timed over the stage itself (first
                      start to last finish of the workers' runs: process start-up does not grow with a job); with
                      units_done_twice (units written twice or taken over: must be 0) and the LLM calls per unit
  process_workers_speedup  `autointerp run --stages explain,score --workers 2` over `--workers 1` (>= 1.8): the
                      executor hands claimed chunks to two worker processes; the explainer and the scorers call two
                      OpenAI-compatible stub servers that answer every request after a fixed time, side by side;
                      units per second once running (the pool's start-up, once per job, left out; with it:
                      process_workers_wall), with process_units_done_twice (must be 0) and process_calls_equal
  dry_run_error       estimated / actual prompt tokens of the job the dry run predicted, minus 1 (within +-0.25)
  cache_bytes_per_logprob_entry, db_bytes_per_scored_feature   on this small job; `--sizes-of DB` prints them for
                      any SQLite database, e.g. the demo's after `make demo` (the README has its figures)
  postgres_vs_sqlite  bench/postgres.py's collect write phase + explain run, PostgreSQL time over SQLite time (and
                      each phase's ratio; rows_equal: both databases hold the same rows)

    .venv/bin/python bench/jobs.py [--quick] [--sizes-of db/autointerp.sqlite]
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SPEECH = (
    "The state of the Union is strong. We will build roads, schools and hospitals in every State.\n\n"
    "In 1862 the Congress passed 37 acts; in 1863 it passed 41. Our nation's cafe owners pay 12 per cent.\n"
    "Fellow-Citizens of the Senate and House of Representatives: peace, commerce and honest friendship.\n"
)


def tiny_model(root: Path) -> Path:
    """A random 3-block GPT-2 with SmolLM2's tokenizer (as the tests build it)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from autointerp.subject.files import DEFAULT_MODEL, materialize, resolve

    tok = AutoTokenizer.from_pretrained(materialize(resolve(DEFAULT_MODEL)))
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=3, n_head=4, n_inner=128,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    out = root / "tiny-gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_config(root: Path, db: Path, model: Path, n: int, llm: dict[str, Any], name: str = "job") -> Path:
    corpus = root / "corpus"
    if not corpus.exists():
        corpus.mkdir()
        for i in range(12):
            (corpus / f"doc{i}.txt").write_text((SPEECH * (3 + i)).replace("1862", str(1800 + 7 * i)))

    def toml(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {toml(x)}" for k, x in v.items()) + "}"
        return json.dumps(v)

    llm_toml = "\n".join(f"{k} = {toml(v)}" for k, v in llm.items())
    cfg = root / f"{name}.toml"
    cfg.write_text(
        f"""db = "sqlite:///{db}"
[model]
name = "{model}"
[corpus]
source = "{corpus}"
ctx_len = 32
max_tokens = 6000
[collect]
sites = ["blocks.1.mlp.post"]
batch_size = 16
top_k = 8
n_quantiles = 3
per_quantile = 2
n_random = 6
[explain]
llm = "bench"
features = "all"
limit = {n}
chunk = 4
[score]
llm = "bench"
methods = ["detection", "fuzzing", "simulation"]
max_per_role = 3
[run]
stages = ["explain", "score"]
explainers = ["llm", "tokens"]
poll_s = 0.05
[llm.bench]
{llm_toml}
"""
    )
    return cfg


def copy_db(src: Path, dst: Path) -> None:
    con = sqlite3.connect(src)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    shutil.copy(src, dst)


# -- the runner against the stages by hand --------------------------------------------------------------------


ROUNDS = 5


def runner_ratio(root: Path, base: Path, model: Path, n: int, delay: float) -> tuple[float, float, float]:
    from autointerp.config import load_config
    from autointerp.explain.run import build_explainer, run_explain
    from autointerp.run.job import PipelineJob as Job
    from autointerp.score.run import run_score
    from autointerp.store import open_store

    fake = {"backend": "fake", "model": "scripted", "options": {"delay_s": str(delay)}}
    times: dict[str, list[float]] = {"stages": [], "runner": []}
    # Five rounds, the order flipping each round; the ratio is the median of the rounds' ratios (the two runs of a
    # round are adjacent in time, so they share the machine's load): one pair of 3-second runs on a shared machine
    # varied from 0.78 to 1.11, and medians of three rounds' times from 0.958 to 0.995 between runs.
    for r in range(ROUNDS):
        for way in ("stages", "runner") if r % 2 == 0 else ("runner", "stages"):
            db = root / f"{way}{r}.sqlite"
            copy_db(base, db)
            cfg = load_config(write_config(root, db, model, n, fake, name=f"{way}{r}"))
            store = open_store(cfg.db)
            t0 = time.perf_counter()
            if way == "stages":
                for kind in cfg.run.explainers:
                    run_explain(cfg, store, explainer=build_explainer(cfg, store, kind=kind))
                run_score(cfg, store)
            else:
                res = Job(cfg, store).run()
                assert res.status == "done", res
            times[way].append(time.perf_counter() - t0)
            store.engine.dispose()
    ratio = statistics.median(a / b for a, b in zip(times["stages"], times["runner"], strict=True))
    return ratio, statistics.median(times["stages"]), statistics.median(times["runner"])


# -- two workers, two servers ---------------------------------------------------------------------------------


class _Stub(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that answers one explanation after a fixed delay."""

    delay = 0.05

    def text(self, body: dict[str, Any]) -> str:  # noqa: ARG002 (the same answer to every request)
        return "Explanation: words about the nation and its states"

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(self.delay)  # on a plain HTTPServer, one request at a time
        answer = {"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model", "stub"),
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": self.text(body)}}],
                  "usage": {"prompt_tokens": 100, "completion_tokens": 8, "total_tokens": 108}}  # fmt: skip
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args: Any) -> None:
        pass


def _serve(delay: float) -> tuple[http.server.HTTPServer, str]:
    handler = type("Stub", (_Stub,), {"delay": delay})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def two_workers(root: Path, base: Path, model: Path, n: int, delay: float) -> dict[str, Any]:
    times: dict[int, float] = {}
    detail: dict[str, Any] = {}
    for workers in (1, 2):
        db = root / f"w{workers}.sqlite"
        copy_db(base, db)
        servers = [_serve(delay) for _ in range(workers)]
        procs = []
        t0 = time.perf_counter()
        for k, (_srv, url) in enumerate(servers):
            llm = {"backend": "openai", "model": "stub", "base_url": url, "api_key_env": "AUTOINTERP_STUB_KEY",
                   "concurrency": 4}  # fmt: skip
            cfg = write_config(root, db, model, n, llm, name=f"w{workers}-{k}")
            cmd = [sys.executable, "-m", "autointerp.cli", "run", "--config", str(cfg), "--stages", "explain",
                   "--worker-name", f"bench-{k}"]  # fmt: skip
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env={**os.environ, "AUTOINTERP_STUB_KEY": "x"}))  # fmt: skip
        for p in procs:
            _out, err = p.communicate(timeout=1800)
            if p.returncode != 0:
                raise SystemExit(f"worker failed: {err[-2000:]}")
        wall = time.perf_counter() - t0
        for srv, _ in servers:
            srv.shutdown()
        con = sqlite3.connect(db)
        # The LLM explainer's span, first start to last finish over the workers' runs: what an overnight job pays;
        # the seconds each process takes to start (imports) are left out, they do not grow with the job.
        span = con.execute(
            "SELECT (julianday(max(finished_at)) - julianday(min(started_at))) * 86400 FROM run "
            "WHERE stage = 'explain' AND json_extract(config, '$.label') = 'explain:llm'"
        ).fetchone()[0]
        skew = con.execute(
            "SELECT (julianday(max(started_at)) - julianday(min(started_at))) * 86400 FROM run "
            "WHERE stage = 'explain' AND json_extract(config, '$.label') = 'explain:llm'"
        ).fetchone()[0]
        times[workers] = float(span)
        detail[f"wall{workers}"] = wall
        print(f"{workers} worker(s): stage span {span:.1f}s (start skew {skew:.1f}s), wall {wall:.1f}s")
        units = con.execute("SELECT count(*), sum(attempts > 1) FROM unit WHERE stage = 'explain'").fetchone()
        twice = con.execute(
            "SELECT count(*) FROM (SELECT feature_id, explainer FROM explanation GROUP BY 1, 2 HAVING count(*) > 1)"
        ).fetchone()[0]
        calls = con.execute("SELECT count(*) FROM llm_call WHERE stage = 'explain'").fetchone()[0]
        con.close()
        detail[f"w{workers}"] = {"units": units[0], "reclaimed": units[1] or 0, "twice": twice, "calls": calls}
    llm_units = n  # one LLM call per feature for the llm explainer
    return {
        "two_worker_speedup": times[1] / times[2],
        "one_worker_s": times[1],
        "two_workers_s": times[2],
        "units_done_twice": detail["w2"]["twice"] + detail["w2"]["reclaimed"],
        "calls_per_llm_unit": detail["w2"]["calls"] / llm_units,
    }


# -- one job, two worker processes (the executor seam) --------------------------------------------------------


class _Answers(_Stub):
    """An OpenAI-compatible chat endpoint that answers as the library's scripted backend does (explanations, and
    yes/no lists of the right length for detection and fuzzing), after a fixed delay; requests are served side by
    side (a threaded server), like a vLLM server with room to spare."""

    def text(self, body: dict[str, Any]) -> str:
        from autointerp.llm.fake import default_answer
        from autointerp.llm.types import ChatRequest, Message

        return default_answer(ChatRequest(messages=tuple(Message(role=m["role"], content=m["content"])
                                                         for m in body["messages"])))  # fmt: skip


def process_workers(root: Path, base: Path, model: Path, n: int, delay: float) -> dict[str, Any]:
    """`autointerp run --stages explain,score --workers 1` vs `--workers 2`: the explainer's and the scorers' LLMs
    are two stub servers. The speedup is of throughput once running; `process_workers_wall` is over the job's runs
    (first start to last finish), the pool's start-up included."""
    servers = []
    for _ in range(2):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Answers", (_Answers,), {"delay": delay}))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(f"http://127.0.0.1:{srv.server_address[1]}/v1")
    llm = {"backend": "openai", "model": "stub", "api_key_env": "AUTOINTERP_STUB_KEY", "concurrency": 8}
    times: dict[int, float] = {}
    rates: dict[int, float] = {}
    found: dict[int, dict[str, Any]] = {}
    for workers in (1, 2):
        db = root / f"pw{workers}.sqlite"
        copy_db(base, db)
        cfg = write_config(root, db, model, n, {**llm, "base_url": servers[0]}, name=f"pw{workers}")
        text = (
            cfg.read_text()
            .replace('methods = ["detection", "fuzzing", "simulation"]', 'methods = ["detection", "fuzzing"]')
            .replace('[score]\nllm = "bench"', '[score]\nllm = "scorer"')
        )
        text = text.replace('explainers = ["llm", "tokens"]', 'explainers = ["llm"]')
        text += "[llm.scorer]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in
                                               {**llm, "base_url": servers[1]}.items()) + "\n"  # fmt: skip
        cfg.write_text(text)
        cmd = [sys.executable, "-m", "autointerp.cli", "run", "--config", str(cfg), "--workers", str(workers)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "AUTOINTERP_STUB_KEY": "x"},
                              timeout=1800)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"--workers {workers} failed: {done.stderr[-2000:]}")
        con = sqlite3.connect(db)
        span = con.execute("SELECT (julianday(max(finished_at)) - julianday(min(started_at))) * 86400 FROM run "
                           "WHERE stage IN ('explain', 'score')").fetchone()[0]  # fmt: skip
        # Throughput once running: units finished after the first chunk over the time from its end to the last
        # finish (the pool's start-up, a few seconds once per job, left out as for two_worker_speedup).
        ends = [r[0] for r in con.execute("SELECT julianday(updated_at) * 86400 FROM unit WHERE status = 'done' "
                                          "AND rank >= 0 AND stage IN ('explain', 'score') ORDER BY 1")]  # fmt: skip
        first = sum(t == ends[0] for t in ends)
        rates[workers] = (len(ends) - first) / (ends[-1] - ends[0])
        units = con.execute("SELECT count(*), sum(attempts > 1) FROM unit WHERE stage IN ('explain', 'score')")
        n_units, reclaimed = units.fetchone()
        calls = con.execute("SELECT count(*) FROM llm_call").fetchone()[0]
        twice = con.execute("SELECT count(*) FROM (SELECT feature_id FROM explanation GROUP BY 1 HAVING count(*) > 1)"
                            ).fetchone()[0]  # fmt: skip
        con.close()
        times[workers] = float(span)
        found[workers] = {"units": n_units, "twice": twice + (reclaimed or 0), "calls": calls}
        print(f"--workers {workers}: {span:.1f}s for {n_units} units ({rates[workers]:.2f} units/s once running), "
              f"{calls} LLM calls")  # fmt: skip
    return {"process_workers_speedup": rates[2] / rates[1], "process_workers_wall": times[1] / times[2],
            "process_units_done_twice": found[2]["twice"],
            "process_calls_equal": found[1]["calls"] == found[2]["calls"]}  # fmt: skip


# -- the dry run's estimate -----------------------------------------------------------------------------------


def dry_run_error(root: Path, base: Path, model: Path, n: int) -> dict[str, float]:
    from autointerp.config import load_config
    from autointerp.run.estimate import estimate
    from autointerp.run.job import PipelineJob as Job
    from autointerp.store import open_store

    db = root / "dry.sqlite"
    copy_db(base, db)
    # the local SmolLM2 as LLM: the estimate counts with its tokenizer, the calls report its real token counts
    cfg = load_config(write_config(root, db, model, n, {"backend": "local", "model": "smollm2-135m-instruct"},
                                   name="dry"), {"score.methods": ["detection"]})  # fmt: skip
    store = open_store(cfg.db)
    est = estimate(cfg, store, ["explain", "score"])
    predicted = sum(p.prompt_tokens for p in est)
    Job(cfg, store, stages=["explain", "score"]).run()
    con = sqlite3.connect(db)
    actual = con.execute("SELECT sum(prompt_tokens) FROM llm_call").fetchone()[0] or 0
    entries = con.execute("SELECT count(*), sum(length(response)) FROM llm_cache").fetchone()
    con.close()
    return {"dry_run_error": predicted / actual - 1 if actual else float("nan"), "predicted_prompt_tokens": predicted,
            "actual_prompt_tokens": actual, "cache_entries": entries[0]}  # fmt: skip


# The tables the explain, score and intervene stages write (with their response cache and bookkeeping); the rest
# is the collection: contexts, features and their records.
JOB_TABLES = {"explanation", "score", "verdict", "intervention", "llm_cache", "llm_call", "unit", "run", "review"}


def sizes(db: Path) -> dict[str, float]:
    """cache_bytes_per_logprob_entry; db_bytes_per_scored_feature (the file over the features with a score); and,
    from SQLite's page counts (dbstat), job_bytes_per_scored_feature (what the explain, score and intervene stages
    wrote, indexes included) and collect_bytes_per_feature (the rest, over every collected feature)."""
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    from autointerp.store.llm_log import unpack

    # an entry's stored size: key, request and response (compressed since the cache shrank) and the other columns
    rows = con.execute("SELECT request, length(key) + length(backend) + length(model) + length(request) "
                       "+ length(response) + length(created_at) FROM llm_cache").fetchall()  # fmt: skip
    logprob = [n for req, n in rows if unpack(json.loads(req)).get("kind") == "logprobs"]
    scored = con.execute("SELECT count(DISTINCT feature_id) FROM score").fetchone()[0]
    features = con.execute("SELECT count(*) FROM feature").fetchone()[0]
    table_of = dict(con.execute("SELECT name, tbl_name FROM sqlite_schema WHERE type IN ('table', 'index')"))
    pages = con.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").fetchall()
    con.close()
    job = sum(n for name, n in pages if table_of.get(name, name) in JOB_TABLES)
    collect = sum(n for _name, n in pages) - job
    return {"cache_bytes_per_logprob_entry": sum(logprob) / len(logprob) if logprob else 0.0,
            "db_bytes_per_scored_feature": db.stat().st_size / scored if scored else 0.0,
            "job_bytes_per_scored_feature": job / scored if scored else 0.0,
            "collect_bytes_per_feature": collect / features if features else 0.0}  # fmt: skip


def main() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes-of", type=Path, metavar="DB", help="only the size figures of this SQLite database "
                    "(e.g. the demo's db/autointerp.sqlite)")  # fmt: skip
    args = ap.parse_args()
    if args.sizes_of:
        if not args.sizes_of.is_file():
            raise SystemExit(f"--sizes-of {args.sizes_of}: no such database file")
        print(" ".join(f"{k}={v:.0f}" for k, v in sizes(args.sizes_of).items()))
        return
    n = 16 if args.quick else 64
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        root = Path(tmp)
        model = tiny_model(root)
        base = root / "base.sqlite"
        from autointerp.collect.run import run_collect
        from autointerp.config import load_config
        from autointerp.store import open_store

        cfg = load_config(write_config(root, base, model, n, {"backend": "fake"}, name="base"))
        run_collect(cfg, open_store(cfg.db))
        ratio, t_stages, t_runner = runner_ratio(root, base, model, n, delay=0.005)
        print(f"runner: stages by hand {t_stages:.1f}s, autointerp run {t_runner:.1f}s")
        sz = sizes(root / "runner0.sqlite")
        # 0.5 s per request (a real LLM takes 1-5 s): the LLM, not this machine's CPU, is the bottleneck
        two = two_workers(root, base, model, 2 * n, delay=0.5)
        print(f"workers: one {two['one_worker_s']:.1f}s, two {two['two_workers_s']:.1f}s")
        pw = process_workers(root, base, model, n, delay=0.5)
        print(f"process workers: speedup {pw['process_workers_speedup']:.2f}")
        dry = dry_run_error(root, base, model, 4 if args.quick else 12)
        print(
            f"dry run: predicted {dry['predicted_prompt_tokens']} prompt tokens, actual {dry['actual_prompt_tokens']}"
        )
    import postgres  # bench/postgres.py: the collect write phase and an explain run on both databases

    pg = postgres.measure(quick=args.quick, say=lambda line: print(f"postgres: {line}"))
    figures = {"runner_ratio": ratio, **{k: two[k] for k in ("two_worker_speedup", "units_done_twice",
                                                              "calls_per_llm_unit")},
               **pw, "dry_run_error": dry["dry_run_error"], **sz,
               **{k: pg[k] for k in ("postgres_vs_sqlite", "postgres_vs_sqlite_write", "postgres_vs_sqlite_explain",
                                     "rows_equal")}}  # fmt: skip
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
