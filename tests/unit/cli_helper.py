"""Run the `autointerp` entry point in-process, as a shell would, for the CLI tests."""

from __future__ import annotations

import sys

import pytest


def run_main(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `autointerp ARGS`."""
    from autointerp.cli import main

    monkeypatch.setattr(sys, "argv", ["autointerp", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    got = capsys.readouterr()
    return code, got.out, got.err
