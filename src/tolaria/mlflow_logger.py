"""MLflow as a logger (``run.mlflow``): the run's params, every epoch's metrics, its summary.

One Tolaria run is one MLflow run, named after its run directory.  Its params are the
resolved config, flattened (``optimizer.lr``); each epoch_end logs the row of
:func:`tolaria.loggers.epoch_row` at step = epoch (a rollback's re-run logs the same step
again, with ``attempt`` 2); the run's end logs the summary -- numbers as ``summary.<key>``
metrics, the rest as tags -- and sets the ``status`` tag and MLflow's run status.  The run's
id is kept in ``<run_dir>/mlflow.json``, so ``tolaria resume`` continues the same MLflow run.

``mlflow`` (the ``mlflow-skinny`` client is enough) is imported only when the logger is
built.  A store that cannot be reached then is a ``ConfigError``, before the run directory
exists; once training, a failing store costs one warning line and MLflow logging stops, not
the run: everything is in the run directory too.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tolaria.config import MLflowConfig
from tolaria.errors import ConfigError, TolariaError
from tolaria.events import Callback
from tolaria.loggers import epoch_row
from tolaria.summary import plain_value

STATE_FILE = "mlflow.json"
#: A Tolaria run's end status -> MLflow's.
RUN_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
#: MLflow takes at most this many params in one call.
PARAMS_PER_CALL = 100


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optimizer": {"lr": 0.02}}`` -> ``{"optimizer.lr": "0.02"}``: every value a string,
    those that are not one as JSON (lists, ``null``, an empty mapping)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def _one_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split()).rstrip(".")


class MLflowLogger(Callback):
    def __init__(self, config: MLflowConfig, *, experiment: str) -> None:
        uri = config.tracking_uri
        if uri is not None and urlparse(uri).scheme in ("", "file"):
            # Absolute: a resume from another folder still finds the run's store.  And asked
            # for by name, so opted in to: MLflow 3 keeps its file store behind a switch.
            uri = Path(urlparse(uri).path).expanduser().resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError(
                "run.mlflow.enabled: the MLflow client is not installed "
                "(pip install 'tolaria[mlflow]')"
            ) from None
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                self.experiment_id = self.client.create_experiment(experiment)
            else:
                self.experiment_id = found.experiment_id
        except Exception as exc:  # MLflow's own errors, or the network's
            raise ConfigError(
                f"run.mlflow.tracking_uri={uri!r}: cannot use the MLflow store ({_one_line(exc)})"
            ) from exc
        if found is not None and found.lifecycle_stage == "deleted":
            raise ConfigError(
                f"run.mlflow.experiment={experiment!r}: deleted in {self.client.tracking_uri}; "
                "restore it or name another"
            )
        self.run_id: str | None = None
        self._failed = False

    # -- the lifecycle -----------------------------------------------------------------
    def on_run_start(self, trainer: Any, record: Any) -> None:
        self._call(self._start, trainer)

    def on_epoch_end(self, trainer: Any, record: Any) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key, float(value), stamp, record.epoch)
                   for key, value in epoch_row(record).items() if key != "epoch"]
        self._call(self.client.log_batch, self.run_id, metrics=metrics)

    def on_run_end(self, trainer: Any, record: Any) -> None:
        self._call(self._end, record)

    # -- the calls ---------------------------------------------------------------------
    def _start(self, trainer: Any) -> None:
        from mlflow.entities import Param, RunTag

        run_dir = trainer.run_dir
        known = self._known_run(run_dir.path / STATE_FILE)
        if known is not None:
            self.run_id = known
            self.client.update_run(self.run_id, status="RUNNING")
            logged = self.client.get_run(self.run_id).data.params
        else:
            run = self.client.create_run(self.experiment_id, run_name=run_dir.path.name,
                                         tags={"tolaria.run_dir": str(run_dir.path.resolve())})
            self.run_id, logged = run.info.run_id, {}
            run_dir.write_text(STATE_FILE, json.dumps({
                "tracking_uri": self.client.tracking_uri,
                "experiment_id": self.experiment_id,
                "run_id": self.run_id,
            }, indent=2) + "\n")
        params = flatten(trainer.config.model_dump(mode="json"))
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        # MLflow's params are write-once: what a resume changed (run.epochs, say) is a tag.
        changed = [RunTag(f"resumed/{k}", v) for k, v in params.items()
                   if k in logged and logged[k] != v]
        for start in range(0, len(new), PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=new[start:start + PARAMS_PER_CALL])
        self.client.log_batch(self.run_id, tags=[*changed, RunTag("status", "running")])

    def _known_run(self, state_file: Path) -> str | None:
        """The MLflow run an earlier process of this run logged to, in this same store."""
        if not state_file.exists():
            return None
        try:
            state = json.loads(state_file.read_text())
        except ValueError:
            state = None
        if not isinstance(state, dict) or state.get("tracking_uri") != self.client.tracking_uri:
            return None  # damaged, or another store's: this run goes on in a new MLflow run
        return state.get("run_id")

    def _end(self, record: Any) -> None:
        from mlflow.entities import Metric, RunTag

        stamp = int(time.time() * 1000)
        metrics, tags = [], [RunTag("status", record.status)]
        for key, value in record.summary.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics.append(Metric(f"summary.{key}", float(value), stamp, record.epoch))
            elif value is not None:
                tags.append(RunTag(f"summary.{key}", plain_value(value)))
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(self.run_id, RUN_STATUS.get(record.status, "FAILED"))

    def _call(self, method: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """A store that fails mid-run stops MLflow logging with one line, not the run."""
        if self._failed:
            return
        try:
            method(*args, **kwargs)
        except TolariaError:
            raise  # the run directory's own write failed: that stops the run, as anywhere
        except Exception as exc:
            self._failed = True
            print(f"tolaria: warning: MLflow logging stopped: {_one_line(exc)}; the run goes "
                  "on, and its run directory has every record", file=sys.stderr, flush=True)

