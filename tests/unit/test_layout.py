"""The layout's rules, held over the source: which part may import which (AST, every import statement, including
those inside functions), that the query commands start without torch, and that no module grows past ~400 lines."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).parents[2] / "autointerp"
STAGES = ("collect", "explain", "score", "intervene", "review")
STDLIB = set(sys.stdlib_module_names)
# The torch-free leaves config may read: site names, the score methods, the stage registry's names, hub names.
CONFIG_READS = (
    "autointerp.subject.names",
    "autointerp.methods",
    "autointerp.jobs.stage",
    "autointerp.jobs.budget",
    "autointerp.subject.hub",
)


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = _module(path).split(".")
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from autointerp import cli` names a module too
    return out


def _files() -> dict[str, set[str]]:
    return {_module(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        for dep in deps:
            if _under(dep, "autointerp.cli") and not _under(mod, "autointerp.cli"):
                bad.append(f"{mod} imports the CLI ({dep})")
            if (
                _under(dep, "autointerp.run")
                and not _under(mod, "autointerp.run")
                and not _under(mod, "autointerp.cli")
            ):
                bad.append(f"{mod} imports the job runner ({dep}): it stands above the stages")
            for a in STAGES:
                for b in STAGES:
                    if a != b and _under(mod, f"autointerp.{a}") and _under(dep, f"autointerp.{b}"):
                        bad.append(f"stage {a} imports stage {b}: {mod} -> {dep}")
            if _under(mod, "autointerp.store") and any(
                _under(dep, x) for x in ("torch", "transformers", "autointerp.llm", "autointerp.subject")
            ):
                bad.append(f"the store imports {dep} ({mod})")
            if _under(mod, "autointerp.llm") and _under(dep, "autointerp.store"):
                bad.append(f"llm/ imports the store ({mod} -> {dep})")
            if _under(mod, "autointerp.subject") and _under(dep, "autointerp.store"):
                bad.append(f"subject/ imports the store ({mod} -> {dep})")
            top = dep.split(".")[0]
            if top == "ray" and mod != "autointerp.jobs.ray_executor":
                bad.append(f"{mod} imports ray ({dep}): only jobs/ray_executor.py may, for --engine ray alone")
            if top == "rich" and not _under(mod, "autointerp.cli"):
                bad.append(f"{mod} imports rich ({dep}): all terminal rendering lives in cli/")
            if mod == "autointerp.metrics" and top not in STDLIB and top != "numpy" and top != "__future__":
                bad.append(f"metrics imports {dep}: only numpy and the standard library are allowed")
            if mod == "autointerp.methods" and top not in STDLIB and top != "__future__":
                bad.append(f"methods is a standard-library leaf but imports {dep}")
            if (
                mod == "autointerp.config"
                and top == "autointerp"
                and not any(_under(dep, leaf) for leaf in CONFIG_READS)
            ):
                bad.append(f"config is a leaf but imports {dep}")
    return sorted(set(bad))


def test_import_rules_hold() -> None:
    assert violations(_files()) == []


@pytest.mark.parametrize(
    ("mod", "dep", "rule"),
    [
        ("autointerp.explain.run", "autointerp.cli", "imports the CLI"),
        ("autointerp.score.run", "autointerp.run.job", "imports the job runner"),
        ("autointerp.score.run", "autointerp.explain.run", "stage score imports stage explain"),
        ("autointerp.store.queries", "torch", "the store imports torch"),
        ("autointerp.store.llm_log", "autointerp.llm.client", "the store imports autointerp.llm.client"),
        ("autointerp.llm.client", "autointerp.store.engine", "llm/ imports the store"),
        ("autointerp.metrics", "scipy.stats", "metrics imports scipy.stats"),
        ("autointerp.jobs.loop", "ray", "imports ray"),
        ("autointerp.config", "autointerp.store.engine", "config is a leaf"),
        ("autointerp.methods", "autointerp.config", "methods is a standard-library leaf"),
        ("autointerp.methods", "numpy", "methods is a standard-library leaf"),
        ("autointerp.review.pages", "rich.text", "all terminal rendering lives in cli/"),
        ("autointerp.query.search", "rich", "all terminal rendering lives in cli/"),
    ],
)
def test_each_rule_catches_its_break(mod: str, dep: str, rule: str) -> None:
    graph = _files()
    graph[mod] = graph.get(mod, set()) | {dep}
    assert any(rule in v for v in violations(graph)), violations(graph)


def test_relative_and_function_level_imports_are_seen(tmp_path: Path) -> None:
    pkg = tmp_path / "autointerp" / "score"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("def g():\n    from ..explain import run\n    import torch\n", encoding="utf-8")
    global PKG
    saved, PKG = PKG, tmp_path / "autointerp"
    try:
        found = imports_of(f)
    finally:
        PKG = saved
    assert {"autointerp.explain", "autointerp.explain.run", "torch"} <= found


def test_methods_and_config_import_nothing_heavy() -> None:
    """The registry of score methods loads the standard library alone; the config adds pydantic, never a database
    driver, numpy or torch."""
    probe = (
        "import json, sys; b = set(sys.modules); import autointerp.methods; m = set(sys.modules); "
        "import autointerp.config; print(json.dumps([sorted(m - b), sorted(set(sys.modules) - b)]))"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    by_methods, by_config = (({n.split(".")[0] for n in names}) for names in json.loads(res.stdout))
    assert "autointerp" in by_methods
    assert by_methods - STDLIB - {"autointerp"} == set()
    assert by_config & {"torch", "numpy", "sqlalchemy", "sqlmodel", "transformers"} == set()


# SQL is the store's. Outside autointerp/store, a module imports neither SQLAlchemy nor SQLModel, runs no statement
# (text(), exec_driver_sql(), an execute of a string), reaches no engine or session of the store (`.engine`,
# `.session()`, `.connection()`), and holds no SQL statement in a string (docstrings aside). The one exception:
SQL_IMPORTS_ALLOWED = {
    # error classes only, to catch what a database refused (the review app answers a refused write; the embedding
    # backfill stops on a read-only database): no statement is written with them
    "sqlalchemy.exc",
}
_SQL_WORDS = re.compile(
    r"\b(select\s[\s\S]*?\bfrom\s+\w+|insert\s+into|update\s+\w+\s+set|delete\s+from|"
    r"create\s+(table|index|view|trigger|virtual)|drop\s+(table|index|view)|alter\s+table|pragma\s+\w+|begin\s+immediate)\b",
    re.IGNORECASE,
)
_RUNS_SQL = {"text", "exec_driver_sql", "execute", "executemany", "executescript"}


def _string_of(node: ast.AST) -> str | None:
    """The text of a string literal or f-string (its holes as `x`), or None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "x" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        a, b = _string_of(node.left), _string_of(node.right)
        return None if a is None and b is None else (a or "x") + (b or "x")
    return None


