"""The test session is hermetic: no network from this process or its Python subprocesses (DNS included), hub
libraries offline, and the model cache in a temporary directory, never the user's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def test_no_connection_or_name_lookup_leaves_the_machine() -> None:
    with pytest.raises(RuntimeError, match="reach the network"), socket.socket() as s:
        s.connect(("10.255.255.1", 80))
    with pytest.raises(RuntimeError, match="resolve a network name"):
        socket.getaddrinfo("example.com", 443)
    with pytest.raises(RuntimeError, match="resolve a network name"):
        socket.gethostbyname("example.com")
    assert socket.getaddrinfo("127.0.0.1", 80)  # loopback stays open for the real servers of the tests


def test_python_subprocesses_are_guarded_too() -> None:
    code = (
        "import socket\n"
        "try:\n    socket.create_connection(('example.com', 80), timeout=2)\n"
        "except RuntimeError as e:\n    print('blocked', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("blocked test tried to resolve"), out.stdout + out.stderr
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_model_cache_is_the_sessions_own() -> None:
    from autointerp.subject.files import cache_home

    home = cache_home()
    assert Path(os.environ["AUTOINTERP_HOME"]) == home
    assert not str(home).startswith(str(Path.home() / ".cache")), home


def test_the_shipped_gguf_by_path_is_the_alias(tmp_path: Path) -> None:
    """One model, one id and one converted copy, whether it is named by alias or by its file."""
    from autointerp.subject.files import ALIASES, DEFAULT_MODEL, converted_dir, resolve

    by_alias = resolve(DEFAULT_MODEL)
    by_path = resolve(str(ALIASES[DEFAULT_MODEL]()))
    assert by_path == by_alias and converted_dir(by_path) == converted_dir(by_alias)
    other = tmp_path / "Other.Q4_1.gguf"  # another file keeps its own name
    other.write_bytes(b"GGUF")
    assert resolve(str(other)).name == "other.q4_1"
