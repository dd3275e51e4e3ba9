"""What the robustness tests and the fault drills share: the run they break, ways to
break its files, readers of what it leaves behind -- and the drills' report.

The ``reliability`` fixture records one outcome row per call.  At the end of a session in
which drills ran, ``TOLARIA_WRITE_RELIABILITY=1`` writes the rows to ``docs/reliability.md``
(``make reliability``); otherwise the committed file's drills and trial counts must be the
ones this session produced, so the document cannot drift from the suite.
``tests/conftest.py`` loads this module as a pytest plugin.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

# -- the run they break ---------------------------------------------------------------------

GROWTH = [
    "tamiyo.plateau_patience=1",
    "tamiyo.plateau_min_delta=10",  # every epoch is a plateau: graft as soon as allowed
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


def metrics(run_dir: Path) -> list[dict]:
    """The run's ``metrics.jsonl`` records, in order (none if a kill came first)."""
    return _jsonl(run_dir / "metrics.jsonl")


def _jsonl(file: Path) -> list[dict]:
    lines = file.read_text().splitlines() if file.exists() else []
    try:
        return [json.loads(line) for line in lines]
    except json.JSONDecodeError:
        # Read while the run was appending: its last line is not complete yet.
        return [json.loads(line) for line in lines[:-1]]


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


class PlantedPickle:
    """Unpickling this runs ``touch marker``: the marker's existence proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


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
            "`summary.json` equals it but for `wall_time_s`.\n\n"
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
