"""The test suite's own layout: every test file in tests/unit (fakes, tiny modules, no server, no real model),
tests/integration (real SmolLM2, real PostgreSQL, llama.cpp) or tests/browser (Chromium); no test file imports
another test file or a helper module of the tests (what they share is in a conftest.py, as fixtures, or in the
library's fake backend); and the guard of tests/unit/conftest.py fails a unit test that starts PostgreSQL or loads
SmolLM2, shown on planted tests run by a pytest of their own."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parents[1]
LEVELS = ("unit", "integration", "browser")


def test_every_test_file_is_in_a_level() -> None:
    files = sorted(TESTS.rglob("test_*.py"))
    assert files
    assert [str(f.relative_to(TESTS)) for f in files if f.relative_to(TESTS).parts[0] not in LEVELS] == []


def _suite_imports(path: Path, root: Path, local: set[str]) -> list[str]:
    """The imports of `path` (every statement, inside functions too) that name a module of the tests: a test file, a
    conftest, any other .py file under `root` (`local`, by name), a relative import, or the `tests` package."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = ["." if node.level else (node.module or "")]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if name == "." or top == "tests" or top == "conftest" or top.startswith("test_") or top in local:
                bad.append(f"{path.relative_to(root)}:{node.lineno} imports {name}")
    return bad


def _violations(root: Path) -> list[str]:
    local = {p.stem for p in root.rglob("*.py")}
    return [v for f in sorted(root.rglob("*.py")) for v in _suite_imports(f, root, local)]


def test_no_test_file_imports_another() -> None:
    assert _violations(TESTS) == []


@pytest.mark.parametrize(
    "planted",
    [
        "from test_search import seed\n",
        "from tests.unit.test_scorers import slot_rule\n",
        "import cli_helper\n",
        "def f():\n    from conftest import SPEECH\n",
        "from . import helpers\n",
        "import tests\n",
    ],
)
def test_a_planted_import_is_caught(tmp_path: Path, planted: str) -> None:
    root = tmp_path / "tests"
    (root / "unit").mkdir(parents=True)
    (root / "unit" / "cli_helper.py").write_text("X = 1\n", encoding="utf-8")
    (root / "unit" / "test_a.py").write_text("import json\n\nfrom autointerp.store import open_store\n")
    assert _violations(root) == []
    (root / "unit" / "test_b.py").write_text(planted, encoding="utf-8")
    assert [v.split(":")[0] for v in _violations(root)] == ["unit/test_b.py"]


# -- the guard of tests/unit/conftest.py, on planted tests in a copy of the suite's conftest files

PLANTED_UNIT = '''
from pathlib import Path


def test_starts_postgresql(postgres_db):
    pass


def test_uses_the_server_url(postgres_server):
    pass


def test_uses_smol_dir(smol_dir):
    pass


def test_uses_smol_subject(smol_subject):
    pass


def test_loads_the_default_model():
    from autointerp.subject.model import load_subject

    load_subject("smollm2-135m-instruct")


def test_the_local_llm_backend_generates_with_it():
    from autointerp.llm.base import BackendSpec, make_backend
    from autointerp.llm.client import LLMClient
    from autointerp.llm.types import ChatRequest, Message

    client = LLMClient(make_backend(BackendSpec(backend="local", model="smollm2-135m-instruct")))
    client.chat_many([ChatRequest(messages=(Message("user", "hi"),), max_tokens=2)])


def _converted_copy_in(home: Path) -> Path:
    """A converted copy of SmolLM2 planted in a fresh home: materialize returns it without reading any weights."""
    from autointerp.subject.files import DEFAULT_MODEL, converted_dir, resolve

    out = converted_dir(resolve(DEFAULT_MODEL), home=home)
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    return out


def test_materializes_the_default_model(tmp_path, monkeypatch):
    from autointerp.subject.files import DEFAULT_MODEL, materialize, resolve

    monkeypatch.setenv("AUTOINTERP_HOME", str(tmp_path))
    _converted_copy_in(tmp_path)
    materialize(resolve(DEFAULT_MODEL))


def test_another_model_directory_is_fine(tmp_path):
    from autointerp.subject.files import materialize, resolve

    (tmp_path / "config.json").write_text("{}")
    assert materialize(resolve(str(tmp_path))) == tmp_path
'''

PLANTED_INTEGRATION = """
def test_after_a_unit_test_integration_tests_load_it(tmp_path, monkeypatch):
    from autointerp.subject.files import DEFAULT_MODEL, converted_dir, materialize, resolve

    monkeypatch.setenv("AUTOINTERP_HOME", str(tmp_path))
    out = converted_dir(resolve(DEFAULT_MODEL), home=tmp_path)
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    assert materialize(resolve(DEFAULT_MODEL)) == out
"""

REFUSED = {
    "test_starts_postgresql": "unit tests use no server (PostgreSQL): move this test to tests/integration",
    "test_uses_the_server_url": "unit tests use no server (PostgreSQL): move this test to tests/integration",
    "test_uses_smol_dir": "unit tests use no real model (SmolLM2's weights): move this test to tests/integration",
    "test_uses_smol_subject": "unit tests use no real model (SmolLM2's weights): move this test to tests/integration",
    "test_loads_the_default_model": "move this test to tests/integration (it loads smollm2-135m-instruct",
    "test_the_local_llm_backend_generates_with_it": "move this test to tests/integration (it loads smollm2",
    "test_materializes_the_default_model": "move this test to tests/integration (it loads smollm2-135m-instruct",
}


def test_the_unit_guard_fails_a_unit_test_that_starts_postgresql_or_loads_smollm2(tmp_path: Path) -> None:
    root = tmp_path / "suite"
    for part in ("unit", "integration"):
        (root / "tests" / part).mkdir(parents=True)
    shutil.copy(TESTS / "conftest.py", root / "tests" / "conftest.py")
    shutil.copy(TESTS / "unit" / "conftest.py", root / "tests" / "unit" / "conftest.py")
    (root / "tests" / "unit" / "test_planted.py").write_text(PLANTED_UNIT, encoding="utf-8")
    (root / "tests" / "integration" / "test_planted_after.py").write_text(PLANTED_INTEGRATION, encoding="utf-8")
    (root / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    # the unit file first: the integration test runs after the guard was installed, and must not meet it
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q", "tests/unit", "tests/integration"]
    env = dict(os.environ, COLUMNS="1000")  # the summary lines whole
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    outcome = {}
    for line in out.splitlines():
        for word in ("PASSED", "FAILED", "ERROR"):
            if line.startswith(word + " ") and "::" in line:
                outcome[line.split("::")[1].split()[0]] = (word, line)
    for name, message in REFUSED.items():
        word, line = outcome[name]
        assert word in ("FAILED", "ERROR") and message in line, (name, line)
    assert outcome["test_another_model_directory_is_fine"][0] == "PASSED", out
    assert outcome["test_after_a_unit_test_integration_tests_load_it"][0] == "PASSED", out
