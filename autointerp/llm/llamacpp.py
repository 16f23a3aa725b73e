"""Start llama.cpp's OpenAI-compatible server (PyPI llama-cpp-python[server]) on 127.0.0.1 for a GGUF model.

Used by the real-server tests and benchmarks; also handy to serve the shipped SmolLM2 to the `openai` backend.
`logits_all` is on so that the completions endpoint returns prompt log-probabilities (the simulator needs them).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def llama_server(
    gguf: Path, *, alias: str = "smollm2", log: Path, n_ctx: int = 8192, timeout_s: float = 120.0
) -> Iterator[str]:
    """Run the server until the block ends; yields its base URL (http://127.0.0.1:PORT/v1)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise ServerError("llama-cpp-python[server] is not installed (make setup-server)") from exc
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--model_alias",
        alias,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--logits_all",
        "true",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise ServerError(f"llama.cpp server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise ServerError(f"llama.cpp server did not start in {timeout_s:.0f}s:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
