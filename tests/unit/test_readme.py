"""The README's CLI reference names every command and every flag the typer app knows (a new flag without a line in
the reference fails here), and names no command or flag that does not exist."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer

README = Path(__file__).parents[2] / "README.md"
GLOBAL = {"--db", "--config", "-c", "--help"}  # "Every command takes --db and --config" (the reference's preface)


def _commands() -> dict[str, Any]:
    """Every leaf command of the app by its full name ('features list', 'run', ...)."""
    from autointerp.cli import app

    root = typer.main.get_command(app)
    out: dict[str, Any] = {}

    def walk(cmd: Any, path: list[str]) -> None:
        if hasattr(cmd, "commands"):  # a group (typer vendors its own click: no isinstance against click's)
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        else:
            out[" ".join(path)] = cmd

    walk(root, [])
    return out


def _options(cmd: Any) -> list[Any]:
    return [p for p in cmd.params if p.param_type_name == "option"]


def _reference() -> dict[str, str]:
    """The CLI reference block: command -> its text (continuation lines included, comments dropped)."""
    text = README.read_text(encoding="utf-8")
    block = text.split("## CLI reference", 1)[1].split("```", 2)[1]
    out: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        body = line.split("  #", 1)[0]
        if body.startswith("autointerp "):
            words = body.split()[1:]
            names = [w for w in words if re.fullmatch(r"[a-z]+", w)]
            current = " ".join(names[:2]) if len(names) > 1 and f"{names[0]} {names[1]}" in _commands() else names[0]
            out[current] = out.get(current, "") + " " + body
        elif body.startswith(" ") and current is not None:
            out[current] += " " + body
    return out


def test_every_command_and_flag_is_in_the_reference() -> None:
    ref = _reference()
    missing = []
    for name, cmd in _commands().items():
        if name not in ref:
            missing.append(f"command {name!r}")
            continue
        flags = {o for p in _options(cmd) for o in p.opts if o.startswith("--")}
        missing += [
            f"{name} {f}" for f in sorted(flags - GLOBAL) if not re.search(re.escape(f) + r"(?![\w-])", ref[name])
        ]
    assert missing == [], "the README's CLI reference lacks: " + ", ".join(missing)


def test_the_reference_names_only_what_exists() -> None:
    ref, cmds = _reference(), _commands()
    assert set(ref) <= set(cmds), set(ref) - set(cmds)
    extra = []
    for name, text in ref.items():
        flags = {o for p in _options(cmds[name]) for o in [*p.opts, *p.secondary_opts]}
        extra += [f"{name} {f}" for f in re.findall(r"--[a-z][a-z-]*", text) if f not in flags | GLOBAL]
    assert extra == [], "the README's CLI reference names flags that do not exist: " + ", ".join(extra)
