"""The whole pipeline through the CLI (as processes) on a small fixed config, reduced to a digest of its result
rows and compared with a committed golden digest. A refactor that changes no behaviour leaves every table's
digest unchanged; one that changes a number, a text, a status or which rows exist changes it (and names the
table).

Rows are read with sqlite3, not the ORM, and keyed by natural keys (feature key, context index, explanation
identity), so the digest depends only on what the database holds. What a rerun may change is left out: row ids,
run ids, timestamps, durations. Update the golden file, after checking why it changed, with
AUTOINTERP_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

GOLDEN = Path(__file__).parents[1] / "golden" / "pipeline_digest.json"
TABLES = ("context", "feature", "record", "explanation", "score", "intervention", "verdict")
VOLATILE = {"id", "run_id", "created_at", "updated_at", "finished_at", "started_at", "seconds", "latency_s"}
SPEECH = (
    "The state of the Union is strong. We will build roads, schools and hospitals in every State.\n\n"
    "In 1862 the Congress passed 37 acts; in 1863 it passed 41. Our nation's café owners pay 12 per cent.\n"
    "Fellow-Citizens of the Senate and House of Representatives: peace, commerce and honest friendship.\n"
)


def _round(x: Any) -> Any:
    """Floats to 6 significant digits (JSON round trips and summation order move the last bits, not the result)."""
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items() if k not in ("intervention_id",)}
    if isinstance(x, list):
        return [_round(v) for v in x]
    return x


def table_digests(db: Path) -> dict[str, dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    feature = {r["id"]: r["key"] for r in con.execute("SELECT id, key FROM feature")}
    context = {r["id"]: r["idx"] for r in con.execute("SELECT id, idx FROM context")}
    expl = {
        r["id"]: [feature[r["feature_id"]], r["explainer"], r["model"], r["prompt_hash"], r["config_hash"]]
        for r in con.execute("SELECT * FROM explanation")
    }
    score = {
        r["id"]: [*expl[r["explanation_id"]], r["method"], r["model"], r["config_hash"]]
        for r in con.execute("SELECT * FROM score")
    }
    refs = {"feature_id": feature, "context_id": context, "explanation_id": expl}
    refs |= {"causal_score_id": score, "correlational_score_id": score}
    out: dict[str, dict[str, Any]] = {}
    for table in TABLES:
        rows = []
        for r in con.execute(f"SELECT * FROM {table}"):  # noqa: S608 (fixed table names)
            row: dict[str, Any] = {}
            for k in r.keys():  # noqa: SIM118 (sqlite3.Row)
                v = r[k]
                if k in VOLATILE:
                    continue
                if k in refs:
                    v = refs[k].get(v)
                elif isinstance(v, bytes):
                    v = hashlib.sha256(v).hexdigest()[:16]
                elif isinstance(v, str) and v[:1] in "[{":
                    with contextlib.suppress(json.JSONDecodeError):
                        v = json.loads(v)
                row[k] = _round(v)
            rows.append(json.dumps(row, sort_keys=True, ensure_ascii=False))
        rows.sort()
        out[table] = {"rows": len(rows), "digest": hashlib.sha256("\n".join(rows).encode()).hexdigest()[:20]}
    con.close()
    return out


def _config(tmp: Path, model: Path, corpus: Path) -> Path:
    cfg = tmp / "pipeline.toml"
    cfg.write_text(
        f"""db = "sqlite:///{tmp / "db.sqlite"}"
[model]
name = "{model}"
[corpus]
source = "{corpus}"
ctx_len = 24
max_tokens = 3000
[collect]
sites = ["blocks.1.mlp.post"]
planted = true
batch_size = 8
top_k = 8
n_quantiles = 3
per_quantile = 2
n_random = 6
[explain]
llm = "fake"
features = "sample"
limit = 6
[score]
llm = "fake"
max_per_role = 3
[intervene]
llm = "fake"
explainer = "llm"
target_kl = 0.05
n_prompts = 4
max_new_tokens = 6
[llm.fake]
backend = "fake"
model = "scripted"
""",
        encoding="utf-8",
    )
    return cfg


# The same numbers on every x86-64 machine: float sums differ in their last bits between CPUs (AVX2, AVX-512 and
# AMX machines pick other kernels), and a last bit can reorder two records with nearly equal activations, which
# changes rows. The pipeline therefore runs in processes whose kernels take one code path everywhere: ATen's
# portable (non-vectorized) kernels, MKL's conditional numerical reproducibility mode, oneDNN at its base ISA, one
# thread. (The golden digest of the default kernels differed between this workplace's machines.)
SAME_EVERYWHERE = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41",
                   "DNNL_MAX_CPU_ISA": "SSE41", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip


@pytest.mark.slow
def test_pipeline_rows_match_the_golden_digest(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    model = tmp_path / "tiny-gpt2"  # a fixed name: the model id is part of every feature key
    shutil.copytree(tiny_gpt2_dir, model)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text((SPEECH * (3 + i)).replace("1862", str(1800 + 7 * i)), encoding="utf-8")
    cfg = str(_config(tmp_path, model, corpus))
    env = os.environ | SAME_EVERYWHERE
    for args in (
        ["collect"],
        ["explain"],
        ["explain", "--explainer", "tokens"],
        ["score"],
        ["intervene"],
    ):
        res = subprocess.run([sys.executable, "-m", "autointerp.cli", *args, "--config", cfg], env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert res.returncode == 0, (args, res.stderr[-3000:])
    con = sqlite3.connect(tmp_path / "db.sqlite")
    for table, stage in [("explanation", "explain"), ("score", "score"), ("intervention", "intervene"),
                         ("verdict", "intervene")]:  # fmt: skip
        # every result row names the run that wrote it (intervention scores: the intervene run)
        where = " AND t.method != 'intervention'" if table == "score" else ""
        bad = con.execute(
            f"SELECT count(*) FROM {table} t LEFT JOIN run r ON r.id = t.run_id "  # noqa: S608
            f"WHERE (r.id IS NULL OR r.stage != ? OR r.status != 'done'){where}",
            (stage,),
        ).fetchone()[0]
        assert bad == 0, f"{bad} {table} rows without a finished {stage} run"
    con.close()
    got = table_digests(tmp_path / "db.sqlite")
    assert got["explanation"]["rows"] > 0 and got["score"]["rows"] > 0 and got["verdict"]["rows"] > 0, got
    if os.environ.get("AUTOINTERP_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    want = json.loads(GOLDEN.read_text(encoding="utf-8"))
    changed = {t: (want.get(t), got[t]) for t in got if want.get(t) != got[t]}
    assert not changed, f"tables whose rows changed (golden, now): {changed}"
