"""`autointerp review`: serve the review page (no torch on its path)."""

from __future__ import annotations

import contextlib
import errno
import getpass
import ipaddress
import secrets
from typing import Annotated

import typer

from autointerp.cli import ConfigOpt, DbOpt, _cfg, _store, app, console


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _default_reviewer() -> str:
    try:
        return getpass.getuser() or "reviewer"
    except Exception:  # no user name in this environment (a container without /etc/passwd entry)
        return "reviewer"


@app.command()
def review(
    db: DbOpt = None,
    config: ConfigOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on; off loopback, an access token is required.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    reviewer: Annotated[str | None, typer.Option(help="Name your decisions are stored under (default: $USER).")] = None,
    token: Annotated[
        str | None, typer.Option(help="Access token every request must carry (generated off loopback).")
    ] = (None),
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            metavar="NAME",
            help="Another name (or NAME:PORT) the page may be reached by, e.g. this machine's name off loopback or "
            "a reverse proxy's; repeatable. Requests naming any other host are refused (DNS rebinding).",
        ),
    ] = None,
) -> None:
    """Review scored explanations in the browser: feature list, feature pages, a review queue with keys, agreement
    figures. Reads the database a job may be writing at the same time. Answers to 127.0.0.1, localhost, [::1] and
    the --host address on its port, and to the --allowed-host names. Ctrl-C stops it."""
    import socket

    import uvicorn

    from autointerp.review.app import LOOPBACK_NAMES, create_app, host_entry, settle

    if not 0 <= port <= 65535:
        raise typer.BadParameter(f"port {port} is not between 0 and 65535", param_hint="--port")
    if token is not None and len(token) < 8:
        raise typer.BadParameter("give a token of at least 8 characters", param_hint="--token")
    from autointerp.store.reviews import check_reviewer
    from autointerp.store.search import QueryError

    try:
        name = check_reviewer(reviewer or _default_reviewer())
    except QueryError as exc:
        raise typer.BadParameter(str(exc), param_hint="--reviewer") from None
    extra = list(allowed_host or [])
    for value in extra:
        try:
            host_entry(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--allowed-host") from None
    generated = False
    if token is None and not _loopback(host):
        token, generated = secrets.token_urlsafe(24), True
    store = _store(_cfg(config, {"db": db}).db)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        # An unknown name or an address not on this machine is the --host's fault; anything else (in use,
        # privileged) the --port's.
        flag = "--host" if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL else "--port"
        raise typer.BadParameter(f"cannot listen on {host}:{port}: {exc.strerror}", param_hint=flag) from None
    sock.listen(128)  # before the URL is printed: a browser opening it at once waits in the backlog, never refused
    bound = sock.getsockname()[1]
    listen = f"[{host}]" if ":" in host else host
    names = [f"{n}:{bound}" for n in dict.fromkeys([*LOOPBACK_NAMES, listen])]
    application = create_app(store, reviewer=name, token=token, allowed_hosts=[*names, *extra])
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else listen
    url = f"http://{shown}:{bound}/" + (f"?token={token}" if token else "")
    if generated:
        console.print("listening beyond loopback: every request needs the access token generated below")
    if not _loopback(host) and not extra:
        console.print("other machines reach it by a name or address given with --allowed-host (e.g. this machine's)")
    if store.read_only:
        console.print("the database is read-only: the page shows it, decisions cannot be saved")
    console.print(f"review page: {url}")
    settle()
    config_ = uvicorn.Config(application, log_level="warning", access_log=False)
    server = uvicorn.Server(config_)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn stops on Ctrl-C itself; a second one lands here
        server.run(sockets=[sock])
