"""Any flag, no traceback: every command of the typer app, with bad values for its options (types, ranges, paths that
are directories, devices, FIFOs, symlinks, missing directories, non-UTF-8 files), answers `error: ...` (or click's
own usage error) naming the input, with exit code 2, before a model loads, and leaves the database as it was.

The commands are enumerated from the app: a command without a row in CASES fails the test, so a new command is
covered the day it is added."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# command -> (arguments, a fragment the answer must hold: what names the input). {db}: the collected database,
# {new}: a path where no database is (must still not be there after), {dir}, {fifo}, {nonutf8}, {missing},
# {link}: a symlink to a directory, {file}: a plain text file, {null}: a character device.
CASES: dict[str, list[tuple[list[str], str]]] = {
    "collect": [
        (["--db", "sqlite:///{new}", "--corpus", "{missing}"], "nope"),
        (["--db", "sqlite:///{new}", "--corpus", "{fifo}"], "fifo"),
        (["--db", "sqlite:///{new}", "--corpus", "{nonutf8}"], "not valid UTF-8"),
        (["--db", "sqlite:///{new}", "--corpus", "{null}"], "null"),
        (["--db", "sqlite:///{new}", "--sae", "{missing}"], "nope"),
        (["--db", "sqlite:///{new}", "--sae", "{file}"], "not a directory"),
        (["--db", "sqlite:///{new}", "--sae", "{dir}"], "cfg.json"),
        (["--db", "sqlite:///{new}", "--model", "{missing}"], "nope"),
        (["--db", "sqlite:///{new}", "--model", "{dir}"], "has no config.json"),
        (["--db", "sqlite:///{new}", "--model", "{file}"], "is not a GGUF file"),
        (["--db", "sqlite:///{new}", "--model", "{fifo}"], "not a model directory or a .gguf file"),
        (["--db", "sqlite:///{new}", "--sites", "blocks.99.mlp.post"], "layer 99 out of range"),
        (["--db", "sqlite:///{new}", "--device", "gpu7"], "gpu7"),
        (["--db", "sqlite:///{new}", "--batch-size", "0"], "batch_size"),
        (["--db", "sqlite:///{new}", "--batch-size", "lots"], "--batch-size"),
        (["--db", "sqlite:///{new}", "--tokens", "-5"], "max_tokens"),
        (["--db", "sqlite:///{new}", "--sites", "blocks.x.mlp"], "blocks.x.mlp"),
        (["--db", "sqlite:///{dir}"], "is a directory"),
        (["--db", "sqlite:///{new}", "--config", "{dir}"], "is a directory"),
        (["--db", "sqlite:///{new}", "--config", "{nonutf8}"], "not UTF-8"),
    ],
    "sae train": [
        (["--db", "sqlite:///{new}", "--out", "{file}"], "not a directory"),
        (["--db", "sqlite:///{new}", "--out", "{dir}/sae", "--width", "0"], "width"),
        (["--db", "sqlite:///{new}", "--out", "{dir}/sae", "--k", "0"], "sae_train.k"),
        (["--db", "sqlite:///{new}", "--out", "{dir}/sae", "--tokens", "5"], "sae_train.tokens"),
        (["--db", "sqlite:///{new}", "--out", "{dir}/sae", "--site", "nowhere"], "nowhere"),
        (["--db", "sqlite:///{new}", "--out", "{dir}/sae", "--model", "{missing}"], "nope"),
        (["--db", "sqlite:///{new}", "--out", "{dir}/sae", "--model", "{dir}"], "has no config.json"),
        (["--db", "sqlite:///{new}", "--out", "{dir}/sae", "--site", "blocks.99.resid.post"], "layer 99"),
        (["--db", "sqlite:///{new}", "--out", "{dir}/sae", "--epochs", "-1"], "epochs"),
    ],
    "steer": [
        (["neurons/1", "--prompt", "Hi", "--db", "{db}", "--mode", "twist"], "twist"),
        (["neurons/99999", "--prompt", "Hi", "--db", "{db}"], "neurons/99999"),
        (["neurons/1", "--prompt", "Hi", "--db", "{db}", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["neurons/1", "--prompt", "Hi", "--db", "{db}", "--strength", "nan"], "nan"),
        (["neurons/1", "--prompt", "Hi", "--db", "{db}", "--target-kl", "-1"], "-1"),
        (["neurons/1", "--prompt", "Hi", "--db", "sqlite:///{new}"], "no database"),
    ],
    "explain": [
        (["--db", "{db}", "--limit", "0"], "limit"),
        (["--db", "{db}", "--limit", "many"], "--limit"),
        (["--db", "{db}", "--explainer", "oracle"], "oracle"),
        (["--db", "{db}", "--llm", "nosuch"], "nosuch"),
        (["--db", "{db}", "--features", "neurons/99999"], "neurons/99999"),
        (["--db", "sqlite:///{new}"], "no database"),
    ],
    "score": [
        (["--db", "{db}", "--method", "vibes"], "vibes"),
        (["--db", "{db}", "--limit", "-1"], "limit"),
        (["--db", "{db}", "--llm", "nosuch"], "nosuch"),
        (["--db", "sqlite:///{new}"], "no database"),
    ],
    "intervene": [
        (["--db", "{db}", "--llm", "nosuch"], "nosuch"),
        (["--db", "{db}", "--limit", "0"], "limit"),
        (["--db", "{db}", "--features", "neurons/99999"], "neurons/99999"),
        (["--db", "sqlite:///{new}"], "no database"),
    ],
    "features list": [
        (["--db", "{db}", "--limit", "0"], "limit"),
        (["--db", "{db}", "--limit", "-5"], "limit"),
        (["--db", "{db}", "--limit", "99999999999999999999"], "99999999999999999999"),
        (["--db", "{db}", "--min-score", "nan"], "nan"),
        (["--db", "{db}", "--max-score", "inf"], "inf"),
        (["--db", "{db}", "--sort", "size"], "size"),
        (["--db", "{db}", "--site", "blocks.9.mlp.post"], "blocks.9.mlp.post"),
        (["--db", "{db}", "--source", "sae-nope"], "sae-nope"),
        (["--db", "{db}", "--status", "zombie"], "zombie"),
        (["--db", "{db}", "--explainer", "nope"], "nope"),
        (["--db", "{db}", "--verdict", "maybe"], "maybe"),
        (["--db", "{db}", "--method", "vibes"], "vibes"),
        (["--db", "sqlite:///{new}"], "no database"),
        (["--db", "sqlite:///{missing}/x/y.sqlite"], "does not exist"),
        (["--db", "sqlite:///"], "names no file"),
        (["--db", "sqlite:///{dir}"], "is a directory"),
        (["--db", "sqlite:///{empty}"], "empty file"),
        (["--db", "sqlite:///{nonutf8}"], "not a SQLite database"),
        (["--db", "{db}", "--config", "{dir}"], "is a directory"),
        (["--db", "{db}", "--config", "{nonutf8}"], "not UTF-8"),
        (["--db", "{db}", "--config", "{link}"], "is a directory"),
        (["--db", "{db}", "--config", "{missing}"], "not found"),
    ],
    "features show": [
        (["_eurons/1", "--db", "{db}"], "_eurons/1"),
        (["%", "--db", "{db}"], "'%'"),
        (["neurons/1", "--db", "{db}", "--per-role", "-1"], "--per-role"),
        (["neurons/1", "--db", "sqlite:///{new}"], "no database"),
    ],
    "llm check": [
        (["--llm", "nosuch"], "nosuch"),
        (["--config", "{dir}"], "is a directory"),
    ],
    "usage": [
        (["--db", "sqlite:///{new}"], "no database"),
        (["--db", "{db}", "--config", "{nonutf8}"], "not UTF-8"),
    ],
    "search": [
        (["", "--db", "{db}"], "empty"),
        (["state", "--db", "{db}", "--limit", "0"], "limit"),
        (["state", "--db", "{db}", "--limit", "99999999999999999999"], "99999999999999999999"),
        (["state", "--db", "{db}", "--min-score", "nan"], "nan"),
        (["state", "--db", "{db}", "--verdict", "maybe"], "maybe"),
        (["state", "--db", "sqlite:///{new}"], "no database"),
    ],
    "export": [
        (["--db", "{db}", "--out", "{dir}"], "is a directory"),
        (["--db", "{db}", "--out", "{link}"], "is a directory"),
        (["--db", "{db}", "--out", "{missing}/x.jsonl"], "does not exist"),
        (["--db", "{db}", "--format", "csv"], "csv"),
        (["--db", "{db}", "--min-score", "nan"], "nan"),
        (["--db", "{db}", "--features", "neurons/99999"], "neurons/99999"),
        (["--db", "sqlite:///{new}"], "no database"),
    ],
    "inspect": [
        (["hello", "--db", "{db}", "--top", "0"], "--top"),
        (["hello", "--db", "{db}", "--device", "gpu7"], "gpu7"),
        (["hello", "--db", "{db}", "--sites", "blocks.7.mlp.post"], "blocks.7.mlp.post"),
        (["hello", "--db", "{db}", "--model", "other"], "other"),
        (["   ", "--db", "{db}"], "empty"),
        (["hello", "--db", "sqlite:///{new}"], "no database"),
    ],
    "run": [
        (["--db", "{db}", "--stages", "explain,polish"], "polish"),
        (["--db", "{db}", "--for", "5 parsecs"], "5 parsecs"),
        (["--db", "{db}", "--until", "25:00"], "25:00"),
        (["--db", "{db}", "--budget-usd", "-1"], "--budget-usd"),
        (["--db", "{db}", "--max-calls", "-1"], "--max-calls"),
        (["--db", "{db}", "--workers", "0"], "--workers"),
        (["--db", "{db}", "--workers", "1000"], "--workers"),
        (["--db", "sqlite://", "--workers", "2", "--stages", "explain"], "in-memory database"),
        (["--db", "sqlite:///{new}", "--stages", "explain,score"], "no database"),
        (["--db", "sqlite:///{new}", "--stages", "collect", "--config", "{corpus_missing}"], "nope"),
    ],
    "status": [
        (["--db", "sqlite:///{new}"], "no database"),
        (["--db", "{db}", "--watch", "--every", "0"], "--every"),
        (["--db", "{db}", "--every", "-1"], "--every"),
    ],
    "review": [
        (["--db", "{db}", "--port", "99999"], "99999"),
        (["--db", "{db}", "--token", "short"], "--token"),
        (["--db", "sqlite:///{new}"], "no database"),
    ],
}


def _commands() -> set[str]:
    import typer.main

    from autointerp.cli import app

    def walk(cmd: Any, path: tuple[str, ...]) -> list[str]:
        if hasattr(cmd, "commands"):
            return [n for name, c in cmd.commands.items() for n in walk(c, (*path, name))]
        return [" ".join(path)]

    return set(walk(typer.main.get_command(app), ()))


def test_every_command_has_bad_input_cases() -> None:
    assert _commands() == set(CASES), "give each command (and no other) its bad-input cases in CASES"


@pytest.fixture()
def places(tmp_path: Path) -> dict[str, str]:
    d = tmp_path / "adir"
    d.mkdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    nonutf8 = tmp_path / "latin1.txt"
    nonutf8.write_bytes("caf\xe9 = 1\n".encode("latin-1") * 400)
    text = tmp_path / "plain.txt"
    text.write_text("The state of the Union.\n", encoding="utf-8")
    link = tmp_path / "link"
    link.symlink_to(d, target_is_directory=True)
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    corpus_missing = tmp_path / "corpus-missing.toml"
    corpus_missing.write_text(f'[corpus]\nsource = "{tmp_path / "nope"}"\n', encoding="utf-8")
    null = tmp_path / "null"
    try:
        os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of our own
    except (PermissionError, OSError):
        null = Path("/dev/null")  # read only, never written, by the case that uses it
    return {"new": str(tmp_path / "new" / "x.sqlite"), "dir": str(d), "fifo": str(fifo), "nonutf8": str(nonutf8),
            "missing": str(tmp_path / "nope"), "link": str(link), "file": str(text), "empty": str(empty),
            "corpus_missing": str(corpus_missing), "null": str(null)}  # fmt: skip


@pytest.fixture()
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Bad input is refused before any model loads: a load here fails the case (as a traceback)."""
    import sys

    import autointerp.subject.model as model

    def loaded(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a model was loaded before the bad input was refused")

    original = model.load_subject
    for mod in list(sys.modules.values()):
        if getattr(mod, "load_subject", None) is original:
            monkeypatch.setattr(mod, "load_subject", loaded)
    yield
    # A module first imported during the case bound the stand-in (`from ... import load_subject`): monkeypatch
    # does not know it, and later tests would find it there.
    for mod in list(sys.modules.values()):
        if getattr(mod, "load_subject", None) is loaded:
            mod.load_subject = original  # type: ignore[attr-defined]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("command", "args", "fragment"),
    [(c, a, f) for c, rows in CASES.items() for a, f in rows],
    ids=[f"{c}:{' '.join(a)}" for c, rows in CASES.items() for a, _f in rows],
)
def test_bad_values_get_an_error_naming_them(
    command: str,
    args: list[str],
    fragment: str,
    places: dict[str, str],
    collected_db: str,
    no_model_loads: None,
    run_main: Any,
) -> None:
    db_file = Path(collected_db.removeprefix("sqlite:///"))
    before = _digest(db_file)
    values = places | {"db": collected_db}
    argv = [*command.split(), *(a.format(**values) for a in args)]
    code, out, err = run_main(argv)
    text = out + err
    assert code == 2, (argv, text)
    assert "Traceback" not in text, text
    assert "error:" in text or "Error: Invalid value" in text or "Error: No such option" in text, text
    assert fragment.format(**values) in text, (fragment, text)
    assert _digest(db_file) == before, "the database changed"
    assert not Path(places["new"]).exists() and not Path(places["new"]).parent.exists(), "a database was created"
