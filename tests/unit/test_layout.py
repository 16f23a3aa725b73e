"""The layout's rules, held over the source: which part may import which (AST, every import statement, including
those inside functions), that the query commands start without torch, and that no module grows past ~400 lines."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).parents[2] / "autointerp"
STAGES = ("collect", "explain", "score", "intervene", "review")
STDLIB = set(sys.stdlib_module_names)
# The torch-free leaves config may read: site names, the score methods, and the stage registry's names.
CONFIG_READS = ("autointerp.subject.names", "autointerp.methods", "autointerp.jobs.stage", "autointerp.jobs.budget")


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
