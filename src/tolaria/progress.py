"""What a person watching a run reads, as callbacks: one set of facts, two displays.

In a terminal, :class:`RichProgress` draws live epoch and batch bars with the facts of the
last epoch under them, fitted to any width of 60 columns or more.  Anywhere else -- a pipe,
a file, a CI log -- :class:`PlainProgress` writes one plain line per epoch, which nothing
truncates or wraps.  Both print a line for every seed transition, rollback and failed graft
as it happens; with ``run.progress: false`` those lines are all that is printed.

Epochs are numbered from 0, as in the record files and every message: ``epoch 7/29`` is
the eighth of a run's thirty (29 is its last).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from tolaria.events import Callback
from tolaria.summary import plain_value, seed_counts

#: Between two facts of a line.
GAP = "  "


def describe_seeds(seed_states: Mapping[str, Any]) -> str:
    """``dormant 3, fossilized 1``: how many seeds are in each state."""
    return plain_value(seed_counts(seed_states)) if seed_states else "no seeds"


def clock(seconds: float) -> str:
    """``0:01:12``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def epoch_name(record: Any, epochs: int | None = None) -> str:
    """``epoch 7`` (``epoch 7/29`` given the run's epochs), and which run of it when a
    rollback made it run again: ``epoch 7/29 (attempt 2)``."""
    last = f"/{epochs - 1}" if epochs is not None else ""
    again = f" (attempt {record.attempt})" if record.attempt > 1 else ""
    return f"epoch {record.epoch}{last}{again}"


class EpochClock:
    """How long the epochs take, and so how long the rest of the run will."""

    def __init__(self) -> None:
        self.epochs = 0  #: of the whole run, set at its start
        self._started = 0.0
        self._durations: list[float] = []

    def start(self) -> None:
        self._started = time.monotonic()

    def stop(self, epochs_done: int) -> tuple[float, str]:
        """The seconds of the epoch that just ended, and the ETA of the epochs still to run
        (after a rollback, those it undid too): their mean time so far, times their number."""
        seconds = time.monotonic() - self._started
        self._durations.append(seconds)
        mean = sum(self._durations) / len(self._durations)
        return seconds, clock(mean * max(self.epochs - epochs_done, 0))


def epoch_facts(record: Any, seconds: float, eta: str) -> list[str]:
    """The facts of a finished epoch, each one ``label value`` that must not be split."""
    facts = [
        f"train {record.train_loss:.3f}",
        f"val {record.val_loss:.3f}",
        f"acc {record.val_accuracy:.3f}",
        f"params {record.params:,}",
        f"seeds {describe_seeds(record.seed_states)}",
        f"{seconds:.1f}s",
        f"ETA {eta}",
    ]
    if record.rollback:
        facts.append("rolled back")
    return facts


def fit(facts: Iterable[str], width: int) -> list[str]:
    """``facts`` packed into lines of at most ``width`` columns, never split inside one."""
    lines: list[str] = []
    for fact in facts:
        if lines and len(lines[-1]) + len(GAP) + len(fact) <= width:
            lines[-1] += GAP + fact
        else:
            lines.append(fact)
    return lines


class TransitionLog(Callback):
    """A line for every seed transition, rollback and failed graft, written as it is and
    flushed at once (``run.progress: false`` prints these alone)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr

    def note(self, text: str, style: str | None = None) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def on_adaptation(self, trainer: Any, record: Any) -> None:
        blueprint = f" ({record.blueprint})" if record.blueprint else ""
        self.note(
            f"{epoch_name(record)}: {record.seed_id}{blueprint} "
            f"{record.from_state.value} -> {record.to_state.value}: {record.reason}"
        )

    def on_germination_failed(self, trainer: Any, record: Any) -> None:
        self.note(
            f"{epoch_name(record)}: {record.seed_id} could not graft {record.blueprint}: "
            f"{record.error}",
            "yellow",
        )

    def on_rollback(self, trainer: Any, record: Any) -> None:
        to = ("the start of the run" if record.restored_epoch < 0
              else f"the end of epoch {record.restored_epoch}")
        self.note(f"rollback at {epoch_name(record)} to {to}: {record.reason}", "red")


class PlainProgress(TransitionLog):
    """The transitions, and one line per epoch with its facts, for a pipe or a CI log."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self.clock = EpochClock()

    def on_run_start(self, trainer: Any, record: Any) -> None:
        self.clock.epochs = record.epochs

    def on_epoch_start(self, trainer: Any, record: Any) -> None:
        self.clock.start()

    def on_epoch_end(self, trainer: Any, record: Any) -> None:
        facts = epoch_facts(record, *self.clock.stop(trainer.current_epoch))
        self.note(GAP.join([epoch_name(record, self.clock.epochs), *facts]))


class _Bars(Progress):
    """rich's bars with the last epoch's facts under them, refitted at every refresh."""

    def __init__(self, *columns: Any, **options: Any) -> None:
        self.facts: list[str] = []  # before rich's own: its constructor renders once
        super().__init__(*columns, **options)

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        if self.facts:
            yield Text("\n".join(fit(self.facts, self.console.width)), no_wrap=False)


class RichProgress(TransitionLog):
    """Two bars (epochs, batches of this epoch) and the facts of the last epoch."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        super().__init__(self.console.file)
        self.clock = EpochClock()
        self._progress = _Bars(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=None),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            expand=True,
        )
        self._epochs = None
        self._batches = None

    def note(self, text: str, style: str | None = None) -> None:
        # A Text, not markup: a reason or an error may hold brackets of its own.  Wrapped
        # by rich, between words: the terminal would cut a long line anywhere, numbers too.
        self._progress.console.print(Text(text, style=style or ""), soft_wrap=False)

    def on_run_start(self, trainer: Any, record: Any) -> None:
        self.clock.epochs = record.epochs
        self._progress.start()
        self._epochs = self._progress.add_task("epochs", total=record.epochs,
                                               completed=record.epoch)
        self._batches = self._progress.add_task("batches", total=1)

    def on_epoch_start(self, trainer: Any, record: Any) -> None:
        self.clock.start()
        self._progress.reset(self._batches, total=record.batches, description=epoch_name(record))

    def on_batch_end(self, trainer: Any, record: Any) -> None:
        self._progress.advance(self._batches)

    def on_epoch_end(self, trainer: Any, record: Any) -> None:
        self._progress.facts = epoch_facts(record, *self.clock.stop(trainer.current_epoch))
        self._progress.update(self._epochs, completed=trainer.current_epoch)

    def on_run_end(self, trainer: Any, record: Any) -> None:
        self._progress.stop()


def make_display(console: Console, *, progress: bool) -> list[Callback]:
    """The display for ``console``: bars in an interactive terminal, plain lines elsewhere,
    transitions only without ``progress``, nothing at all on a quiet console."""
    if console.quiet:
        return []
    if not progress:
        return [TransitionLog(console.file)]
    if console.is_interactive:
        return [RichProgress(console)]
    return [PlainProgress(console.file)]
