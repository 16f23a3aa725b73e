"""A tiny OpenAI-compatible chat server on 127.0.0.1, for tests and benchmarks of several servers (base_urls).

Each server answers /v1/chat/completions with "Explanation: " + `reply` of the last user message (by default the
message itself), after `latency_s`, at most `slots` requests at a time (one by default, as a server with one GPU
slot). After `answers` answers it stops
answering the way a dead server does: `fail="close"` drops each connection without a response, `fail="hang"` keeps
it open without one (until the server is stopped). No network beyond the loopback; threads only.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal


class StubServer:
    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        slots: int = 1,
        answers: int | None = None,
        fail: Literal["close", "hang"] = "close",
        reply: Callable[[str], str] = lambda text: text,
    ) -> None:
        self.latency_s = latency_s
        self.reply = reply
        self.answers = answers
        self.fail = fail
        self.answered: list[str] = []  # the user message of each request answered, in order
        self.received = 0
        self._slots = threading.Semaphore(slots)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="stub-openai", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def __enter__(self) -> StubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _answer(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The response to a request, or None once the server has stopped answering."""
        with self._slots:
            with self._lock:
                self.received += 1
                dead = self.answers is not None and len(self.answered) >= self.answers
            if dead:
                if self.fail == "hang":
                    self._stop.wait()
                return None
            if self._stop.wait(self.latency_s):
                return None
            text = str(body["messages"][-1]["content"])
            with self._lock:
                if self.answers is not None and len(self.answered) >= self.answers:
                    return None
                self.answered.append(text)
        return {
            "id": "stub", "object": "chat.completion", "created": 0, "model": body.get("model", "stub"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"Explanation: {self.reply(text)}"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(text.split()), "completion_tokens": 1 + len(text.split()),
                      "total_tokens": 1 + 2 * len(text.split())},
        }  # fmt: skip

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                if not self.path.endswith("/chat/completions"):
                    self.send_error(404)
                    return
                out = stub._answer(body)
                if out is None:  # a dead server: the connection goes without a response
                    self.close_connection = True
                    return
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                pass

        return Handler


def serve(n: int, latency_s: float, slots: int = 1) -> None:
    """Run `n` servers until stdin closes, printing their URLs on one line (for a benchmark that wants the servers
    in a process of their own, as real ones are, not sharing its interpreter)."""
    import sys

    servers = [StubServer(latency_s=latency_s, slots=slots).__enter__() for _ in range(n)]
    sys.stdout.write(" ".join(s.url for s in servers) + "\n")
    sys.stdout.flush()
    try:
        sys.stdin.read()
    finally:
        for s in servers:
            s.stop()
