"""Live progress for long runs, as a callback: epoch and batch bars, the validation score,
seed states, and a line for every seed transition and rollback as it happens."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tolaria.events import Callback


def describe_seeds(seed_states: Mapping[str, Any]) -> str:
    counts = Counter(str(state) for state in seed_states.values())
    return " ".join(f"{state}:{n}" for state, n in sorted(counts.items())) or "no seeds"


class RichProgress(Callback):
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

    def on_run_start(self, trainer: Any, record: Any) -> None:
        self._progress.start()
        self._epochs = self._progress.add_task(
            "epochs", total=record.epochs, completed=record.epoch, status=""
        )
        self._batches = self._progress.add_task("batches", total=1, status="")

    def on_epoch_start(self, trainer: Any, record: Any) -> None:
        description = f"epoch {record.epoch}"
        self._progress.reset(self._batches, total=record.batches, description=description)

    def on_batch_end(self, trainer: Any, record: Any) -> None:
        self._progress.advance(self._batches)

    def on_epoch_end(self, trainer: Any, record: Any) -> None:
        task = trainer.task  # the score is its monitor: name it, in its own units
        status = (
            f"val {task.monitor} {task.monitored(record.val_accuracy):.3f}  "
            f"loss {record.val_loss:.3f}  "
            f"params {record.params:,}  seeds {describe_seeds(record.seed_states)}"
        )
        self._progress.update(self._epochs, completed=record.epoch + 1, status=status)

    def on_adaptation(self, trainer: Any, record: Any) -> None:
        blueprint = f" ({record.blueprint})" if record.blueprint else ""
        self._note(
            f"epoch {record.epoch}: {record.seed_id}{blueprint} "
            f"{record.from_state.value} -> {record.to_state.value}: {record.reason}"
        )

    def on_germination_failed(self, trainer: Any, record: Any) -> None:
        self._note(
            f"[yellow]epoch {record.epoch}: {record.seed_id} could not graft "
            f"{record.blueprint}[/]: {record.error}"
        )

    def on_rollback(self, trainer: Any, record: Any) -> None:
        self._note(
            f"[red]rollback[/] at epoch {record.epoch} "
            f"to the end of epoch {record.restored_epoch}: {record.reason}"
        )

    def on_run_end(self, trainer: Any, record: Any) -> None:
        self._progress.stop()

    def _note(self, message: str) -> None:
        self._progress.console.print(message)
