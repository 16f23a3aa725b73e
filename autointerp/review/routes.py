"""The review page's routes: the feature list, a feature, the review queue, decisions and undo, search, agreement.
Handlers are plain functions (FastAPI runs them in its thread pool): the store is synchronous."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from autointerp.review.app import REVIEWER_COOKIE, ReviewState, _integer, _number, _optional, cookie_value, local_path
from autointerp.store.search import QueryError

Render = Callable[..., HTMLResponse]
KEYS = [("a", "accept the explanation"), ("r", "reject it"), ("e", "edit: write a better one (saved beside it)"),
        ("f", "flag for another look"), ("u", "undo your last decision"), ("j", "next"), ("k", "previous"),
        ("?", "this help")]  # fmt: skip
DONE = {"accept": "accepted", "reject": "rejected", "edit": "edited", "flag": "flagged", "undo": "undone"}


def feature_url(key: str, **q: Any) -> str:
    rest = urlencode({k: v for k, v in q.items() if v is not None})
    return "/feature/" + quote(key, safe="/") + ("?" + rest if rest else "")


def add(app: FastAPI, state: ReviewState, render: Render, reviewer_of: Callable[[Request], str]) -> None:
    store = state.store

    @app.get("/", response_class=HTMLResponse)
    def features(request: Request) -> HTMLResponse:
        from autointerp.methods import METHODS
        from autointerp.store.browse import REVIEW_STATES, SORTS, ListQuery, list_page
        from autointerp.store.interventions import VERDICTS

        p = request.query_params
        q = ListQuery(site=_optional(p.get("site")), source=_optional(p.get("source")),
                      status=_optional(p.get("status")), explainer=_optional(p.get("explainer")),
                      method=p.get("method") or "simulation", min_score=_number("min", p.get("min")),
                      max_score=_number("max", p.get("max")), verdict=_optional(p.get("verdict")),
                      review=_optional(p.get("review")), sort=p.get("sort") or "score")  # fmt: skip
        limit = _integer("limit", p.get("limit"))
        limit = 50 if limit is None else limit
        page = list_page(store, q, _optional(p.get("after")), limit)
        kept = [(k, v) for k, v in p.multi_items() if k != "after" and v != ""]
        next_url = None if page.next_cursor is None else "/?" + urlencode([*kept, ("after", page.next_cursor)])
        first_url = "/?" + urlencode(kept) if p.get("after") else None
        return render(request, "list.html", title="features", q=q, rows=page.rows, next_url=next_url,
                      first_url=first_url, options=state.filter_options(), methods=METHODS, verdicts=VERDICTS,
                      reviews=list(REVIEW_STATES), sorts=list(SORTS), feature_url=feature_url, limit=limit)  # fmt: skip

    @app.get("/feature/{key:path}", response_class=HTMLResponse)
    def feature(request: Request, key: str) -> HTMLResponse:
        from autointerp.review.pages import default_explanation, feature_page

        page = feature_page(store, key, state.decode_for)
        chosen = _integer("e", request.query_params.get("e"))
        current = chosen if chosen is not None and chosen in page["texts"] else default_explanation(page)
        done = DONE.get(request.query_params.get("done", ""))
        return render(request, "feature.html", title=page["f"].id, page=page, current=current,
                      back=feature_url(page["f"].id, e=current), where="feature", queue=None, done=done, keys=KEYS,
                      feature_url=feature_url)  # fmt: skip

    @app.get("/review", response_class=HTMLResponse)
    def review(request: Request) -> HTMLResponse:
        from autointerp.methods import METHODS
        from autointerp.review.pages import feature_page
        from autointerp.store.reviews import ORDERS, reviewed_by
        from autointerp.store.search import check_method

        p = request.query_params
        order = p.get("order") or "lowest"
        method = p.get("method") or "simulation"
        check_method(method)
        seed = _integer("seed", p.get("seed")) or 0
        ids, pos = state.queue(order, method, seed)
        done = reviewed_by(store, reviewer_of(request))
        at = None
        if p.get("eid"):
            at = pos.get(_integer("eid", p.get("eid")) or -1)
        elif p.get("before"):
            k = pos.get(_integer("before", p.get("before")) or -1)
            at = None if k is None or k == 0 else k - 1
        else:
            start = pos.get(_integer("after", p.get("after")) or -1)
            start = 0 if start is None else start + 1
            at = next((k for k in range(start, len(ids)) if ids[k] not in done), None)
            if at is None and start > 0:  # wrapped: the unreviewed ones skipped earlier
                at = next((k for k in range(0, start) if ids[k] not in done), None)
        common = {"order": order, "method": method, "seed": seed}
        left = sum(1 for i in ids if i not in done)
        ctx = {"orders": ORDERS, "methods": METHODS, "left": left, "total": len(ids), **common}
        if at is None:
            return render(request, "queue_empty.html", title="review queue", keys=KEYS, **ctx)
        eid = ids[at]
        key = _feature_key(store, eid, missing_ok=True)
        if key is None:  # an edit's explanation removed by an undo since the order was made: the next one
            return RedirectResponse("/review?" + urlencode({**common, "after": eid}), status_code=303)  # type: ignore[return-value]
        page = feature_page(store, key, state.decode_for)
        queue = {**ctx, "position": at + 1, "eid": eid, "reviewed": eid in done,
                 "next": "/review?" + urlencode({**common, "after": eid}),
                 "prev": None if at == 0 else "/review?" + urlencode({**common, "before": eid}),
                 "where": f"queue:{order}:{method}:{seed}"}  # fmt: skip
        return render(request, "feature.html", title=f"review {key}", page=page, current=eid,
                      back=queue["next"], where=queue["where"], queue=queue,
                      done=DONE.get(p.get("done", "")), keys=KEYS, feature_url=feature_url, **ctx)  # fmt: skip

    @app.post("/decide")
    def decide_post(request: Request) -> RedirectResponse:
        from autointerp.store.reviews import decide

        form = request.state.form
        eid = _integer("explanation", form.get("explanation"))
        if eid is None:
            raise QueryError("which explanation? the form has no explanation id")
        row = decide(store, eid, reviewer_of(request), form.get("decision", ""), form.get("text"), form.get("note"))
        target = local_path(form.get("next"), feature_url(_feature_key(store, eid), e=eid))
        sep = "&" if "?" in target else "?"
        return RedirectResponse(f"{target}{sep}done={row.decision}", status_code=303)

    @app.post("/undo")
    def undo_post(request: Request) -> RedirectResponse:
        from autointerp.store.reviews import undo_last

        form = request.state.form
        row = undo_last(store, reviewer_of(request))
        if row is None:
            return RedirectResponse(local_path(form.get("next")), status_code=303)
        where = form.get("where", "feature")
        if where.startswith("queue:"):
            _q, order, method, seed = (where.split(":") + ["", "", ""])[:4]
            target = "/review?" + urlencode({"order": order, "method": method, "seed": seed, "eid": row.explanation_id})
        else:
            target = feature_url(_feature_key(store, row.explanation_id), e=row.explanation_id)
        return RedirectResponse(target + "&done=undo" if "?" in target else target + "?done=undo", status_code=303)

    @app.post("/reviewer")
    def set_reviewer(request: Request) -> RedirectResponse:
        from autointerp.store.reviews import check_reviewer

        form = request.state.form
        name = check_reviewer(form.get("reviewer", ""))
        if not name.isprintable():
            raise QueryError(f"reviewer name {name!r}: give printable characters only")
        resp = RedirectResponse(local_path(form.get("next")), status_code=303)
        resp.set_cookie(REVIEWER_COOKIE, cookie_value(name), samesite="strict", httponly=True)
        return resp

    @app.get("/search", response_class=HTMLResponse)
    def search_page(request: Request) -> HTMLResponse:
        from autointerp.query.search import search

        p = request.query_params
        words = (p.get("q") or "").strip()
        result = None
        if words:
            result = search(store, words, semantic=p.get("semantic") == "1", limit=50, encoder=state.encoder)
        return render(request, "search.html", title="search", words=words, semantic=p.get("semantic") == "1",
                      result=result, feature_url=feature_url, marks=_marks)  # fmt: skip

    @app.get("/agreement", response_class=HTMLResponse)
    def agreement_page(request: Request) -> HTMLResponse:
        from autointerp.review.agreement import agreement
        from autointerp.review.pages import calibration_svg
        from autointerp.store.reviews import latest_decisions

        a = agreement(latest_decisions(store))
        plots = {m.method: calibration_svg(m.bins) for m in a.methods}
        return render(request, "agreement.html", title="agreement", a=a, plots=plots)


def _feature_key(store: Any, explanation_id: int, missing_ok: bool = False) -> Any:
    from autointerp.store.explanations import feature_key_of

    key = feature_key_of(store, explanation_id)
    if key is None and not missing_ok:
        raise QueryError(f"no explanation {explanation_id}")
    return key


def _marks(snippet: str) -> list[tuple[str, bool]]:
    """A search snippet as (text, matched) parts, so the template marks the words without trusting the text."""
    from autointerp.store.search import MARK

    out: list[tuple[str, bool]] = []
    rest = snippet
    while MARK[0] in rest:
        before, _, after = rest.partition(MARK[0])
        word, _, rest = after.partition(MARK[1])
        out += [(before, False), (word, True)]
    return [*out, (rest, False)]
