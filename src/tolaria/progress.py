"""Live progress for long runs: epoch and batch bars, validation accuracy, seed states."""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class ProgressReporter(Protocol):
    def start(self, first_epoch: int, total_epochs: int) -> None: ...
    def start_epoch(self, epoch: int, batches: int) -> None: ...
    def advance_batch(self) -> None: ...
    def end_epoch(self, record: dict[str, Any]) -> None: ...
    def note(self, message: str) -> None: ...
    def stop(self) -> None: ...


class NullProgress:
    """For tests, scripts and non-interactive use: reports nothing."""

    def start(self, first_epoch: int, total_epochs: int) -> None:
        pass

    def start_epoch(self, epoch: int, batches: int) -> None:
        pass

    def advance_batch(self) -> None:
        pass

    def end_epoch(self, record: dict[str, Any]) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def stop(self) -> None:
        pass


def describe_seeds(seed_states: dict[str, str]) -> str:
    counts = Counter(seed_states.values())
    return " ".join(f"{state}:{n}" for state, n in sorted(counts.items())) or "no seeds"


class RichProgress:
    """Two bars (epochs, batches of this epoch) and a status line after each epoch."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            transient=False,
        )
        self._epochs = None
        self._batches = None

    def start(self, first_epoch: int, total_epochs: int) -> None:
        self._progress.start()
        self._epochs = self._progress.add_task(
            "epochs", total=total_epochs, completed=first_epoch, status=""
        )
        self._batches = self._progress.add_task("batches", total=1, status="")

    def start_epoch(self, epoch: int, batches: int) -> None:
        self._progress.reset(self._batches, total=batches, description=f"epoch {epoch}")

    def advance_batch(self) -> None:
        self._progress.advance(self._batches)

    def end_epoch(self, record: dict[str, Any]) -> None:
        status = (
            f"val acc {record['val_accuracy']:.3f}  loss {record['val_loss']:.3f}  "
            f"params {record['params']:,}  seeds {describe_seeds(record['seed_states'])}"
        )
        self._progress.update(self._epochs, completed=record["epoch"] + 1, status=status)

    def note(self, message: str) -> None:
        self._progress.console.print(message)

    def stop(self) -> None:
        self._progress.stop()
