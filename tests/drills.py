"""What the robustness tests and the fault drills share: the run they break, ways to
break it, and the drills' report.

* ``DRILL_SETTINGS``: a short digits run that grows, blends, fossilizes and culls within a
  few epochs and writes a durable checkpoint every epoch;
* :class:`Launcher`: ``tolaria`` commands in processes of their own, fast enough to kill a
  dozen of them per test session;
* damage: :func:`flip_byte`, :func:`truncate`, :class:`PlantedPickle`, and
  :class:`FullDisk`, a full disk in this process;
* the ``reliability`` fixture: one call per outcome row.  At the end of a session in which
  drills ran, ``TOLARIA_WRITE_RELIABILITY=1`` writes the rows to ``docs/reliability.md``
  (``make reliability``); otherwise the committed file's drills and trial counts must be
  the ones this session produced, so the document cannot drift from the suite.

``tests/conftest.py`` loads this module as a pytest plugin.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import multiprocessing
import os
import platform
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

# -- the run they break ---------------------------------------------------------------------

GROWTH = [
    "tamiyo.plateau_patience=1",
    "tamiyo.plateau_min_improvement=10",  # every epoch is a plateau: graft as soon as allowed
    "tamiyo.min_training_epochs=1",
    "kasmina.blend_epochs=1",
]
CLI_SETTINGS = [
    "data.dataset=digits",
    "data.batch_size=16",
    "run.epochs=8",
    "run.device=cpu",
    "run.progress=false",
    "run.tensorboard=false",
    "checkpoint.every_epochs=2",
    "scheduler.name=StepLR",
    "scheduler.kwargs.step_size=3",
    *GROWTH,
]
#: Six epochs, a checkpoint after each: every kill has a checkpoint close behind it, and
#: with ``keep=2`` every save from the third on also prunes.
DRILL_SETTINGS = [*CLI_SETTINGS, "run.epochs=6", "checkpoint.every_epochs=1"]


def train_args(run_dir: Path, cache: Path, settings: list[str] = DRILL_SETTINGS) -> list[str]:
    return ["train", "--run-dir", str(run_dir),
            *(f"--set={s}" for s in [*settings, f"data.cache_dir={cache}"])]


def metrics(run_dir: Path) -> list[dict]:
    """The run's ``metrics.jsonl`` records, in order (none if a kill came first)."""
    return _jsonl(run_dir / "metrics.jsonl")


def events(run_dir: Path) -> list[dict]:
    return _jsonl(run_dir / "events.jsonl")


def _jsonl(file: Path) -> list[dict]:
    lines = file.read_text().splitlines() if file.exists() else []
    try:
        return [json.loads(line) for line in lines]
    except json.JSONDecodeError:
        # Read while the run was appending: its last line is not complete yet.
        return [json.loads(line) for line in lines[:-1]]


