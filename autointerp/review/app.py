"""`autointerp review`: the review page, server-rendered (FastAPI + Jinja2 with autoescape, one small script of
our own for the keys, no CDN). Nothing on its import path loads torch.

Security: every template escapes (autoescape on, nothing marked safe). A request whose Host header is not one of
the names this server answers to (loopback ones and those the user allowed) is refused before anything else: a
page of another site that rebinds its own name to 127.0.0.1 (DNS rebinding) would otherwise be same-origin with
this server and read its pages. Each POST carries the CSRF token of this server process (a page of another origin
cannot read it, so it cannot post a decision to localhost); a POST whose Origin is not an allowed host is refused
too. With an access token (required off loopback), every request must carry it: `?token=` once (it becomes an
HttpOnly cookie and the URL is cleaned), the cookie, or `Authorization: Bearer`. No token is ever written into a
page. The CSP allows scripts and styles from this server only, no inline ones. Every response, refusals and
errors included, carries the security headers; redirects are relative, so no Host header is ever echoed.
"""

from __future__ import annotations

import hmac
import html
import logging
import math
import re
import secrets
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from autointerp.store.engine import Store, StoreError, is_read_only
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
SECURITY_HEADERS = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}  # fmt: skip
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\]")  # a DNS name, IPv4, or bracketed IPv6
_MAX_ID = 2**63 - 1  # the largest integer the databases store
log = logging.getLogger("autointerp.review")


def host_entry(value: str) -> tuple[str, int | None]:
    """A host the server answers to, from `NAME` (any port) or `NAME:PORT`; an IPv6 address bare or in brackets.
    ValueError naming the value when it is neither."""
    v = value.strip().lower()
    if v.count(":") > 1 and not v.startswith("["):  # a bare IPv6 address
        v = f"[{v}]"
    got = _split_host(v)
    if got is None:
        raise ValueError(f"{value!r} is not a host name, an IP address, or either with :PORT")
    return got


def _split_host(value: str) -> tuple[str, int | None] | None:
    """(name, port or None) of a Host header's value (`name`, `name:port`, `[v6]:port`), None when malformed."""
    name, port = value, None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return None
            port = rest[1:]
    elif ":" in value:
        name, port = value.rsplit(":", 1)
    if not _NAME.fullmatch(name) or (port is not None and not (port.isascii() and port.isdigit() and len(port) <= 5)):
        return None
    number = None if port is None else int(port)
    if number is not None and number > 65535:
        return None
    return name, number


class Hosts:
    """The names this server answers to: each a (name, port) pair, port None for any. A Host header without a port
    means the scheme's default one (80 for http)."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = frozenset(host_entry(e) for e in entries)

    def allows(self, netloc: str | None, default_port: int = 80) -> bool:
        if not netloc or not netloc.isascii():
            return False
        got = _split_host(netloc.lower())
        if got is None:
            return False
        name, port = got
        port = default_port if port is None else port
        return (name, None) in self.entries or (name, port) in self.entries

    def allows_origin(self, origin: str) -> bool:
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or parts.path not in ("", "/") or parts.query or parts.username:
            return False
        return self.allows(parts.netloc, 443 if parts.scheme == "https" else 80)

    def shown(self) -> str:
        return ", ".join(sorted(n if p is None else f"{n}:{p}" for n, p in self.entries))


def same_secret(given: str, secret: str) -> bool:
    """A constant-time comparison of any text (compare_digest refuses str with non-ASCII characters)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), secret.encode("utf-8", "surrogatepass"))


def cookie_value(text: str) -> str:
    """A value a Set-Cookie header can carry whatever its characters (headers are Latin-1; a name may be anything)."""
    return quote(text, safe="")


def from_cookie(value: str) -> str:
    return unquote(value, errors="replace")


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
            from autointerp.store.queries import distinct_values

            opts = {name: distinct_values(self.store, name) for name in ("site", "source", "status", "explainer")}
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
    """A finite number from a query or form field (None when absent); QueryError naming the field otherwise."""
    if value is None or value == "":
        return None
    try:
        got = float(value)
    except ValueError:
        raise QueryError(f"{name} must be a number, not {value!r}") from None
    if not math.isfinite(got):
        raise QueryError(f"{name} must be a finite number, not {value!r}")
    return got


def _integer(name: str, value: str | None) -> int | None:
    """A whole number the database can hold, from a query or form field (None when absent); QueryError otherwise."""
    if value is None or value == "":
        return None
    try:
        got = int(value)
    except ValueError:
        number = _number(name, value)
        if number is None or not number.is_integer():
            raise QueryError(f"{name} must be a whole number, not {value!r}") from None
        got = int(number)
    if abs(got) > _MAX_ID:
        raise QueryError(f"{name} is out of range: {value!r}")
    return got


