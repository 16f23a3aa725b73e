"""The review page in a real browser: Debian's Chromium, headless, driven by Playwright, against the app served by
uvicorn on 127.0.0.1 over a small real database (tiny GPT-2 neurons collected over a corpus, explanations, scores
and verdicts, plus a corpus line and an explanation that try to inject script). Screenshots of each page land in
the test's temporary directory; a failure names them."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from autointerp.review.app import create_app
from autointerp.store import open_store
from autointerp.store.blobs import pack_f16, pack_i32
from autointerp.store.engine import Store
from autointerp.store.tables import Context, Explanation, Record, Review, Score

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is missing: `make test` installs it (apt chromium)"),
]
XSS = '<script>alert("x")</script> <img src=x onerror=alert(1)> "><svg onload=alert(2)>'


def _plant(store: Store, tokenizer_dir: Path, seed: Any) -> dict[str, Any]:
    """The injection probes (an explanation and a corpus line of feature 0) and simulated activations for one of
    its test records."""
    from transformers import AutoTokenizer

    ids = seed(store)
    with store.session() as s:
        sc = s.exec(Score.__table__.select().where(Score.__table__.c.explanation_id == ids["tax policy"])).first()  # type: ignore[attr-defined]
        fid = sc.feature_id
        rec = s.exec(Record.__table__.select().where((Record.__table__.c.feature_id == fid)  # type: ignore[attr-defined]
                                                     & (Record.__table__.c.split == "test"))).first()  # fmt: skip
        ctx = s.get(Context, rec.context_id)
        n = len(np.frombuffer(rec.acts, dtype="<f2"))
        row = s.get(Score, sc.id)
        row.details = {"records": [{"context": ctx.idx, "predicted": [float(k % 11) for k in range(n)]}]}
        s.add(row)
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        payload = tok.encode(XSS)[:23]
        tokens = np.array([tok.bos_token_id or 0] + payload + [0] * (23 - len(payload)), dtype=np.int32)
        probe = Context(corpus_id=ctx.corpus_id, idx=10**6, doc_idx=ctx.doc_idx, offset=0, tokens=pack_i32(tokens))
        s.add(probe)
        s.flush()
        s.add(Record(feature_id=fid, context_id=probe.id, role="random", split="train", rank=99, max_act=0.5,
                     acts=pack_f16(np.full(23, 0.5, dtype=np.float32))))  # fmt: skip
        s.add(Explanation(feature_id=fid, explainer="llm", model="fake:xss", prompt="p", prompt_hash="x",
                          config_hash="x", status="ok", text=XSS))  # fmt: skip
        s.commit()
    return ids


@pytest.fixture()
def served(collected_db: str, tiny_gpt2_dir: Path, seed: Any) -> Iterator[tuple[str, Store, dict[str, Any]]]:
    import socket

    import uvicorn

    store = open_store(collected_db)
    ids = _plant(store, tiny_gpt2_dir, seed)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(store, reviewer="ann"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the review server did not start"
    yield f"http://127.0.0.1:{port}", store, ids
    server.should_exit = True
    thread.join(10)


@pytest.fixture()
def browser_page(tmp_path: Path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=flags)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(15_000)
        yield page
        browser.close()


def decisions(store: Store) -> list[tuple[str, str]]:
    with store.session() as s:
        return [(r.decision, r.text or "") for r in s.exec(Review.__table__.select().order_by(Review.__table__.c.id))]  # type: ignore[attr-defined]


def test_review_flow_in_chromium(served: tuple[str, Store, dict[str, Any]], browser_page: Any, tmp_path: Path) -> None:
    base, store, _ids = served
    page = browser_page
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    shots: list[Path] = []

    def shot(name: str) -> None:
        path = tmp_path / f"{len(shots):02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        shots.append(path)

    try:
        page.goto(base + "/")
        shot("list")
        assert page.locator("tr.feature-row").count() > 10
        page.select_option("select[name=sort]", "score")
        page.fill("input[name=min]", "0.5")
        page.click("#filters button[type=submit]")
        page.wait_for_url(re.compile(r"min=0.5"))
        shot("filtered")
        assert page.locator("tr.feature-row").count() == 4
        page.locator("tr.feature-row a").first.click()
        page.wait_for_url(re.compile(r"/feature/"))
        shot("feature")
        assert "tax policy" in page.inner_text("article.explanation.current")

        page.keyboard.press("a")
        page.wait_for_url(re.compile(r"done=accept"))
        assert page.get_by_role("status").inner_text() == "Saved: accepted."
        assert decisions(store) == [("accept", "")]

        page.keyboard.press("e")
        box = page.locator("#edit-text")
        assert box.is_visible()
        box.fill("taxes, tariffs and the revenue they raise")
        box.press("Control+Enter")
        page.wait_for_url(re.compile(r"done=edit"))
        shot("edited")
        assert decisions(store) == [("accept", ""), ("edit", "taxes, tariffs and the revenue they raise")]
        assert "taxes, tariffs and the revenue they raise" in page.content()

        page.keyboard.press("u")
        page.wait_for_url(re.compile(r"done=undo"))
        assert decisions(store) == [("accept", "")]

        sim = page.locator("#toggle-sim")
        real_line = page.locator(".rec.has-sim .toks.real").first
        assert real_line.is_visible() and not page.locator(".rec.has-sim .toks.sim").first.is_visible()
        sim.click()
        assert page.locator(".rec.has-sim .toks.sim").first.is_visible() and not real_line.is_visible()
        shot("simulated")

        # the injection probes render as text: no dialog, no element made from them
        assert XSS.split(" <img")[0] in page.inner_text("section.explanations")
        assert "<img src=x" in page.inner_text("section.records")
        made = page.evaluate(
            "() => [document.querySelectorAll('img').length, document.querySelectorAll('svg[onload]').length,"
            " [...document.scripts].filter(s => !s.src).length]"
        )
        assert made == [0, 0, 0]
        page.keyboard.press("?")
        assert page.locator("#help").is_visible()
        page.keyboard.press("Escape")

        page.fill("header input[name=q]", "taxes")
        page.keyboard.press("Enter")
        page.wait_for_url(re.compile(r"/search\?q=taxes"))
        shot("search")
        assert page.locator("ol.hits li").count() >= 2 and page.locator("mark").count() >= 2

        page.goto(base + "/review?order=lowest")
        first = page.locator("#decide-accept input[name=explanation]").get_attribute("value")
        page.keyboard.press("j")
        page.wait_for_url(re.compile(r"after="))
        assert page.locator("#decide-accept input[name=explanation]").get_attribute("value") != first
        page.keyboard.press("k")
        page.wait_for_url(re.compile(r"before="))
        assert page.locator("#decide-accept input[name=explanation]").get_attribute("value") == first
        shot("queue")

        page.goto(base + "/agreement")
        shot("agreement")
        assert "1 decision by 1 reviewer" in page.inner_text("main")

        refused = page.request.post(base + "/decide", form={"explanation": first, "decision": "reject"})
        assert refused.status == 403
        assert decisions(store) == [("accept", "")]
        assert dialogs == []
    except Exception as exc:
        with_failure = tmp_path / "failure.png"
        page.screenshot(path=str(with_failure), full_page=True)
        names = ", ".join(str(p) for p in [*shots, with_failure])
        raise AssertionError(f"{exc}\nscreenshots: {names}") from exc