def summary_without_clock(run_dir: Path) -> dict | None:
    """``summary.json`` less ``wall_time_s``, the one field a resumed run cannot repeat."""
    file = run_dir / "summary.json"
    if not file.exists():
        return None
    summary = json.loads(file.read_text())
    summary.pop("wall_time_s")
    return summary


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` and its contents: equal trees, nothing changed."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# -- damage ---------------------------------------------------------------------------------


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def delete(path: Path) -> None:
    path.unlink()


class PlantedPickle:
    """Unpickling this runs ``touch marker``: the marker's existence proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class FullDisk:
    """Inside ``with``: once ``when(path)`` holds for a write under ``root``, every write
    under ``root`` fails with ENOSPC, as on a disk that has just filled up.

    Covers files opened for writing by ``open``/``io.open`` (so pathlib too), whose writes
    fail, and ``os.write``/``os.fsync`` on descriptors of files under ``root`` (found via
    ``/proc/self/fd``, so on Linux only).  Opening and renaming still work: a full disk
    creates empty files.
    """

    def __init__(self, root: Path, *, when: Callable[[Path], bool]) -> None:
        self.root = os.path.realpath(root)
        self.when = when
        self.full = False
        self._patch = pytest.MonkeyPatch()

    def _fills(self, path) -> bool:
        """Whether a write to ``path`` fails (and from now on, every write under root)."""
        try:
            resolved = os.path.realpath(path)
        except TypeError:  # a file descriptor
            return False
        if not resolved.startswith(self.root + os.sep):
            return False
        self.full = self.full or self.when(Path(resolved))
        return self.full

    def _fd_fills(self, fd: int) -> bool:
        try:
            return self._fills(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return False

    def __enter__(self) -> FullDisk:
        real_open, real_write, real_fsync = io.open, os.write, os.fsync

        def full_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if any(c in mode for c in "wax+") and self._fills(file):
                return _FullFile(handle)
            return handle

        def full_write(fd, data):
            if self._fd_fills(fd):
                raise no_space()
            return real_write(fd, data)

        def full_fsync(fd):
            if self._fd_fills(fd if isinstance(fd, int) else fd.fileno()):
                raise no_space()
            return real_fsync(fd)

        for module in (io, builtins):
            self._patch.setattr(module, "open", full_open)
        self._patch.setattr(os, "write", full_write)
        self._patch.setattr(os, "fsync", full_fsync)
        return self

    def __exit__(self, *exc) -> None:
        self._patch.undo()


def no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullFile:
    """A file on a full disk: it opened, but nothing can be written to it."""

    def __init__(self, handle) -> None:
        self._handle = handle

    def write(self, data):
        raise no_space()

    writelines = write

    def __getattr__(self, name: str):
        return getattr(self._handle, name)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


# -- running `tolaria` ----------------------------------------------------------------------


@dataclass
class CliResult:
    code: int | None  # None: main raised instead of returning
    out: str
    err: str  # with the traceback when main raised

    @property
    def one_line_error(self) -> bool:
        """Failed with exactly one ``tolaria: error:`` line and no traceback."""
        lines = [line for line in self.err.splitlines() if "tolaria: error:" in line]
        return self.code not in (0, None) and len(lines) == 1 and "Traceback" not in self.err

    @property
    def ending(self) -> str:
        """How the command ended, in the words of the reliability table."""
        if self.code is None or "Traceback" in self.err:
            return "a traceback"
        return "one error line" if self.one_line_error else f"exit {self.code}"


def run_cli(argv: list[str]) -> CliResult:
    """``tolaria ARGV`` in this process; an escaping exception is a result, not a crash, so
    a drill can record the outcome before it asserts."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        from tolaria import cli

        try:
            code = cli.main(argv)
        except (Exception, SystemExit):  # Ctrl-C still stops the test session
            code = None
            traceback.print_exc()
    return CliResult(code, out.getvalue(), err.getvalue())


def _cli_process(argv: list[str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from tolaria import cli

    sys.exit(cli.main(argv))


class Launcher:
    """``tolaria`` commands in processes forked from a server that has imported torch,
    scikit-learn and Tolaria once: a process starts training in ~0.1 s instead of ~5 s of
    imports, which is what makes a dozen kill trials per session affordable.  Each process
    runs ``tolaria.cli.main`` -- the ``tolaria`` command itself -- with its output in a
    log file."""

    #: torch imports ``torch._dynamo`` at the first optimizer step (~1 s): preloaded, it
    #: does not stretch the first epoch of every process the drills kill.
    PRELOAD = ("tolaria.cli", "tolaria.build", "tolaria.checkpoint", "sklearn.datasets",
               "torch._dynamo")

    def __init__(self) -> None:
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(list(self.PRELOAD))

    def start(self, argv: list[str], log: Path) -> multiprocessing.Process:
        process = self.context.Process(target=_cli_process, args=(argv, str(log)))
        process.start()
        return process


def wait_until(condition: Callable[[], bool], process, *, timeout: float = 60.0,
               poll: float = 0.001) -> bool:
    """Wait for ``condition``; False if ``process`` ended first.  ``poll=0`` spins, for
    moments that last a millisecond; it asks about the process only every 100th turn,
    since that costs more than most conditions."""
    deadline = time.monotonic() + timeout
    turn = 0
    while not condition():
        turn += 1
        if poll or turn % 100 == 0:
            if not process.is_alive():
                return condition()
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
        if poll:
            time.sleep(poll)
    return True


# -- the reliability table ------------------------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
WRITE_ENV = "TOLARIA_WRITE_RELIABILITY"
COLUMNS = ("drill", "trials", "survived", "exact resumes", "bad inputs tried", "notes")


@dataclass(frozen=True)
class Row:
    drill: str
    trials: int
    survived: int
    exact: int | None  # None: nothing is compared with the reference run
    bad_inputs: str
    notes: str

    def cells(self) -> list[str]:
        exact = "—" if self.exact is None else str(self.exact)
        values = [self.drill, str(self.trials), str(self.survived), exact,
                  self.bad_inputs or "—", self.notes]
        return [v.replace("|", "\\|") for v in values]


class Report:
    """The rows of one session and what it takes to judge them against the document."""

    def __init__(self, config: pytest.Config) -> None:
        self.rows: list[Row] = []
        self.drill_seconds = 0.0
        # Every drill of the suite ran and passed, none skipped: only then is a row of the
        # document that no drill produced a sign of drift rather than of a partial session.
        self.complete = config.args_source is pytest.Config.ArgsSource.TESTPATHS
        self.problems: list[str] = []

    def record(self, drill: str, *, trials: int, survived: int, exact: int | None = None,
               bad_inputs: str = "", notes: str = "") -> None:
        if any(row.drill == drill for row in self.rows):
            raise ValueError(f"reliability row {drill!r} recorded twice")
        self.rows.append(Row(drill, trials, survived, exact, bad_inputs, notes))

    def render(self) -> str:
        header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
        table = "".join("| " + " | ".join(row.cells()) + " |\n" for row in self.rows)
        return (
            "# Reliability drills\n\n"
            "Written by `make reliability` (`TOLARIA_WRITE_RELIABILITY=1 pytest -m drill`): every "
            "row is what a drill in `tests/test_drills.py` measured in that session, not a claim "
            "made by hand. `make test` runs the same drills and fails if the drills or trial "
            "counts below no longer match what they do.\n\n"
            "*Survived*: trials in which Tolaria did what it must (the resumed run completed, or "
            "it refused or stopped with one line and lost nothing). *Exact resumes*: trials "
            "whose resumed `metrics.jsonl` equals the uninterrupted reference run's and whose "
            "`summary.json` equals it but for `wall_time_s`. The reference is a plain `python -m "
            "tolaria.cli train`; the runs that are killed or share a directory run "
            "`tolaria.cli.main` in processes forked from a server that has imported torch "
            "(`tests/drills.py: Launcher`); every other run and resume calls `tolaria.cli.main` "
            "in the test process.\n\n"
            f"Machine: `{platform.platform()}`, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}; {time.strftime('%Y-%m-%d')}; the drills took "
            f"{self.drill_seconds:.0f} s.\n\n" + header + table
        )

    def check(self, text: str) -> list[str]:
        """Disagreements between this session's rows and the committed table."""
        committed = {}
        for line in text.splitlines():
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if len(cells) == len(COLUMNS) and cells[1].isdigit():
                committed[cells[0].replace("\\|", "|")] = int(cells[1])
        problems = [
            f"{row.drill!r}: {row.trials} trials, the document says "
            + ("nothing" if row.drill not in committed else str(committed[row.drill]))
            for row in self.rows
            if committed.get(row.drill) != row.trials
        ]
        if self.complete:
            produced = {row.drill for row in self.rows}
            problems += [f"{name!r}: in the document, not produced by any drill"
                         for name in committed if name not in produced]
        return problems

    # -- pytest hooks --------------------------------------------------------------------
    def pytest_deselected(self, items) -> None:
        if any(_is_drill(item) for item in items):
            self.complete = False

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not _is_drill(report):
            return
        self.drill_seconds += report.duration
        if (report.skipped or report.failed) and not hasattr(report, "wasxfail"):
            self.complete = False

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not self.rows:
            return
        if os.environ.get(WRITE_ENV) == "1":
            DOC.write_text(self.render())
            return
        self.problems = self.check(DOC.read_text() if DOC.exists() else "")
        if self.problems:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if os.environ.get(WRITE_ENV) == "1" and self.rows:
            terminalreporter.write_line(f"wrote {DOC} ({len(self.rows)} drills)")
        for problem in self.problems:
            terminalreporter.write_line(
                f"docs/reliability.md is out of date: {problem}; regenerate it with "
                "`make reliability`", red=True)


def _is_drill(item_or_report) -> bool:
    return "drill" in item_or_report.keywords


_PLUGIN = "tolaria-reliability"


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(Report(config), _PLUGIN)


@pytest.fixture(scope="session")
def reliability(request) -> Callable[..., None]:
    """``reliability(drill, trials=, survived=, exact=, bad_inputs=, notes=)``: one row of
    ``docs/reliability.md``.  Record before asserting, so a failing drill still reports."""
    return request.config.pluginmanager.get_plugin(_PLUGIN).record
