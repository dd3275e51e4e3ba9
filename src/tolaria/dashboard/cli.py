"""``tolaria dashboard``: serve the runs and the academy to a browser, read-only.

The parser is import-light; starlette and uvicorn (the ``dashboard`` extra) are imported
only when the command runs.  The socket is bound here, before uvicorn starts, so a port in
use is one line with exit code 2 and ``--port 0`` (any free port) prints the port it got.
"""

from __future__ import annotations

import argparse
import errno
import secrets
import socket
from pathlib import Path

from rich.console import Console

from tolaria.config import load_config
from tolaria.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser(
        "dashboard", help="a live, read-only web dashboard of the runs and the academy")
    command.add_argument("--runs", type=Path,
                         help="the runs root (default: the config's run.runs_root, runs/)")
    command.add_argument("--academy", type=Path,
                         help="the academy directory (default: the config's academy, as "
                              "`tolaria train` finds it)")
    command.add_argument("--host", default=DEFAULT_HOST,
                         help="address to listen on (default: %(default)s); any other than a "
                              "loopback one needs the token the dashboard prints")
    command.add_argument("--port", type=int, default=DEFAULT_PORT,
                         help="port (default: %(default)s; 0: any free port)")
    command.add_argument("--config", type=Path,
                         help="YAML config whose academy.monitor thresholds to alert with")
    command.add_argument("--set", dest="overrides", action="append", default=[],
                         metavar="KEY=VALUE", help="override a config field (repeatable)")
    command.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> int:
    config = load_config(args.config, args.overrides)
    runs_root = args.runs or Path(config.run.runs_root)
    academy_dir = args.academy or config.academy_dir()
    if runs_root.exists() and not runs_root.is_dir():
        raise ConfigError(f"--runs {runs_root}: not a directory")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: not a port (0 to 65535)")

    import uvicorn  # the dashboard extra: only now

    from tolaria.dashboard.app import create_app
    from tolaria.dashboard.guard import is_loopback

    loopback = is_loopback(args.host)
    token = None if loopback else secrets.token_urlsafe(24)
    sock = bind(args.host, args.port)
    try:
        app = create_app(runs_root, academy_dir, thresholds=config.academy.monitor,
                         token=token, loopback=loopback)
    except FileNotFoundError as exc:  # plotly's script missing: the extra is not installed
        sock.close()
        raise ConfigError(f"{exc}; install the dashboard extra: pip install 'tolaria[dashboard]'"
                          ) from None
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    if not runs_root.exists():
        console.print(f"{runs_root} does not exist yet: runs appear as they start",
                      highlight=False)
    print(f"tolaria dashboard: {url}  (runs {runs_root}, academy {academy_dir}; Ctrl-C stops)",
          flush=True)
    if token:
        print(f"token: {token}  (bound to {args.host}: every request needs it, as ?token= or "
              "the X-Tolaria-Token header)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           lifespan="off"))
    server.run(sockets=[sock])
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; a port in use or an address not ours is one line."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is in use; choose another with --port "
                              "(0: any free port)") from None
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    return sock