def sql_violations(mod: str, source: str) -> list[str]:
    """The SQL rules above, and one more that holds inside the store too: only store/dialect.py asks which database
    it talks to (`.dialect.name`, `.dialect.driver`); every other module asks its Dialect object."""
    tree = ast.parse(source)
    bad = []
    if mod != "autointerp.store.dialect":
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("name", "driver")
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "dialect"
            ):
                bad.append(f"{mod}:{node.lineno} reads the dialect's {node.attr}: ask store/dialect.py's object")
    if _under(mod, "autointerp.store"):
        return bad
    docs = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        and n.body
        and isinstance(n.body[0], ast.Expr)
    }
    inside_fstrings = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    for node in ast.walk(tree):
        line = f"{mod}:{getattr(node, 'lineno', '?')}"
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        for name in names:
            if name.split(".")[0] in ("sqlalchemy", "sqlmodel") and name not in SQL_IMPORTS_ALLOWED:
                bad.append(f"{line} imports {name}: SQL is the store's")
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            literal = bool(node.args) and _string_of(node.args[0]) is not None
            if called == "exec_driver_sql" or (called in _RUNS_SQL and literal):
                bad.append(f"{line} runs SQL ({called}): SQL is the store's")
            if called in ("session", "connection") and isinstance(func, ast.Attribute):
                bad.append(f"{line} opens a database {called}: ask a store function")
        if isinstance(node, ast.Attribute) and node.attr == "engine":
            bad.append(f"{line} reaches a store's engine: ask a store function")
        if id(node) not in docs and id(node) not in inside_fstrings:
            text = _string_of(node) if isinstance(node, ast.Constant | ast.JoinedStr) else None
            if text is not None and _SQL_WORDS.search(text):
                bad.append(f"{line} holds an SQL statement in a string: SQL is the store's")
    return bad


