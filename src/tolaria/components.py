"""What the trainer needs from its components, as Protocols.

The trainer is written against these, not against the classes that implement them
(``TamiyoController``, ``DynamicOptimizerManager``, ``CheckpointStore``), so a learned
controller, a distributed optimizer manager or another store plugs in unchanged.  Every
component the trainer snapshots is :class:`~tolaria.checkpoint.Stateful`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch

from tolaria.checkpoint import Snapshot, Stateful
from tolaria.contracts import AdaptationSignal, SeedState, SeedTelemetry, SystemStatePacket


class Controller(Stateful, Protocol):
    """The morphogenetic controller the trainer calls at every epoch end (Tamiyo)."""

    #: ``sink(kind, **fields)``: the trainer sets it to turn decisions into event records.
    event_sink: Callable[..., None]

    @property
    def health_map(self) -> Mapping[str, SeedTelemetry]: ...
    @property
    def seed_states(self) -> Mapping[str, SeedState]: ...
    def on_epoch_boundary(self, epoch: int) -> None: ...
    def seeds_to_evaluate(self) -> list[str]: ...
    def step(self, packet: SystemStatePacket) -> AdaptationSignal: ...
    def on_rollback(self, restored_epoch: int) -> AdaptationSignal: ...


class OptimizerManager(Stateful, Protocol):
    """Owns the optimizer across growth (design §3.2)."""

    def get_optimizer(self) -> torch.optim.Optimizer: ...
    def manifest(self) -> dict[str, str]: ...
    def rebuild_optimizer(self) -> torch.optim.Optimizer: ...
    def check_manifest(self) -> None: ...
    def after_optimizer_step(self) -> None: ...
    def end_epoch(self, validation_loss: float) -> None: ...


class SnapshotStore(Protocol):
    """Durable snapshots (``tolaria.checkpoint.CheckpointStore``), and the best checkpoints
    beside them (kept by ``tolaria.selection``)."""

    directory: Path

    def save(self, snapshot: Snapshot) -> Path: ...
    def load_latest(self, *, on_skip: Callable[[Path, str], None] | None = None) -> Snapshot: ...
    def checkpoints(self) -> list[Path]: ...
    def save_best(self, snapshot: Snapshot, name: str) -> Path: ...
    def best_checkpoints(self) -> list[Path]: ...
    def discard(self, path: Path) -> None: ...


__all__ = ["Controller", "OptimizerManager", "SnapshotStore", "Stateful"]
