"""Any request to the review page, no 500: Hypothesis draws requests to every route of the app (enumerated from its
router, so a new route is fuzzed without touching this file) and to paths of its own, with query strings, forms,
headers (Host, Origin, Authorization) and cookies mixing valid values with hostile ones (non-finite and huge
numbers, non-ASCII secrets, NUL, markup, traversal), against the real app on a small collected database.

Every response: under 500, with the security headers, a relative redirect if any, no access token in its body;
a refused one (4xx) wrote nothing (the review and explanation tables' checksum is unchanged), and one with a
foreign Host, a foreign Origin or a wrong CSRF token is refused.

Hypothesis, not Schemathesis: the app publishes no OpenAPI schema (its handlers read the raw request), so a
schema-driven fuzzer would have nothing to draw from. Bounded and reproducible: a fixed number of examples,
derandomized (the same requests every run), no deadline (a first page may be slow), no example database.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.routing import Route
from starlette.testclient import TestClient

from autointerp.review.app import create_app
from autointerp.store import open_store
from autointerp.store.engine import Store

HOST = "127.0.0.1:8000"
ALLOWED = [HOST, "localhost:8000", "[::1]:8000"]  # what `autointerp review --port 8000` answers to
TOKEN = "s3cret-token-value"
SECURITY = ("content-security-policy", "x-content-type-options", "referrer-policy", "x-frame-options")
NUMBERS = ["inf", "-inf", "nan", "1e400", "1.5", "99999999999999999999", "-1", "0", "1e30", "0x10", "1_0"]
NASTY = ["", "inf", "-inf", "nan", "1e400", "-1", "0", "1", "2", "1.5", "99999999999999999999", "1e30", "c:0:1",
         "s:0.5:2", "u:0:3", "c:nan:1", "x:1", "<script>alert(1)</script>", "\"'><svg onload=alert(2)>", "é🙂",
         "\x00", "%", "%00", "../../etc/passwd", "//evil.example/", "https://evil.example", "\\\\evil"]  # fmt: skip
WORDS = ["simulation", "detection", "intervention", "score", "max", "density", "index", "lowest", "uncertain",
         "random", "accept", "reject", "edit", "flag", "undo", "verified", "reviewed", "unreviewed", "accepted",
         "tax", "neurons", "blocks.1.mlp.post", "feature", "queue:lowest:simulation:0", "queue:x", "/", "/review",
         "/review?order=lowest", "ann", "zoë 🙂"]  # fmt: skip
KEYS = ["limit", "e", "seed", "eid", "before", "after", "min", "max", "sort", "method", "site", "source", "status",
        "explainer", "verdict", "review", "order", "q", "semantic", "done", "token"]  # fmt: skip
FORM_KEYS = ["csrf", "explanation", "decision", "text", "note", "next", "where", "reviewer"]
HOSTS = [HOST, "localhost:8000", "[::1]:8000", "127.0.0.1:9", "evil.example", "rebind.evil.example:8000", "",
         "127.0.0.1:8000@evil.example", "ev il", "é.example"]  # fmt: skip
# Origins: the first three are this server's own (or none given); from the fourth on, refused.
ORIGINS = ["null", f"http://{HOST}", "http://localhost:8000", "http://evil.example", "http://127.0.0.1:9", "file://",
           "http://[::1", "é", "http://127.0.0.1:8000.evil.example"]  # fmt: skip
NAMES = ["ann", "zoë 🙂", "bell\x07", " ", "x" * 65, "tab\tname"]
COOKIES = ["autointerp_reviewer=zo%C3%AB%20%F0%9F%99%82", "autointerp_reviewer=%ff%fe", "autointerp_reviewer=%00",
           "autointerp_reviewer=a%01b", "autointerp_reviewer=%ED%A0%80",
           "autointerp_reviewer=", "=;;", "a=b; autointerp_token", "é=é"]  # fmt: skip


class FakeEncoder:
    """Semantic search without the model: unit vectors from a hash of the text."""

    name = "fuzz-fake"

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.array([list(hashlib.sha256(t.encode()).digest()[:16]) for t in texts], np.float32).reshape(-1, 16)
        return (out + 1) / np.linalg.norm(out + 1, axis=1, keepdims=True)


def checksum(store: Store) -> tuple[Any, ...]:
    with store.engine.connect() as conn:
        return tuple(
            conn.exec_driver_sql(f"SELECT count(*), coalesce(sum(id), 0), coalesce(max(id), 0) FROM {t}").one()
            for t in ("review", "explanation")
        )


def routes(app: Any) -> list[tuple[str, list[str]]]:
    """(path template, methods) of every route the app serves."""
    return [(r.path, sorted(r.methods or [])) for r in app.routes if isinstance(r, Route)]


def fill(template: str, parts: list[str]) -> str:
    """The template's {params} replaced by the drawn parts (percent-encoded; a :path param keeps its slashes)."""
    out, k = template, 0
    while "{" in out:
        start, end = out.index("{"), out.index("}")
        safe = "/" if ":path" in out[start:end] else ""
        out = out[:start] + quote(parts[k % len(parts)], safe=safe) + out[end + 1 :]
        k += 1
    return out


def weighted(good: Any, bad: list[Any], times: int = 6) -> st.SearchStrategy[Any]:
    """`good` most of the time (so that most requests pass the guard and reach a handler), else one of `bad`."""
    return st.sampled_from([good] * times + bad)


