"""The loggers ``run`` asks for -- TensorBoard, ``metrics.csv``, MLflow -- and the flat row
of an epoch that the tabular ones write.  They are callbacks like any other; each imports
its library only when it is used, so a run without them never pays for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tolaria.config import RunConfig
from tolaria.contracts import SeedState
from tolaria.events import Callback
from tolaria.summary import seed_counts

#: The epoch_end fields a row holds as they are, before its counts of seeds per state.
ROW_FIELDS = ("epoch", "attempt", "global_step", "train_loss", "val_loss", "val_accuracy", "lr",
              "params", "adaptations", "rollback")


def epoch_row(record: Any) -> dict[str, Any]:
    """One epoch_end as flat columns: its scalars, then ``seeds_<state>`` for every state of
    the lifecycle (zeros too), so the columns are the same in every row of every run."""
    row = {name: getattr(record, name) for name in ROW_FIELDS}
    counts = seed_counts(record.seed_states)
    row.update({f"seeds_{state.value}": counts.get(state.value, 0) for state in SeedState})
    return row


def make_loggers(run: RunConfig, run_path: Path) -> list[Callback]:
    """Built before the run directory exists: a logger that cannot start (MLflow not
    installed, its store unreachable) stops the run before it leaves anything behind."""
    loggers: list[Callback] = []
    if run.tensorboard:
        from tolaria.tensorboard import TensorBoardLogger  # light: it imports TB when used

        loggers.append(TensorBoardLogger(run_path / "tensorboard"))
    if run.csv:
        from tolaria.csv_logger import CSVLogger

        loggers.append(CSVLogger())
    if run.mlflow.enabled:
        from tolaria.mlflow_logger import MLflowLogger

        loggers.append(MLflowLogger(run.mlflow, experiment=run.mlflow.experiment or run.name))
    return loggers
