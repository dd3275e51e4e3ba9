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

from tolaria.config import TolariaConfig
from tolaria.errors import ConfigError


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
    def open_existing(cls, path: Path) -> tuple[RunDirectory, Path]:
        """An earlier run's folder and its config file, for `tolaria resume`."""
        path = Path(path)
        config_file = path / "config.yaml"
        if not config_file.exists():
            raise ConfigError(f"{path}: not a run directory (no config.yaml)")
        return cls(path), config_file

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

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop per-epoch records after ``last_epoch``: a resumed run re-runs those epochs."""
        kept = [m for m in self.metrics() if m["epoch"] <= last_epoch]
        tmp = self.path / ".metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(_jsonable(m)) + "\n" for m in kept))
        os.replace(tmp, self.path / "metrics.jsonl")

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
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]

    def _tb(self):
        if self._tensorboard and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

            self._writer = SummaryWriter(log_dir=str(self.path / "tensorboard"))
        return self._writer
