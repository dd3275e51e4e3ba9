"""What the robustness tests and the fault drills share: the run they break, ways to
break its files, and readers of what it leaves behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