# With a token: mostly the guard. On PostgreSQL fewer examples: its own refusals (NUL in text, out-of-range
# integers, invalid UTF-8) are what differs there, and each request costs a server round trip or more.
@pytest.mark.parametrize(
    ("backend", "token", "per_route"), [("sqlite", None, 60), ("sqlite", TOKEN, 15), ("postgresql", None, 20)]
)
def test_any_request_no_500(
    request: pytest.FixtureRequest,
    tmp_path: Any,
    collect_into: Any,
    backend: str,
    token: str | None,
    per_route: int,
    seed: Any,
) -> None:
    if backend == "sqlite":
        url = request.getfixturevalue("collected_db")
    else:
        url = request.getfixturevalue("postgres_db")
        collect_into(url, tmp_path)
    store = open_store(url)
    ids = seed(store)
    app = create_app(store, reviewer="ann", token=token, encoder=FakeEncoder(), allowed_hosts=ALLOWED)
    csrf = app.state.review.csrf
    client = TestClient(app, base_url=f"http://{HOST}", follow_redirects=False)
    with store.engine.connect() as conn:
        keys = [str(k) for (k,) in conn.exec_driver_sql("SELECT key FROM feature ORDER BY id LIMIT 3")]
    eids = [str(i) for i in sorted(ids.values())[:4]]
    table = routes(app)
    assert {p for p, _m in table} >= {"/", "/feature/{key:path}", "/review", "/decide", "/undo", "/search"}
    likely = st.sampled_from(eids + keys + WORDS)
    value = st.one_of(likely, st.sampled_from(NUMBERS), st.sampled_from(NASTY), st.text(max_size=12))
    part = st.one_of(st.sampled_from(keys), st.sampled_from(keys + ["no/such/feature", "..", "../app.py",
                     "review.css", "review.js", "review.css/", "%2e%2e"]), value)  # fmt: skip
    query = st.one_of(
        st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=5)), value), max_size=3),
        st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(NUMBERS)), min_size=1, max_size=1),  # one bad one
    )
    form = st.one_of(
        st.fixed_dictionaries(
            {"explanation": st.one_of(st.sampled_from(eids), st.sampled_from(NUMBERS), value),
             "decision": st.one_of(st.sampled_from(["accept", "reject", "edit", "flag"]), value),
             "reviewer": st.one_of(st.sampled_from(NAMES), value)},
            optional={"text": value, "note": value, "next": value, "where": value},
        ),
        st.dictionaries(st.one_of(st.sampled_from(FORM_KEYS), st.text(max_size=5)), value, max_size=5),
    )  # fmt: skip
    bad_secrets = [TOKEN[:-1] + "é", "", "Bearer", TOKEN + "x"]
    guard = {
        "host": weighted(HOST, HOSTS[1:], 30),
        "origin": weighted(None, ORIGINS, 12),
        "csrf": weighted(csrf, ["", "wrong", "é", csrf + " ", None], 12),
        "auth": weighted(None, [f"Bearer {s}" for s in [TOKEN, *bad_secrets]] + ["é", "Basic x"]),
        "cookie": weighted(f"autointerp_token={TOKEN}", [f"autointerp_token={s}" for s in bad_secrets] + COOKIES),
        "reviewer": weighted(None, COOKIES[:5], 3),
    }

    def run(template: str | None, methods: list[str]) -> None:
        @settings(max_examples=per_route, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(
            st.fixed_dictionaries(
                {"parts": st.lists(part, min_size=1, max_size=2),
                 "path": st.text(max_size=20).map(lambda t: "/" + quote(t, safe="/")),
                 "method": weighted(methods[0], ["GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE"], 18),
                 "query": query, "form": form, "raw": weighted(None, [b"", b"csrf=%ff%fe", b"\xff\x00=&&=="]),
                 **guard}
            )
        )  # fmt: skip
        def one(req: dict[str, Any]) -> None:
            method = req["method"]
            path = fill(template, req["parts"]) if template is not None else req["path"]
            url = path + ("?" + urlencode(req["query"]) if req["query"] else "")
            headers = {"host": req["host"].encode()}
            if req["origin"] is not None:
                headers["origin"] = req["origin"].encode()
            if req["auth"] is not None:
                headers["authorization"] = req["auth"].encode()
            cookies = "; ".join(c for c in (req["cookie"], req["reviewer"]) if c is not None)
            if cookies:
                headers["cookie"] = cookies.encode()
            form = dict(req["form"]) | ({} if req["csrf"] is None else {"csrf": req["csrf"]})
            body = None
            if method == "POST":
                body = req["raw"] if req["raw"] is not None else urlencode(form).encode()
                headers["content-type"] = b"application/x-www-form-urlencoded"
            client.cookies.clear()
            before = checksum(store)
            r = client.request(method, url, content=body, headers=headers)
            where = f"{method} {url} {headers} {body!r}"
            assert r.status_code < 500, where + "\n" + r.text[:500]
            assert all(h in r.headers for h in SECURITY), where
            if "location" in r.headers:
                assert r.headers["location"].startswith("/") and not r.headers["location"].startswith("//"), where
            assert TOKEN not in r.text, where
            refused = req["host"] not in ALLOWED or (
                method == "POST"
                and (req["raw"] is not None or form.get("csrf") != csrf or req["origin"] in ORIGINS[3:])
            )
            if refused:
                assert 400 <= r.status_code < 500 and csrf not in r.text, where
            if r.status_code >= 400:
                assert checksum(store) == before, where

        one()

    for template, methods in table:
        run(template, methods)
    run(None, ["GET"])  # paths of no route
