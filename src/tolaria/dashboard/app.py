"""The dashboard's web application (Starlette): pages, their live sections, JSON, scripts.

==================================  =========================================================
``GET /``                           the runs index (HTML); ``/sections?since=C`` its update
``GET /runs/{id}``                  one run (HTML); ``/runs/{id}/sections?since=C`` its update
``GET /academy``                    the academy: versions, nightly sessions, §7 metrics
``GET /api/runs``                   every run's summary (JSON)
``GET /api/runs/{id}``              one run: summary, curves, seeds, decisions, alerts (JSON)
``GET /api/academy``                ``TrainingMonitor.report()`` (JSON)
``GET /static/{name}``              the page script and style, and plotly's own plotly.min.js
==================================  =========================================================

A live page polls its ``sections`` URL with the cursor it last saw: an unchanged run answers
``{"changed": false}`` after a few ``stat`` calls (:class:`~tolaria.monitor.runs.RunView`
reads only appended bytes), a changed one the page's sections rendered again.  Handlers are
``async``: they run one at a time on the event loop, so the cached views need no lock.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from starlette.routing import Route

from tolaria.config import MonitorConfig
from tolaria.dashboard import pages
from tolaria.dashboard.guard import BadRunId, Guard, check_run_id, inside
from tolaria.monitor.runs import RunIndex, RunView

#: The page script and style (package data).
OWN_STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
PLOTLY_JS = "plotly.min.js"


def plotly_js() -> Path:
    """The ``plotly.min.js`` that the installed ``plotly`` package ships (its Python API is
    not imported: it is the JavaScript the browser needs)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the plotly package is not installed (pip install plotly)")
    path = Path(spec.origin).parent / "package_data" / PLOTLY_JS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed plotly package")
    return path


class Dashboard:
    """What the routes read: the runs under one root, the academy, the thresholds."""

    def __init__(self, runs_root: Path, academy_dir: Path, thresholds: MonitorConfig) -> None:
        self.runs_root = Path(runs_root)
        self.academy_dir = Path(academy_dir)
        self.thresholds = thresholds
        self.index = RunIndex(self.runs_root, thresholds)
        self.plotly = plotly_js()

    def run(self, request: Request) -> RunView:
        """The run the URL names: 400 for an id that is not a plain name, 404 for one that
        is not a run directory inside the root."""
        try:
            run_id = check_run_id(request.path_params["run_id"])
        except BadRunId as exc:
            raise HTTPException(400, str(exc)) from None
        if run_id not in self.index.run_ids() or not inside(self.runs_root, run_id):
            raise HTTPException(404, f"no run {run_id!r} under {self.runs_root}")
        return self.index.view(run_id)

    def monitor(self):
        from tolaria.monitor.academy import TrainingMonitor  # sqlite and the registry

        return TrainingMonitor(self.academy_dir, self.thresholds)


def index_cursor(views: list[RunView], now: float) -> str:
    """Changes when any run changes (or its state does: a heartbeat grows old unwritten)."""
    key = "|".join(f"{v.run_id}:{v.version}:{v.state(now)}" for v in views)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def run_cursor(view: RunView, now: float) -> str:
    return f"{view.version}:{view.state(now)}"


def create_app(runs_root: Path, academy_dir: Path, *, thresholds: MonitorConfig | None = None,
               token: str | None = None, loopback: bool = True) -> Guard:
    """The application, behind its :class:`~tolaria.dashboard.guard.Guard`."""
    board = Dashboard(runs_root, academy_dir, thresholds or MonitorConfig())

    async def index(request: Request) -> HTMLResponse:
        now, views = time.time(), board.index.views()
        body = pages.index_body(str(board.runs_root), views, now)
        return HTMLResponse(pages.page("Runs", "index", body, where=str(board.runs_root),
                                       live="/sections", cursor=index_cursor(views, now)))

    async def index_sections(request: Request) -> JSONResponse:
        now, views = time.time(), board.index.views()
        cursor = index_cursor(views, now)
        if request.query_params.get("since") == cursor:
            return JSONResponse({"changed": False, "cursor": cursor})
        return JSONResponse({"changed": True, "cursor": cursor,
                             "sections": pages.index_sections(views, now)})

    async def run_page(request: Request) -> HTMLResponse:
        view, now = board.run(request), time.time()
        live = f"/runs/{view.run_id}/sections"
        return HTMLResponse(pages.page(
            f"Run {view.run_id}", "run", pages.run_body(view, now), where=str(view.path),
            live=live, cursor=run_cursor(view, now), scripts=[f"/static/{PLOTLY_JS}"]))

    async def run_sections(request: Request) -> JSONResponse:
        view, now = board.run(request), time.time()
        cursor = run_cursor(view, now)
        if request.query_params.get("since") == cursor:
            return JSONResponse({"changed": False, "cursor": cursor})
        return JSONResponse({"changed": True, "cursor": cursor,
                             "sections": pages.run_sections(view, now),
                             "charts": pages.run_charts(view)})

    async def academy(request: Request) -> HTMLResponse:
        body = pages.academy_body(str(board.academy_dir), board.monitor(), time.time())
        return HTMLResponse(pages.page("Academy", "academy", body, where=str(board.academy_dir)))

    async def api_runs(request: Request) -> JSONResponse:
        now = time.time()
        return JSONResponse([view.summary(now) for view in board.index.views()])

    async def api_run(request: Request) -> JSONResponse:
        view, now = board.run(request), time.time()
        if request.query_params.get("since") == str(view.version):
            return JSONResponse({"changed": False, "version": view.version})
        return JSONResponse({"changed": True, "version": view.version, **view.detail(now)})

    async def api_academy(request: Request) -> JSONResponse:
        return JSONResponse(board.monitor().report())

    async def static(request: Request) -> FileResponse:
        name = request.path_params["name"]
        headers = {"cache-control": "max-age=3600"}
        if name == PLOTLY_JS:
            return FileResponse(board.plotly, media_type="text/javascript", headers=headers)
        if name not in OWN_STATIC:  # a fixed set of files: no path from the URL is opened
            raise HTTPException(404, f"no static file {name!r}")
        path = resources.files(__package__) / "static" / name
        return FileResponse(str(path), media_type=OWN_STATIC[name], headers=headers)

    async def error(request: Request, exc: HTTPException) -> PlainTextResponse:
        return PlainTextResponse(f"{exc.detail}\n", status_code=exc.status_code)

    routes = [
        Route("/", index), Route("/sections", index_sections),
        Route("/runs/{run_id}", run_page), Route("/runs/{run_id}/sections", run_sections),
        Route("/academy", academy),
        Route("/api/runs", api_runs), Route("/api/runs/{run_id}", api_run),
        Route("/api/academy", api_academy),
        Route("/static/{name}", static),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: error})
    return Guard(app, token=token, loopback=loopback)