def _page(title: str, message: str, status: int) -> HTMLResponse:
    """A refusal or error before (or instead of) the templates: plain, escaped, with the same headers."""
    body = f"<!doctype html><title>{html.escape(title)}</title><p>{html.escape(message)}</p>"
    return HTMLResponse(body, status_code=status)


def _write_refused(exc: BaseException) -> str | None:
    """What to tell the user when the database refused a write it cannot take (read-only, busy), else None."""
    if is_read_only(exc):
        return "the database is read-only: this page can show it but not save decisions"
    words = str(getattr(exc, "orig", None) or exc).lower()
    if "locked" in words or "busy" in words:
        return "the database is busy (another process holds its write lock): try again in a moment"
    return None


def create_app(
    store: Store,
    *,
    reviewer: str = "reviewer",
    token: str | None = None,
    encoder: Any = None,
    allowed_hosts: Iterable[str] | None = None,
) -> FastAPI:
    """The review page's app. `allowed_hosts`: the names (`NAME` for any port, `NAME:PORT`) a request's Host header
    may carry; by default the loopback names on any port (`autointerp review` passes them with its port)."""
    from sqlalchemy.exc import DBAPIError

    from autointerp.review import routes
    from autointerp.store.reviews import check_reviewer

    state = ReviewState(store, check_reviewer(reviewer), token, encoder)
    hosts = Hosts(LOOPBACK_NAMES if allowed_hosts is None else allowed_hosts)
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)  # fmt: skip
    # No trailing-slash redirects: Starlette builds them from the Host header (an absolute URL to any name).
    app = FastAPI(title="autointerp review", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
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
            return check_reviewer(from_cookie(name)) if name else state.reviewer
        except QueryError:
            return state.reviewer

    async def checked(request: Request, call_next: Any) -> Response:
        """The request's checks in order: its Host, its access token, a POST's Origin and CSRF token."""
        if not hosts.allows(request.headers.get("host")):
            why = f"this review server answers only to {hosts.shown()}: start it with --allowed-host NAME for another"
            return _page("unknown host", why, 400)
        if state.token is not None:
            given = request.query_params.get("token")
            if given is not None and same_secret(given, state.token):
                rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
                # One leading slash: "//host/?token=" must not become a protocol-relative redirect to that host.
                path = "/" + request.url.path.lstrip("/\\")
                resp: Response = RedirectResponse(path + ("?" + rest if rest else ""), status_code=303)
                resp.set_cookie(TOKEN_COOKIE, state.token, httponly=True, samesite="strict")
                return resp
            bearer = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            held = request.cookies.get(TOKEN_COOKIE) or bearer
            if not held or not same_secret(held, state.token):
                return HTMLResponse(_NEED_TOKEN, status_code=401)
        if "\x00" in request.url.path or any("\x00" in k + v for k, v in request.query_params.multi_items()):
            return _page("bad request", "the address holds a NUL character", 400)
        if request.method == "POST":
            origin = request.headers.get("origin")
            if origin and origin != "null" and not hosts.allows_origin(origin):
                return _page("refused", "cross-origin request refused", 403)
            body = await request.body()
            form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
            if not same_secret(form.get("csrf", ""), state.csrf):
                return _page("refused", "missing or wrong CSRF token: reload the page and try again", 403)
            if any("\x00" in k + v for k, v in form.items()):
                return _page("bad request", "the form holds a NUL character", 400)
            request.state.form = form
        return await call_next(request)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        # Every response leaves through here, an unexpected error's too (logged, answered 500 without details),
        # so every one carries the security headers.
        try:
            resp = await checked(request, call_next)
        except Exception:
            log.exception("review page: %s %s failed", request.method, request.url.path)
            resp = _page("internal error", "internal error: the server's log has the details", 500)
        resp.headers.update(SECURITY_HEADERS)
        return resp

    @app.exception_handler(QueryError)
    async def bad_query(request: Request, exc: QueryError) -> HTMLResponse:
        return render(request, "error.html", 400, title="bad request", message=str(exc))

    @app.exception_handler(FeatureNotFound)
    async def not_found(request: Request, exc: FeatureNotFound) -> HTMLResponse:
        return render(request, "error.html", 404, title="not found", message=str(exc))

    @app.exception_handler(StoreError)
    async def unusable(request: Request, exc: StoreError) -> HTMLResponse:
        return render(request, "error.html", 503, title="database unavailable", message=str(exc))

    @app.exception_handler(DBAPIError)
    async def refused_write(request: Request, exc: DBAPIError) -> HTMLResponse:
        message = _write_refused(exc)
        if message is None:
            raise exc  # an error of ours: the guard answers 500 and logs it
        return render(request, "error.html", 503, title="not saved", message=message)

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in _STATIC:
            return Response("not found", status_code=404)
        return FileResponse(HERE / "static" / name, media_type=_STATIC[name])

    routes.add(app, state, render, reviewer_of)
    return app
