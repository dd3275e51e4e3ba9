"""What keeps the dashboard read-only and local: one ASGI middleware and the run-id check.

* Only ``GET`` and ``HEAD``: any other method is answered 405 before a route is looked at,
  so no endpoint can write or delete, whatever is added later.
* Bound to a loopback address, the server answers only requests whose ``Host`` is a loopback
  name: a web page elsewhere cannot reach it through DNS rebinding.
* Bound to any other address, every request needs the token printed at start: ``?token=``
  (which also sets a cookie, so the links of the page work), the ``X-Tolaria-Token`` header,
  or that cookie.  Compared with :func:`hmac.compare_digest`.
* A run id names one folder directly under the runs root: ``..``, separators, absolute
  paths and hidden names are refused (400); a symlink or a folder that is not a run is
  not found (404).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs

ALLOWED_METHODS = ("GET", "HEAD")
TOKEN_HEADER = "x-tolaria-token"
TOKEN_COOKIE = "tolaria_token"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
#: Headers on every answer: nothing of ours in a frame, no sniffed types, scripts only ours
#: (plotly sets inline styles on its charts, hence ``style-src 'unsafe-inline'``).
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
     b"img-src 'self' data:; frame-ancestors 'none'"),
)
_HOST_PORT = re.compile(r"^\[?([^\]]*?)\]?(?::\d+)?$")


class BadRunId(ValueError):
    """A run id that cannot name a folder under the runs root."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_run_id(run_id: str) -> str:
    """``run_id`` if it can only name a folder directly under the root; else :class:`BadRunId`."""
    if (not run_id or run_id in (".", "..") or run_id.startswith(".") or "/" in run_id
            or "\\" in run_id or "\x00" in run_id or Path(run_id).is_absolute()):
        raise BadRunId(f"{run_id!r} is not a run id")
    return run_id


def inside(root: Path, run_id: str) -> bool:
    """Whether ``root/run_id`` is a real folder inside ``root`` (no symlink out of it)."""
    folder = Path(root) / run_id
    if folder.is_symlink() or not folder.is_dir():
        return False
    return folder.resolve().parent == Path(root).resolve()


class Guard:
    """The middleware: methods, ``Host`` (loopback binds) and token (other binds)."""

    def __init__(self, app, *, token: str | None = None, loopback: bool = True) -> None:
        self.app = app
        self.token = token
        self.loopback = loopback

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ALLOWED_METHODS:
            await _plain(send, 405, "the dashboard is read-only: only GET and HEAD",
                         [(b"allow", ", ".join(ALLOWED_METHODS).encode())])
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.loopback and not _loopback_host(headers.get("host", "")):
            await _plain(send, 400, "this dashboard answers only to localhost")
            return
        set_cookie = False
        if self.token is not None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            offered = (query.get("token") or [None])[0]
            set_cookie = offered is not None
            offered = offered or headers.get(TOKEN_HEADER) or _cookie(headers.get("cookie"))
            if offered is None or not hmac.compare_digest(offered.encode(), self.token.encode()):
                await _plain(send, 401, "this dashboard needs the token it printed at start "
                             "(?token=... or the X-Tolaria-Token header)")
                return

        async def send_secured(message) -> None:
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                if set_cookie:
                    extra.append((b"set-cookie", f"{TOKEN_COOKIE}={self.token}; Path=/; "
                                  "HttpOnly; SameSite=Strict".encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_secured)


def _loopback_host(host: str) -> bool:
    match = _HOST_PORT.match(host.strip())
    return bool(match) and is_loopback(match.group(1))


def _cookie(header: str | None) -> str | None:
    if not header:
        return None
    try:
        morsel = SimpleCookie(header).get(TOKEN_COOKIE)
    except CookieError:
        return None
    return morsel.value if morsel is not None else None


async def _plain(send, status: int, text: str, headers: list | None = None) -> None:
    body = (text + "\n").encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS, *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