def test_no_sql_outside_the_store() -> None:
    found = [v for p in sorted(PKG.rglob("*.py")) for v in sql_violations(_module(p), p.read_text(encoding="utf-8"))]
    assert found == []


@pytest.mark.parametrize(
    ("source", "rule"),
    [
        ("from sqlalchemy import text\n", "imports sqlalchemy"),
        ("import sqlmodel\n", "imports sqlmodel"),
        ("from sqlalchemy.orm import Session\n", "imports sqlalchemy.orm"),
        ("def f(conn):\n    conn.exec_driver_sql(q)\n", "runs SQL (exec_driver_sql)"),
        ("def f(conn):\n    conn.execute(f'DELETE FROM {t}')\n", "runs SQL (execute)"),
        ("def f(db):\n    db.executescript('x' + y)\n", "runs SQL (executescript)"),
        ("def f(t):\n    return t('anything')\n", None),  # a call named t: not text
        ("Q = 'select key from feature where id = 1'\n", "holds an SQL statement"),
        ("def f(c):\n    q = f'SELECT {cols} FROM feature'\n", "holds an SQL statement"),
        ("def f(store):\n    return store.engine\n", "reaches a store's engine"),
        ("def f(store):\n    with store.session() as s:\n        pass\n", "opens a database session"),
        ("def f(conn):\n    return conn.dialect.name == 'sqlite'\n", "reads the dialect's name"),
        ("from sqlalchemy.exc import DBAPIError\n", None),  # the allowed import
        ('def f():\n    """SELECT ... FOR UPDATE SKIP LOCKED, from the docs."""\n', None),  # a docstring
        ("MSG = 'select a feature from the list'\n", "holds an SQL statement"),  # prose that reads as SQL: caught
    ],
)
def test_the_sql_rule_catches_its_break(source: str, rule: str | None) -> None:
    found = sql_violations("autointerp.review.x", source)
    if rule is None:
        assert found == []
    else:
        assert any(rule in v for v in found), found
    # the store may do all of it but read the dialect's name
    assert all("dialect" in v for v in sql_violations("autointerp.store.x", source))


def test_no_module_over_400_lines() -> None:
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 430}
    assert long == {}


_PROBE = """
import json, sys
from autointerp.cli import main
sys.argv = ["autointerp", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print("\\nPROBE " + json.dumps({"code": code, "heavy": heavy}))
"""


@pytest.mark.parametrize(
    "args",
    [
        ["features", "list", "--limit", "3"],
        ["features", "list", "--json", "--sort", "score"],
        ["features", "show", "blocks.1.mlp.post/neurons/5"],
        ["features", "show", "blocks.1.mlp.post/neurons/5", "--json"],
        ["usage"],
        ["status"],
        ["status", "--json"],
        ["export", "--format", "jsonl"],
        ["export", "--format", "neuronpedia"],
    ],
)
def test_query_commands_never_import_torch(collected_db: str, args: list[str]) -> None:
    demo = Path(__file__).parents[2] / "autointerp.toml"
    argv = [*args, "--config", str(demo), "--db", collected_db]
    res = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv)], capture_output=True, text=True, timeout=120)
    probe = json.loads(res.stdout.rsplit("PROBE ", 1)[1])
    assert probe == {"code": 0, "heavy": []}, res.stdout[-2000:] + res.stderr[-2000:]
