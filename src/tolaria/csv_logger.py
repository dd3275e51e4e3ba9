"""``<run_dir>/metrics.csv``: one row per epoch run, for a spreadsheet or ``pandas.read_csv``.

The columns are :func:`tolaria.loggers.epoch_row`'s plus the wall-clock ``time``, and the
header is written once: rows are appended as epochs end, in one write each, so a killed run
keeps every complete row.  A rollback's re-run of an epoch is a row of its own with a higher
``attempt`` (the one with the highest is the one the run kept).  A resume keeps the file and
its header and drops only the rows of the epochs it runs again, as ``metrics.jsonl`` does.
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Any

from tolaria.events import Callback
from tolaria.loggers import epoch_row

FILE = "metrics.csv"


class CSVLogger(Callback):
    """Writes through the trainer's run directory, so a full disk is one line, as for the
    run's other files."""

    def __init__(self) -> None:
        self._columns: list[str] | None = None  # the file's header, once known

    def on_resume(self, trainer: Any, record: Any) -> None:
        header, rows = _read(trainer.run_dir.path / FILE)
        if header is None:
            return
        epoch = header.index("epoch") if "epoch" in header else None
        kept = [row for row in rows
                if epoch is not None and _number(row, epoch) <= record.checkpoint_epoch]
        trainer.run_dir.write_text(FILE, "".join(_line(v) + "\n" for v in [header, *kept]))
        self._columns = header

    def on_epoch_end(self, trainer: Any, record: Any) -> None:
        row = {**epoch_row(record), "time": round(time.time(), 3)}
        if self._columns is None:
            self._columns = _read(trainer.run_dir.path / FILE)[0]
            if self._columns is None:
                self._columns = list(row)
                trainer.run_dir.append_line(FILE, _line(self._columns))
        # The file's own columns: a file begun by another version of Tolaria stays whole.
        trainer.run_dir.append_line(FILE, _line([row.get(c, "") for c in self._columns]))


def _line(values: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(values)
    return buffer.getvalue()


def _read(path: Path) -> tuple[list[str] | None, list[list[str]]]:
    """The file's header (None: no file yet) and rows; a last line without its newline is
    a row a kill cut short, and is dropped."""
    if not path.exists():
        return None, []
    lines = path.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    table = list(csv.reader(lines))
    return (table[0], table[1:]) if table else (None, [])


def _number(row: list[str], column: int) -> float:
    """The integer in ``row[column]``; infinite where there is none (a damaged row, which
    is never kept)."""
    try:
        return int(row[column])
    except (IndexError, ValueError):
        return math.inf
