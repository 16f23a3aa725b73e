"""The review page through its HTTP interface (Starlette's test client, the real app on a real collected database):
pages, decisions, edit and undo, several reviewers, the queue's orders, keyset pages, CSRF, the access token,
escaping of model text, and a page served without torch. The page on PostgreSQL:
tests/integration/test_review_postgres.py."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select
from starlette.testclient import TestClient

from autointerp.review.app import create_app, local_path
from autointerp.store import open_store
from autointerp.store.browse import ListQuery, list_page
from autointerp.store.engine import Store
from autointerp.store.queries import list_features
from autointerp.store.reviews import check_reviewer, queue_order
from autointerp.store.search import QueryError
from autointerp.store.tables import Explanation, Review

LOCAL = "http://127.0.0.1:8000"  # a loopback Host: the app refuses the test client's default "testserver"
XSS = ['<script>alert("x")</script>', "<img src=x onerror=alert(1)>", '"><svg onload=alert(2)>']


@pytest.fixture()
def client(seeded: tuple[Store, dict[str, int]]) -> TestClient:
    return TestClient(create_app(seeded[0], reviewer="ann"), base_url=LOCAL, follow_redirects=False)


def test_every_page_renders(client: TestClient, seeded: tuple[Store, dict[str, int]], feature_key_of: Any) -> None:
    store, ids = seeded
    listing = client.get("/?sort=score")
    assert listing.status_code == 200
    assert "tax policy" in listing.text and "0.800" in listing.text  # the best simulation score and its text
    page = client.get(f"/feature/{feature_key_of(store, ids['tax policy'])}")
    assert page.status_code == 200
    for part in ("tax policy", "simulation", "0.800", "[0.70, 0.90]", "verified", "histogram", "top"):
        assert part in page.text, part
    assert client.get("/review").status_code == 200
    hits = client.get("/search?q=taxes")
    assert hits.status_code == 200 and "<mark>" in hits.text
    assert client.get("/agreement").status_code == 200
    assert client.get("/feature/no/such/feature").status_code == 404
    bad = client.get("/?min=high")
    assert bad.status_code == 400 and "min must be a number" in bad.text
    assert client.get("/?sort=nonsense").status_code == 400


def test_accept_edit_undo(
    client: TestClient, seeded: tuple[Store, dict[str, int]], page_csrf: Any, review_rows: Any, feature_key_of: Any
) -> None:
    store, ids = seeded
    eid = ids["tax policy"]
    url = f"/feature/{feature_key_of(store, eid)}"
    token = page_csrf(client.get(url).text)
    r = client.post("/decide", data={"csrf": token, "explanation": eid, "decision": "accept", "next": url})
    assert r.status_code == 303 and r.headers["location"] == url + "?done=accept"
    r = client.post("/decide", data={"csrf": token, "explanation": eid, "decision": "edit", "text": "tax and tariffs",
                                     "next": url})  # fmt: skip
    assert r.status_code == 303
    assert review_rows(store) == [("ann", eid, "accept", None), ("ann", eid, "edit", "tax and tariffs")]
    with store.session() as s:
        machine = s.get(Explanation, eid)
        human = [e for e in s.exec(Explanation.__table__.select()).all() if e.explainer == "human"]  # type: ignore[attr-defined]
    assert machine is not None and machine.text == "tax policy"  # never overwritten
    assert [(h.text, h.model, h.config["edited_from"], h.feature_id) for h in human] == [
        ("tax and tariffs", "human:ann", eid, machine.feature_id)
    ]
    page = client.get(url).text
    assert "tax and tariffs" in page and "edit" in page
    r = client.post("/undo", data={"csrf": token, "where": "feature"})
    assert r.status_code == 303 and f"e={eid}" in r.headers["location"]
    assert review_rows(store) == [("ann", eid, "accept", None)]
    with store.session() as s:  # the edit's explanation went with it: nothing rests on it
        assert not [e for e in s.exec(Explanation.__table__.select()).all() if e.explainer == "human"]  # type: ignore[attr-defined]
    client.post("/undo", data={"csrf": token, "where": "feature"})
    assert review_rows(store) == []
    r = client.post("/undo", data={"csrf": token, "where": "feature", "next": "//evil.example/"})
    assert r.headers["location"] == "/"  # nothing to undo, and never a redirect off this server
    r = client.post("/decide", data={"csrf": token, "explanation": eid, "decision": "edit", "text": " "})
    assert r.status_code == 400 and "needs the new explanation" in r.text


def test_reviewers_keep_their_own_rows(
    client: TestClient, seeded: tuple[Store, dict[str, int]], page_csrf: Any, review_rows: Any
) -> None:
    store, ids = seeded
    token = page_csrf(client.get("/").text)
    client.post("/decide", data={"csrf": token, "explanation": ids["tax policy"], "decision": "accept"})
    r = client.post("/reviewer", data={"csrf": token, "reviewer": "bob", "next": "/review"})
    assert r.status_code == 303 and r.headers["location"] == "/review"
    client.post("/decide", data={"csrf": token, "explanation": ids["tax policy"], "decision": "reject"})
    client.post("/undo", data={"csrf": token})  # bob's own last decision
    client.post("/decide", data={"csrf": token, "explanation": ids["tax policy"], "decision": "flag"})
    assert review_rows(store) == [("ann", ids["tax policy"], "accept", None), ("bob", ids["tax policy"], "flag", None)]
    assert 'value="bob"' in client.get("/").text


def test_post_needs_the_csrf_token(
    client: TestClient, seeded: tuple[Store, dict[str, int]], page_csrf: Any, review_rows: Any
) -> None:
    store, ids = seeded
    assert client.post("/decide", data={"explanation": ids["tax policy"], "decision": "accept"}).status_code == 403
    assert client.post("/decide", data={"csrf": "guess", "explanation": ids["tax policy"],
                                        "decision": "accept"}).status_code == 403  # fmt: skip
    token = page_csrf(client.get("/").text)
    other = client.post("/decide", data={"csrf": token, "explanation": ids["tax policy"], "decision": "accept"},
                        headers={"origin": "http://evil.example"})  # fmt: skip
    assert other.status_code == 403
    assert client.post("/undo", data={}).status_code == 403
    assert review_rows(store) == []


def test_access_token(seeded: tuple[Store, dict[str, int]]) -> None:
    secret = "s3cret-token-value"
    c = TestClient(create_app(seeded[0], reviewer="ann", token=secret), base_url=LOCAL, follow_redirects=False)
    assert c.get("/").status_code == 401
    assert c.get("/", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/", headers={"authorization": f"Bearer {secret}"}).status_code == 200
    r = c.get(f"/?sort=max&token={secret}")
    assert r.status_code == 303 and r.headers["location"] == "/?sort=max"  # the token leaves the address bar
    page = c.get("/?sort=max")  # the cookie carries it now
    assert page.status_code == 200 and secret not in page.text
    assert secret not in c.get("/review").text and secret not in c.get("/agreement").text
    for evil in ("//evil.example/", "/\\evil.example/", "///evil.example/x"):  # never a protocol-relative redirect
        r = c.get(f"{LOCAL}{evil}?token={secret}")
        where = r.headers["location"]
        assert r.status_code == 303 and where[0] == "/" and where[1] not in "/\\" and "evil.example" in where, where


def test_reviewer_names_with_control_characters_are_refused(
    client: TestClient, seeded: tuple[Store, dict[str, int]], page_csrf: Any
) -> None:
    store, ids = seeded
    token = page_csrf(client.get("/").text)
    for name in ("a\x00b", "bell\x07", "a\ud800b"):
        with pytest.raises(QueryError, match="printable"):
            check_reviewer(name)
    # A forged cookie with one is ignored (the server's reviewer decides), never a 500 or a stored NUL.
    client.cookies.set("autointerp_reviewer", "a%00b")
    r = client.post("/decide", data={"csrf": token, "explanation": ids["tax policy"], "decision": "accept"})
    assert r.status_code == 303
    with store.session() as sess:
        rows = sess.exec(select(Review).where(Review.explanation_id == ids["tax policy"])).all()
    assert [row.reviewer for row in rows] == ["ann"]


def test_model_text_is_escaped(
    client: TestClient, seeded: tuple[Store, dict[str, int]], page_csrf: Any, feature_key_of: Any
) -> None:
    store, ids = seeded
    with store.session() as s:
        e = s.get(Explanation, ids["tax policy"])
        assert e is not None
        s.add(Explanation(feature_id=e.feature_id, explainer="llm", model="fake:xss", prompt="p", prompt_hash="x",
                          config_hash="x", status="ok", text=" ".join(XSS)))  # fmt: skip
        s.commit()
    token = page_csrf(client.get("/").text)
    client.post("/decide", data={"csrf": token, "explanation": ids["tax policy"], "decision": "edit",
                                 "text": XSS[1], "note": XSS[2]})  # fmt: skip
    for url in (f"/feature/{feature_key_of(store, ids['tax policy'])}", "/?sort=score", "/search?q=alert+svg+img",
                "/search?q=" + XSS[0]):  # fmt: skip
        page = client.get(url).text
        for probe in ("<script>alert", "<img src=x", "<svg onload"):
            assert probe not in page, (url, probe)
    page = client.get(f"/feature/{feature_key_of(store, ids['tax policy'])}").text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    assert "script-src 'self'" in client.get("/").headers["content-security-policy"]


def test_queue_orders(client: TestClient, seeded: tuple[Store, dict[str, int]], page_csrf: Any) -> None:
    store, ids = seeded
    lowest = queue_order(store, "lowest")
    by_text = {v: k for k, v in ids.items()}
    # best simulation score lowest first: 0.2, 0.3, 0.55, 0.6 (best of 0.6 and 0.45), 0.7, 0.8; then unscored
    assert [by_text[i] for i in lowest[:6]] == [
        'the tokens "tax" and "taxes"', "the word tax in budget debates", "money, taxation and government revenue",
        "taxes and tariffs on imported goods", "foreign policy and diplomacy", "tax policy",
    ]  # fmt: skip
    assert set(lowest) == set(ids.values())
    # widest interval is 0.2 for all; the spread between methods is 0.2 (0.6 vs 0.4): tariffs first by id order
    uncertain = queue_order(store, "uncertain")
    assert by_text[uncertain[0]] in ("tax policy", "taxes and tariffs on imported goods")
    assert queue_order(store, "random", seed=1) == queue_order(store, "random", seed=1)
    assert queue_order(store, "random", seed=1) != queue_order(store, "random", seed=2)
    first = client.get("/review?order=lowest").text
    assert f'value="{lowest[0]}"' in first and 'rel="next"' in first
    token = page_csrf(first)
    r = client.post("/decide", data={"csrf": token, "explanation": lowest[0], "decision": "accept",
                                     "next": f"/review?order=lowest&after={lowest[0]}"})  # fmt: skip
    nxt = client.get(r.headers["location"]).text
    assert f'name="explanation" value="{lowest[1]}"' in nxt and "Saved: accepted" in nxt
    again = client.get("/review?order=lowest").text  # reviewed ones are skipped
    assert f'name="explanation" value="{lowest[1]}"' in again
    back = client.get(f"/review?order=lowest&before={lowest[1]}").text  # k: the previous one, reviewed or not
    assert f'name="explanation" value="{lowest[0]}"' in back and "already reviewed" in back
    assert client.get("/review?order=sideways").status_code == 400


@pytest.mark.parametrize("sort", ["max", "density", "index", "score"])
def test_keyset_pages_walk_the_whole_list(seeded: tuple[Store, dict[str, int]], sort: str) -> None:
    store, _ = seeded
    want = [r.id for r in list_features(store, sort=sort, limit=None)]  # type: ignore[arg-type]
    got, cursor = [], None
    while True:
        page = list_page(store, ListQuery(sort=sort), cursor, limit=7)
        got += [r.feature.id for r in page.rows]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert got == want


def test_list_filters(client: TestClient, seeded: tuple[Store, dict[str, int]], page_csrf: Any) -> None:
    store, ids = seeded
    token = page_csrf(client.get("/").text)
    client.post("/decide", data={"csrf": token, "explanation": ids["tax policy"], "decision": "accept"})
    client.post("/decide", data={"csrf": token, "explanation": ids["numbers and dates"], "decision": "flag"})
    count = lambda **q: len(list_page(store, ListQuery(**q), limit=500).rows)  # noqa: E731
    assert count(review="accepted") == 1 and count(review="flagged") == 1 and count(review="reviewed") == 2
    assert count(review="unreviewed") == count() - 2
    assert count(min_score=0.5) == 4  # best simulation 0.8, 0.6, 0.7, 0.55
    assert count(min_score=0.5, max_score=0.65) == 2
    # tax policy and the "tax" tokens, both of feature 0 (tariffs' latest verdict is unverified)
    assert count(verdict="verified") == len(list_features(store, verdict="verified", limit=None)) == 1
    assert [r.feature.score for r in list_page(store, ListQuery(sort="score", min_score=0.5)).rows] == [
        0.8, 0.7, 0.6, 0.55]  # fmt: skip
    page = client.get("/?review=accepted").text
    assert page.count('class="feature-row"') == 1 and "accept 1" in page


def test_local_path() -> None:
    assert local_path("/review?x=1") == "/review?x=1"
    for bad in ("//evil.example", "https://evil.example", "/\\evil", "", None, "review"):
        assert local_path(bad) == "/"


_PROBE = """
import sys
from sqlmodel import select
from starlette.testclient import TestClient
from autointerp.review.app import create_app
from autointerp.store import open_store
c = TestClient(create_app(open_store(sys.argv[1])), base_url="http://127.0.0.1:8000")
codes = [c.get(u).status_code for u in ("/", "/review", "/agreement", "/feature/" + sys.argv[2])]
print("PROBE", codes, sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


def test_pages_never_import_torch(seeded: tuple[Store, dict[str, int]], feature_key_of: Any) -> None:
    store, ids = seeded
    res = subprocess.run([sys.executable, "-c", _PROBE, store.url, feature_key_of(store, ids["tax policy"])],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.stdout.strip().endswith("PROBE [200, 200, 200, 200] []"), res.stdout[-2000:] + res.stderr[-2000:]


def _serve(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    exe = str(Path(sys.executable).with_name("autointerp"))
    proc = subprocess.Popen([exe, "review", *args], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines = []
    while True:
        line = proc.stderr.readline()
        lines.append(line)
        if "review page:" in line or not line:
            break
    assert "review page:" in line, "".join(lines)
    return proc, line.split("review page:", 1)[1].strip()


def test_review_command_serves_until_ctrl_c(seeded: tuple[Store, dict[str, int]]) -> None:
    store, _ = seeded
    proc, url = _serve(["--db", store.url, "--port", "0", "--reviewer", "cli", "--allowed-host", "review.example"])
    try:
        assert "token" not in url  # loopback: no token asked for
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.status == 200 and 'value="cli"' in resp.read().decode()
        port = url.rsplit(":", 1)[1].strip("/")
        for host, code in ((f"localhost:{port}", 200), (f"review.example:{port}", 200), ("review.example", 200),
                           (f"rebind.evil.example:{port}", 400), ("localhost:1", 400)):  # fmt: skip
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers={"Host": host}), timeout=30) as resp:
                    got = resp.status
            except urllib.error.HTTPError as exc:
                got = exc.code
            assert got == code, host
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0


def test_off_loopback_a_token_is_generated(seeded: tuple[Store, dict[str, int]]) -> None:
    store, _ = seeded
    proc, url = _serve(["--db", store.url, "--port", "0", "--host", "0.0.0.0"])
    try:
        assert "?token=" in url
        bare = url.split("?", 1)[0]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bare, timeout=30)
        assert refused.value.code == 401
        token = url.split("?token=", 1)[1]
        req = urllib.request.Request(bare, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200 and token not in resp.read().decode()
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--port", "70000"], "--port"), (["--token", "short"], "at least 8 characters"),
     (["--reviewer", " "], "reviewer name"), (["--reviewer", "a\x01b"], "printable"),
     (["--allowed-host", "not a host"], "--allowed-host"), (["--host", "no-such-host.invalid"], "--host"),
     (["--host", "192.0.2.1"], "--host")],
)  # fmt: skip
def test_review_command_bad_flags(seeded: tuple[Store, dict[str, int]], args: list[str], message: str) -> None:
    exe = str(Path(sys.executable).with_name("autointerp"))
    res = subprocess.run([exe, "review", "--db", seeded[0].url, *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and message in res.stdout + res.stderr, res.stdout + res.stderr


def test_search_filters_on_reviews(seeded: tuple[Store, dict[str, int]]) -> None:
    from autointerp.query.search import search
    from autointerp.store.reviews import decide
    from autointerp.store.search import Filters

    store, ids = seeded
    decide(store, ids["tax policy"], "ann", "reject")
    hits = lambda reviewed: {h.explanation for h in search(store, "tax", filters=Filters(reviewed=reviewed)).hits}  # noqa: E731
    assert hits(True) == {"tax policy"}
    assert "tax policy" not in hits(False) and hits(False)


SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "referrer-policy", "x-frame-options")


def guarded(r: Any) -> bool:
    return all(h in r.headers for h in SECURITY_HEADERS)


def test_dns_rebinding_is_refused(
    client: TestClient, seeded: tuple[Store, dict[str, int]], page_csrf: Any, review_rows: Any
) -> None:
    """A page of another site whose name now resolves to 127.0.0.1 sends its own name as Host (and as Origin):
    refused before any page or decision, so it never sees the CSRF token."""
    store, ids = seeded
    evil = "rebind.evil.example:8000"
    token = page_csrf(client.get("/review").text)
    page = client.get("/review", headers={"host": evil})
    assert page.status_code == 400 and token not in page.text and guarded(page)
    decision = {"csrf": token, "explanation": ids["tax policy"], "decision": "accept"}
    r = client.post("/decide", data=decision, headers={"host": evil, "origin": f"http://{evil}"})
    assert r.status_code == 400 and guarded(r)
    r = client.post("/decide", data=decision, headers={"origin": f"http://{evil}"})  # Origin checked on its own
    assert r.status_code == 403 and guarded(r)
    assert review_rows(store) == []
    r = client.post("/decide", data=decision, headers={"origin": "http://localhost:8000"})  # loopback is this server
    assert r.status_code == 303 and r.headers["location"].startswith("/feature/")
    for host in ("evil.example", "127.0.0.1:8000"):  # no trailing-slash redirect: it would echo the Host
        r = client.get("/static/review.css/", headers={"host": host})
        assert r.status_code in (400, 404) and "location" not in r.headers and guarded(r)


def test_allowed_hosts(seeded: tuple[Store, dict[str, int]], page_csrf: Any) -> None:
    store, ids = seeded
    app = create_app(store, reviewer="ann", allowed_hosts=["127.0.0.1:8000", "[::1]:8000", "review.example"])
    c = TestClient(app, base_url=LOCAL, follow_redirects=False)
    hosts = {"127.0.0.1:8000": 200, "[::1]:8000": 200, "review.example": 200, "REVIEW.example:9000": 200,
             "127.0.0.1:8001": 400, "127.0.0.1": 400, "localhost:8000": 400, "review.example.evil.com": 400,
             "evil.com#review.example": 400, "127.0.0.1:8000@evil.com": 400, "[::1]": 400}  # fmt: skip
    assert {h: c.get("/agreement", headers={"host": h}).status_code for h in hosts} == hosts
    token = page_csrf(c.get("/").text)
    decision = {"csrf": token, "explanation": ids["tax policy"], "decision": "flag"}
    assert c.post("/decide", data=decision, headers={"origin": "https://review.example"}).status_code == 303
    assert c.post("/decide", data=decision, headers={"origin": "http://localhost:8000"}).status_code == 403
    assert c.post("/decide", data=decision, headers={"origin": "file://review.example"}).status_code == 403


def test_host_entries() -> None:
    from autointerp.review.app import host_entry

    assert host_entry("localhost:8000") == ("localhost", 8000)
    assert host_entry("Review.Example") == ("review.example", None)
    assert host_entry("::1") == ("[::1]", None) and host_entry("[::1]:80") == ("[::1]", 80)
    for bad in ("", "a b", "x:99999", "http://x", "x:", "x/y", "[::1"):
        with pytest.raises(ValueError, match="not a host name"):
            host_entry(bad)


NONFINITE = ["inf", "-inf", "nan", "1e400"]


@pytest.mark.parametrize("value", [*NONFINITE, "1.5", "99999999999999999999999"])
def test_numbers_that_are_not_whole_numbers(client: TestClient, seeded: tuple[Store, dict[str, int]], value: str,
                                            page_csrf: Any, review_rows: Any, feature_key_of: Any) -> None:  # fmt: skip
    store, ids = seeded
    key = feature_key_of(store, ids["tax policy"])
    urls = [f"/?limit={value}", f"/feature/{key}?e={value}", f"/review?seed={value}", f"/review?eid={value}",
            f"/review?before={value}", f"/review?after={value}", f"/?after=c:0:{value}"]  # fmt: skip
    if value in NONFINITE:
        urls += [f"/?min={value}", f"/?max=1&min={value}", f"/?after=c:{value}:1", f"/?sort=max&after=c:{value}:1"]
    for url in urls:
        r = client.get(url)
        assert r.status_code == 400 and guarded(r), url
        assert re.search(r"(limit|e|seed|eid|before|after|min|max|page cursor)\b.*(number|range|cursor)", r.text), url
    token = page_csrf(client.get("/").text)
    r = client.post("/decide", data={"csrf": token, "explanation": value, "decision": "accept"})
    assert r.status_code == 400 and "explanation must be" in r.text or "explanation is out of range" in r.text
    assert review_rows(store) == []


def test_secrets_with_any_characters_are_refused_not_crashed(
    seeded: tuple[Store, dict[str, int]], review_rows: Any
) -> None:
    store, ids = seeded
    c = TestClient(create_app(store, reviewer="ann", token="s3cret-token"), base_url=LOCAL, follow_redirects=False)
    for r in (c.get("/?token=é"), c.get("/?token="), c.get("/", headers={"authorization": "Bearer é".encode()}),
              c.get("/", headers={"cookie": "autointerp_token=é".encode()})):  # fmt: skip
        assert r.status_code == 401 and guarded(r)
    c = TestClient(create_app(store, reviewer="ann"), base_url=LOCAL, follow_redirects=False)
    r = c.post("/decide", data={"csrf": "é🙂", "explanation": ids["tax policy"], "decision": "accept"})
    assert r.status_code == 403 and guarded(r) and review_rows(store) == []


def test_a_reviewer_named_with_any_characters(
    client: TestClient, seeded: tuple[Store, dict[str, int]], page_csrf: Any, review_rows: Any
) -> None:
    store, ids = seeded
    token = page_csrf(client.get("/").text)
    r = client.post("/reviewer", data={"csrf": token, "reviewer": "zoë 🙂", "next": "/"})
    assert r.status_code == 303 and r.headers["set-cookie"].isascii()
    assert 'value="zoë 🙂"' in client.get("/").text
    client.post("/decide", data={"csrf": token, "explanation": ids["tax policy"], "decision": "accept"})
    assert review_rows(store) == [("zoë 🙂", ids["tax policy"], "accept", None)]
    r = client.post("/reviewer", data={"csrf": token, "reviewer": "bell\x07", "next": "/"})
    assert r.status_code == 400 and "printable" in r.text
    r = client.post("/decide", data={"csrf": token, "explanation": ids["tax policy"], "decision": "edit",
                                     "text": "nul\x00"})  # fmt: skip
    assert r.status_code == 400 and "NUL" in r.text and len(review_rows(store)) == 1


def test_every_response_carries_the_security_headers(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import autointerp.review.agreement

    def broken(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("a bug with a secret in its message")

    monkeypatch.setattr(autointerp.review.agreement, "agreement", broken)
    r = client.get("/agreement")
    assert r.status_code == 500 and guarded(r) and "secret" not in r.text and "Traceback" not in r.text
    for r in (client.get("/nope"), client.post("/decide", data={}), client.put("/"), client.get("/?sort=x"),
              client.get("/feature/no/such")):  # fmt: skip
        assert 400 <= r.status_code < 500 and guarded(r), r.request.url
    r = client.get("/feature/a%00b")  # PostgreSQL refuses NUL in text: refused before any query, on every database
    assert r.status_code == 400 and "NUL" in r.text


def test_empty_agreement_page_reads_as_a_sentence(client: TestClient) -> None:
    page = client.get("/agreement").text
    assert "No decisions yet" in page and ": ." not in page and "0 decisions" not in page


def test_histogram_axis_ends_at_the_data(
    client: TestClient, seeded: tuple[Store, dict[str, int]], feature_key_of: Any
) -> None:
    from autointerp.review.pages import histogram_svg

    edges = [2.0 ** (-12 + i / 2) for i in range(49)]  # the collector's half-octave bins, up to 4096
    counts = [0] * 48
    counts[20], counts[23], counts[25] = 5, 3, 2  # [0.25, 0.35), ..., [1.41, 2)
    h = histogram_svg({"edges": edges, "counts": counts}, top=1.6)
    assert h is not None and (h["lo"], h["hi"]) == (edges[20], 1.6) and len(h["bars"]) == 6
    last = h["bars"][-1]
    assert last["x"] + last["w"] <= h["w"] and last["w"] < h["bars"][0]["w"]  # cut where the data ends
    assert histogram_svg({"edges": edges, "counts": counts})["hi"] == edges[26]  # type: ignore[index]
    store, ids = seeded
    page = client.get(f"/feature/{feature_key_of(store, ids['tax policy'])}").text
    assert "histogram" in page and "4.1e+03" not in page


_READ_ONLY = """
import re, sys
from sqlmodel import select
from starlette.testclient import TestClient
from autointerp.review.app import create_app
from autointerp.store import open_store
store = open_store(sys.argv[1])
c = TestClient(create_app(store), base_url="http://127.0.0.1:8000", follow_redirects=False)
urls = ("/", "/?sort=max", "/review", "/agreement", "/search?q=tax", "/search?q=tax&semantic=1")
urls += ("/feature/" + sys.argv[2],)
codes = [c.get(u).status_code for u in urls]
token = re.search(r'name="csrf" value="([^"]+)"', c.get("/").text).group(1)
r = c.post("/decide", data={"csrf": token, "explanation": sys.argv[3], "decision": "accept"})
print("PROBE", store.read_only, codes, r.status_code, "read-only" in r.text, "x-frame-options" in r.headers)
"""


def run_read_only(target: Path, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `cmd` where `target` (a file or a directory) cannot be written. As root, whom file modes do not stop, a
    read-only bind mount of it in a private mount namespace."""
    import os
    import shlex
    import shutil

    if os.geteuid() == 0:
        if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
            pytest.skip("running as root without mount namespaces (unshare -m): a read-only file cannot be made")
        t = shlex.quote(str(target))
        wrap = ["unshare", "-m", "sh", "-c", f'mount --bind {t} {t} && mount -o remount,ro,bind {t} {t} && exec "$@"',
                "sh"]  # fmt: skip
        return subprocess.run([*wrap, *cmd], capture_output=True, text=True, timeout=120)
    mode = target.stat().st_mode
    target.chmod(0o555 if target.is_dir() else 0o444)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        target.chmod(mode)


@pytest.mark.parametrize("what", ["file", "directory", "file without search index"])
def test_a_read_only_database(
    seeded: tuple[Store, dict[str, int]], what: str, review_rows: Any, feature_key_of: Any
) -> None:
    """Pages read it; a decision is answered "the database is read-only" (503), never a 500."""
    from autointerp.store.engine import sqlite_file

    store, ids = seeded
    eid = ids["tax policy"]
    key = feature_key_of(store, eid)
    if what == "file without search index":  # written by an older autointerp, never opened by this one to write
        with store.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE explanation_fts")
    store.engine.dispose()
    path = sqlite_file(store.url)
    assert path is not None and not path.with_name(path.name + "-wal").exists()
    res = run_read_only(path.parent if what == "directory" else path,
                        [sys.executable, "-c", _READ_ONLY, store.url, key, str(eid)])  # fmt: skip
    search = 503 if what == "file without search index" else 200
    want = f"PROBE True [200, 200, 200, 200, {search}, {search}, 200] 503 True True"
    assert want in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    assert review_rows(open_store(store.url)) == []


def test_an_old_read_only_database_is_refused_clearly(seeded: tuple[Store, dict[str, int]]) -> None:
    """Upgrading its schema would write: the command says so (exit 2) and leaves the file as it was."""
    import sqlite3

    from autointerp.store.engine import sqlite_file

    store, _ = seeded
    store.engine.dispose()
    path = sqlite_file(store.url)
    assert path is not None
    con = sqlite3.connect(path)
    con.execute("UPDATE schema_version SET version = 5")
    con.commit()
    con.close()
    exe = str(Path(sys.executable).with_name("autointerp"))
    res = run_read_only(path, [exe, "review", "--db", store.url, "--port", "0"])
    assert res.returncode == 2, res.stdout + res.stderr
    out = " ".join((res.stdout + res.stderr).split())
    assert "schema version 5 must be upgraded" in out and "the file is read-only" in out, out
