"""The run directory: everything a run leaves behind for the researcher.

```
<run_dir>/
  config.yaml      the resolved configuration (what `tolaria resume` rebuilds from)
  metrics.jsonl    one JSON object per epoch
  events.jsonl     every adaptation, decision, incident and rollback, with its reason
  tensorboard/     scalars for `tensorboard --logdir <run_dir>`
  checkpoints/     durable checkpoints (see tolaria.checkpoint)
  summary.json     written when the run ends
```
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from tolaria.config import TolariaConfig, load_config
from tolaria.errors import CheckpointError, ConfigError


def _jsonable(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so every line stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value") and isinstance(getattr(value, "value", None), str):
        return value.value  # enums such as SeedState
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class RunDirectory:
    """Owns the files of one run.  ``create`` refuses a folder that already holds a run."""

    def __init__(self, path: Path, *, tensorboard: bool = True) -> None:
        self.path = Path(path)
        self.checkpoint_dir = self.path / "checkpoints"
        self._tensorboard = tensorboard
        self._writer = None
        self._purge_step: int | None = None  # set by rewind() when a run resumes

    @classmethod
    def create(cls, path: Path, config: TolariaConfig) -> RunDirectory:
        path = Path(path)
        cls.check_free(path)
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path, tensorboard=config.run.tensorboard)
        (path / "config.yaml").write_text(config.to_yaml())
        return run

    @staticmethod
    def check_free(path: Path) -> None:
        if (Path(path) / "config.yaml").exists():
            raise ConfigError(
                f"{path} already holds a run; continue it with `tolaria resume {path}` "
                "or choose another --run-dir"
            )

    @classmethod
    def open_existing(cls, path: Path) -> tuple[RunDirectory, TolariaConfig]:
        """An earlier run's folder and the configuration it ran with, for `tolaria resume`."""
        path = Path(path)
        config_file = path / "config.yaml"
        if not config_file.exists():
            raise ConfigError(f"{path}: not a run directory (no config.yaml)")
        config = load_config(config_file)
        return cls(path, tensorboard=config.run.tensorboard), config

    @staticmethod
    def default_path(config: TolariaConfig) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return Path(config.run.runs_root) / f"{config.run.name}-{stamp}"

    # -- streams -------------------------------------------------------------------------
    def log_metrics(self, record: dict[str, Any]) -> None:
        self._append("metrics.jsonl", record)
        writer = self._tb()
        if writer is not None:
            step = record["epoch"]
            for key, value in record.items():
                if key != "epoch" and isinstance(value, int | float):
                    writer.add_scalar(key.replace("_", "/", 1), value, step)
            writer.flush()

    def log_event(self, kind: str, **fields: Any) -> None:
        self._append("events.jsonl", {"event": kind, "time": time.time(), **fields})

    def metrics(self) -> list[dict[str, Any]]:
        return self._read("metrics.jsonl")

    def events(self) -> list[dict[str, Any]]:
        return self._read("events.jsonl")

    def rewind(self, last_epoch: int) -> None:
        """Forget the records of epochs after ``last_epoch``: a resumed run runs them again.

        Metrics and events of later epochs are dropped (so no decision or outcome is logged
        twice) and TensorBoard purges its scalars from ``last_epoch + 1`` on.
        """
        for name in ("metrics.jsonl", "events.jsonl"):
            kept = [r for r in self._read(name) if r.get("epoch", last_epoch) <= last_epoch]
            tmp = self.path / f".{name}.tmp"
            tmp.write_text("".join(json.dumps(_jsonable(r), sort_keys=True) + "\n" for r in kept))
            os.replace(tmp, self.path / name)
        self._purge_step = last_epoch + 1

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path / "summary.json", summary)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- helpers -------------------------------------------------------------------------
    def _append(self, name: str, record: dict[str, Any]) -> None:
        # One line per write, flushed at once, so a killed run keeps every complete record.
        with open(self.path / name, "a") as stream:
            stream.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")

    def _read(self, name: str) -> list[dict[str, Any]]:
        file = self.path / name
        if not file.exists():
            return []
        lines = [line for line in file.read_text().splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise CheckpointError(f"{file}: line {number} is not JSON") from None
                # A last line cut short by a crash mid-write: the record never completed.
        return records

    def _tb(self):
        if self._tensorboard and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

            self._writer = SummaryWriter(
                log_dir=str(self.path / "tensorboard"), purge_step=self._purge_step
            )
        return self._writer
