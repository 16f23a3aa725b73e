"""`autointerp review`: the review page, server-rendered (FastAPI + Jinja2 with autoescape, one small script of
our own for the keys, no CDN). Nothing on its import path loads torch.

Security: every template escapes (autoescape on, nothing marked safe). Each POST carries the CSRF token of this
server process (a page of another origin cannot read it, so it cannot post a decision to localhost); a POST whose
Origin is another site is refused too. With an access token (required off loopback), every request must carry it:
`?token=` once (it becomes an HttpOnly cookie and the URL is cleaned), the cookie, or `Authorization: Bearer`.
No token is ever written into a page. The CSP allows scripts and styles from this server only, no inline ones.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from autointerp.store.engine import Store
from autointerp.store.queries import FeatureNotFound
from autointerp.store.search import QueryError

HERE = Path(__file__).parent
TOKEN_COOKIE = "autointerp_token"
REVIEWER_COOKIE = "autointerp_reviewer"
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'")  # fmt: skip
_NEED_TOKEN = (
    "<!doctype html><title>token required</title><p>This review server needs its access token: open the "
    "URL it printed (…?token=…).</p>"
)
_STATIC = {"review.js": "text/javascript", "review.css": "text/css"}


class ReviewState:
    """What the app keeps between requests: caches keyed by the database's state, never the data itself."""

    def __init__(self, store: Store, reviewer: str, token: str | None, encoder: Any = None) -> None:
        self.store = store
        self.reviewer = reviewer
        self.token = token
        self.csrf = secrets.token_urlsafe(32)
        self.encoder = encoder
        self.lock = threading.Lock()
        self.decoders: dict[str, Any] = {}
        self.queues: dict[tuple[Any, ...], tuple[tuple[Any, ...], list[int], dict[int, int], int]] = {}
        self.options: tuple[tuple[Any, ...], dict[str, list[str]]] | None = None

    def stamp(self) -> tuple[Any, ...]:
        from autointerp.store.reviews import queue_stamp

        return queue_stamp(self.store)

    def decode_for(self, model_id: str) -> Any:
        with self.lock:
            if model_id not in self.decoders:
                from autointerp.records import decoder

                self.decoders[model_id] = decoder(self.store, model_id)
            return self.decoders[model_id]

    def queue(self, order: Any, method: str, seed: int) -> tuple[list[int], dict[int, int]]:
        """The queue's order, computed again when features or scores were added (they move explanations in it).
        Explanations added since without a score (a reviewer's edit) go at its end; one removed since (an undone
        edit) is skipped when reached."""
        from autointerp.store.reviews import explanations_after, queue_order

        feature_max, explanation_max, score_max = self.stamp()
        key = (order, method, seed)
        got = self.queues.get(key)
        if got is None or got[0] != (feature_max, score_max):
            ids = queue_order(self.store, order, method, seed)
            got = ((feature_max, score_max), ids, {e: k for k, e in enumerate(ids)}, max(ids, default=0))
        elif (explanation_max or 0) > got[3]:
            ids, pos = got[1], got[2]
            for e in explanations_after(self.store, got[3]):
                pos.setdefault(e, len(ids))
                if pos[e] == len(ids):
                    ids.append(e)
            got = (got[0], ids, pos, explanation_max)
        self.queues[key] = got
        return got[1], got[2]

    def filter_options(self) -> dict[str, list[str]]:
        stamp = self.stamp()
        if self.options is None or self.options[0] != stamp:
            with self.store.engine.connect() as conn:
                opts = {
                    name: [r[0] for r in conn.exec_driver_sql(sql) if r[0] is not None]
                    for name, sql in (
                        ("site", "SELECT DISTINCT site FROM feature ORDER BY site"),
                        ("source", "SELECT DISTINCT source FROM feature ORDER BY source"),
                        ("status", "SELECT DISTINCT status FROM feature ORDER BY status"),
                        ("explainer", "SELECT DISTINCT explainer FROM explanation ORDER BY explainer"),
                    )
                }
            self.options = (stamp, opts)
        return self.options[1]


def settle() -> None:
    """Move what is alive now (modules, the tokenizer, cached orders) out of the garbage collector's sight: a full
    collection then scans only what requests allocate, not the whole heap (it made one page in twenty 3x slower)."""
    import gc

    gc.collect()
    gc.freeze()


def local_path(target: str | None, default: str = "/") -> str:
    """A redirect target that stays on this server (a path, never //host or a scheme)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


def _optional(value: str | None) -> str | None:
    return value if value not in (None, "") else None


def _number(name: str, value: str | None) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        raise QueryError(f"{name} must be a number, not {value!r}") from None


def create_app(store: Store, *, reviewer: str = "reviewer", token: str | None = None, encoder: Any = None) -> FastAPI:
    from autointerp.review import routes
    from autointerp.store.reviews import check_reviewer

    state = ReviewState(store, check_reviewer(reviewer), token, encoder)
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)  # fmt: skip
    app = FastAPI(title="autointerp review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.review = state

    def render(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        page = env.get_template(name).render(
            csrf=state.csrf, reviewer=reviewer_of(request), path=request.url.path,
            here=request.url.path + ("?" + request.url.query if request.url.query else ""), **ctx,
        )  # fmt: skip
        return HTMLResponse(page, status_code=status)

    def reviewer_of(request: Request) -> str:
        name = request.cookies.get(REVIEWER_COOKIE)
        try:
            return check_reviewer(name) if name else state.reviewer
        except QueryError:
            return state.reviewer

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if state.token is not None:
            given = request.query_params.get("token")
            if given is not None and hmac.compare_digest(given, state.token):
                rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
                resp: Response = RedirectResponse(request.url.path + ("?" + rest if rest else ""), status_code=303)
                resp.set_cookie(TOKEN_COOKIE, state.token, httponly=True, samesite="strict")
                return resp
            bearer = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            held = request.cookies.get(TOKEN_COOKIE) or bearer
            if not held or not hmac.compare_digest(held, state.token):
                return HTMLResponse(_NEED_TOKEN, status_code=401)
        if request.method == "POST":
            origin = request.headers.get("origin")
            if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
                return HTMLResponse("cross-origin request refused", status_code=403)
            body = await request.body()
            form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
            if not hmac.compare_digest(form.get("csrf", ""), state.csrf):
                return HTMLResponse("missing or wrong CSRF token: reload the page and try again", status_code=403)
            request.state.form = form
        resp = await call_next(request)
        resp.headers["Content-Security-Policy"] = _CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["X-Frame-Options"] = "DENY"
        return resp

    @app.exception_handler(QueryError)
    async def bad_query(request: Request, exc: QueryError) -> HTMLResponse:
        return render(request, "error.html", 400, title="bad request", message=str(exc))

    @app.exception_handler(FeatureNotFound)
    async def not_found(request: Request, exc: FeatureNotFound) -> HTMLResponse:
        return render(request, "error.html", 404, title="not found", message=str(exc))

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in _STATIC:
            return Response("not found", status_code=404)
        return FileResponse(HERE / "static" / name, media_type=_STATIC[name])

    routes.add(app, state, render, reviewer_of)
    return app
