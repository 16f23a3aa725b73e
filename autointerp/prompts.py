"""LLM prompts kept as files (`prompts/NAME.toml`, shipped in the wheel as autointerp/_prompts) and one renderer.

A prompt file has `system`, `user` (a string.Template: $name placeholders, $$ for a dollar sign), optional
few-shot `shots` (user/assistant pairs), and optional further string fields that a stage fills itself (the
simulator's layout pieces, its re-ask message): `Prompt.field` and `Prompt.fill`. Every stage reads prompts
here. Every result made from a prompt stores its name and `hash`, a digest of
the file's bytes, so a changed prompt never passes for the old one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from string import Template

import tomllib

from autointerp.llm.types import Message


class PromptError(ValueError):
    """A prompt file that is missing, malformed, or rendered with a missing placeholder."""


def prompt_dirs() -> list[Path]:
    """Where prompt files are looked up: the installed package first, then a source checkout."""
    dirs = []
    packaged = resources.files("autointerp") / "_prompts"
    if packaged.is_dir():
        dirs.append(Path(str(packaged)))
    dirs.append(Path(__file__).resolve().parents[1] / "prompts")
    return dirs


@dataclass(frozen=True)
class Prompt:
    name: str
    hash: str
    system: str
    user: str
    shots: tuple[tuple[str, str], ...]
    extra: tuple[tuple[str, str], ...] = ()
    """The file's other top-level string fields, as (key, text)."""

    def field(self, key: str) -> str:
        """One of the file's other string fields (a layout piece, a message)."""
        for k, v in self.extra:
            if k == key:
                return v
        raise PromptError(f"prompt {self.name!r} has no string field {key!r}")

    def fill(self, template: str, **values: str) -> str:
        """A template of this prompt (its user message or one of its fields) with the placeholders filled."""
        try:
            return Template(template).substitute(values)
        except (KeyError, ValueError) as exc:
            raise PromptError(f"prompt {self.name!r}: cannot fill placeholder {exc}") from exc

    def render(self, **values: str) -> tuple[Message, ...]:
        user = self.fill(self.user, **values)
        msgs = [Message("system", self.system)]
        for u, a in self.shots:
            msgs += [Message("user", u), Message("assistant", a)]
        msgs.append(Message("user", user))
        return tuple(msgs)


@lru_cache(maxsize=16)
def load_prompt(name: str) -> Prompt:
    for d in prompt_dirs():
        path = d / f"{name}.toml"
        if path.is_file():
            break
    else:
        raise PromptError(f"prompt {name!r} not found in {', '.join(map(str, prompt_dirs()))}")
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
        shots = tuple((s["user"], s["assistant"]) for s in data.get("shots", []))
        extra = tuple((k, v) for k, v in data.items() if isinstance(v, str) and k not in ("system", "user"))
        return Prompt(name, hashlib.sha256(raw).hexdigest()[:12], data["system"], data["user"], shots, extra)
    except (tomllib.TOMLDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise PromptError(f"prompt file {path} is malformed: {exc}") from exc
