"""The review page on PostgreSQL (Starlette's test client, the real app): every page, decisions, undo, the
agreement page and keyset pages over a collected and seeded database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from autointerp.review.app import create_app
from autointerp.store import open_store
from autointerp.store.browse import ListQuery, list_page
from autointerp.store.queries import list_features

LOCAL = "http://127.0.0.1:8000"  # a loopback Host: the app refuses the test client's default "testserver"


def test_the_page_on_postgresql(
    postgres_db: str,
    collect_into: Any,
    tmp_path: Path,
    seed: Any,
    page_csrf: Any,
    review_rows: Any,
    feature_key_of: Any,
) -> None:
    collect_into(postgres_db, tmp_path)
    store = open_store(postgres_db)
    ids = seed(store)
    client = TestClient(create_app(store, reviewer="ann"), base_url=LOCAL, follow_redirects=False)
    page = f"/feature/{feature_key_of(store, ids['tax policy'])}"
    for url in ("/?sort=score", "/?sort=max&review=unreviewed", "/?sort=score&verdict=verified&min=0.1", "/review",
                "/review?order=uncertain", "/search?q=taxes", page):  # fmt: skip
        assert client.get(url).status_code == 200, url
    token = page_csrf(client.get("/").text)
    edit = {"csrf": token, "explanation": ids["tax policy"], "decision": "edit", "text": "tariffs"}
    client.post("/decide", data=edit)
    client.post("/decide", data={"csrf": token, "explanation": ids["numbers and dates"], "decision": "accept"})
    assert [r[2] for r in review_rows(store)] == ["edit", "accept"]
    assert "2 decisions by 1 reviewer" in client.get("/agreement").text
    assert len(list_page(store, ListQuery(review="reviewed")).rows) == 2
    client.post("/undo", data={"csrf": token})
    client.post("/undo", data={"csrf": token})
    assert review_rows(store) == []
    for sort in ("max", "score"):
        want = [r.id for r in list_features(store, sort=sort, limit=None)]  # type: ignore[arg-type]
        got, cursor = [], None
        while True:
            page = list_page(store, ListQuery(sort=sort), cursor, limit=9)
            got += [r.feature.id for r in page.rows]
            if (cursor := page.next_cursor) is None:
                break
        assert got == want, sort
