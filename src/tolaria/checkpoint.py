"""Snapshots of the whole system, the in-memory rollback ring and the durable checkpoint store.

A :class:`Snapshot` is everything a run needs to continue exactly from the end of one epoch
(ARCHITECTURE §2 invariants 3-5): the grown structure, the model tensors, the optimizer
manager's name-keyed state (with scheduler and warm-up), the Tamiyo controller's state, the
RNG states and the trainer's counters and data-order state.

Two tiers hold snapshots:

* :class:`SnapshotRing` -- the last K snapshots in memory, the fast path of an emergency
  rollback (design §2);
* :class:`CheckpointStore` -- durable checkpoints in ``<run_dir>/checkpoints/``, written
  crash-safely by :mod:`tolaria.checkpoint_io`, for ``tolaria resume``.

:func:`restore_snapshot` rebuilds structure before weights: seeds grafted after the snapshot
lose their blueprints and seeds culled after it are regrown, then the tensors load strictly,
then the optimizer is rebuilt over the restored parameters and its state loaded by name.
"""

from __future__ import annotations

import copy
import itertools
import random
import re
import shutil
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tolaria.checkpoint_io import (
    join_tensors,
    read_checkpoint_dir,
    split_tensors,
    write_checkpoint_dir,
)
from tolaria.errors import CheckpointError
from tolaria.kasmina import export_structure, replay_structure

#: Sections of a snapshot that are nested Python state (tensors allowed anywhere inside).
_TREE_SECTIONS = ("structure", "optimizer", "tamiyo", "rng", "extra")


@dataclass
class Snapshot:
    """The whole system at the end of one epoch; every tensor is a private CPU copy.

    ``epoch`` is the epoch whose end it captures (-1: before any training).  ``extra`` holds
    the trainer's counters, data-order state and best metrics (JSON-able values; tensors and
    NumPy arrays are allowed too and are stored in the tensor file).
    """

    epoch: int
    global_step: int
    structure: dict
    model: dict[str, Tensor]
    optimizer: dict
    tamiyo: dict
    rng: dict
    extra: dict


# ---------------------------------------------------------------------------------------
# Capture and restore
# ---------------------------------------------------------------------------------------


def capture_snapshot(
    model: nn.Module,
    optimizer_manager: Any,
    tamiyo: Any,
    *,
    epoch: int,
    global_step: int,
    extra: dict,
    reuse: Snapshot | None = None,
) -> Snapshot:
    """Copy the live system into a :class:`Snapshot` that later training cannot alter.

    The optimizer must already match the model (rebuilt after any graft, cull or
    fossilization): a snapshot without optimizer state for a trainable parameter could
    never be restored, so that is an ``OptimizerManifestError`` now rather than later.

    ``reuse`` is a snapshot nobody needs any more (see :meth:`SnapshotRing.recyclable`):
    its tensors are overwritten in place wherever name, shape and dtype still match, which
    spares the allocation and page faults of fresh buffers -- most of a capture's cost.
    """
    optimizer_manager.check_manifest()
    return Snapshot(
        epoch=epoch,
        global_step=global_step,
        structure=_private_copy(export_structure(model)),
        model=_private_copy(model.state_dict(), getattr(reuse, "model", None)),
        optimizer=_private_copy(optimizer_manager.state_dict(), getattr(reuse, "optimizer", None)),
        tamiyo=_private_copy(tamiyo.save_state_dict()),
        rng=capture_rng_state(),  # fresh objects on every call: nothing to copy
        extra=_private_copy(extra),
    )


def restore_snapshot(
    snapshot: Snapshot,
    model: nn.Module,
    optimizer_manager: Any,
    tamiyo: Any,
    *,
    restore_rng: bool = True,
) -> None:
    """Put the live system back to ``snapshot``; the snapshot itself is left untouched.

    Order matters: the structure must exist before its tensors can load, and the optimizer
    must be rebuilt over the restored parameter set before its state can be matched to it
    by name.  The ring may restore the same snapshot again, so nothing may keep a reference
    into it: ``load_state_dict`` of the model and of the optimizer manager copy tensors,
    the JSON sections are deep-copied here.
    """
    replay_structure(model, copy.deepcopy(snapshot.structure))
    try:
        model.load_state_dict(snapshot.model, strict=True)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        raise CheckpointError(
            f"snapshot of epoch {snapshot.epoch} does not fit the model: "
            + " ".join(line.strip() for line in lines[:3])
        ) from None
    optimizer_manager.rebuild_optimizer()
    optimizer_manager.load_state_dict(snapshot.optimizer)
    tamiyo.load_state_dict(copy.deepcopy(snapshot.tamiyo))
    if restore_rng:
        restore_rng_state(snapshot.rng)


_ATOMS = (int, float, str, bool, type(None))


def _private_copy(tree: Any, reuse: Any = None) -> Any:
    """Deep copy of nested containers; every tensor becomes a contiguous CPU copy sharing
    storage with nothing (safetensors needs both).  A tensor at the same place in ``reuse``
    with the same shape and dtype receives the copy instead of a new buffer."""
    if isinstance(tree, _ATOMS):
        return tree  # immutable: nothing to copy (and the RNG state is 625 of them)
    if isinstance(tree, Tensor):
        source = tree.detach()
        if isinstance(reuse, Tensor) and (reuse.shape, reuse.dtype) == (source.shape, source.dtype):
            return reuse.copy_(source)
        return source.to("cpu", copy=True, memory_format=torch.contiguous_format)
    if isinstance(tree, dict):
        pool = reuse if isinstance(reuse, dict) else {}
        return {k: _private_copy(v, pool.get(k)) for k, v in tree.items()}
    if isinstance(tree, tuple) and all(isinstance(v, _ATOMS) for v in tree):
        return tree  # an immutable tuple of immutables is its own copy
    if isinstance(tree, list | tuple):
        pool = reuse if isinstance(reuse, list | tuple) and len(reuse) == len(tree) else ()
        items = [_private_copy(v, r) for v, r in itertools.zip_longest(tree, pool)]
        return items if isinstance(tree, list) else tuple(items)
    return copy.deepcopy(tree)


# ---------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (global), torch CPU and, once CUDA is in use, every CUDA generator.

    A CPU run on a GPU machine never initialises CUDA: asking for its RNG states would
    create a context on every visible device, every epoch, for nothing.
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [t.cpu() for t in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`.

    CUDA states are restored for the devices present on both sides; a snapshot from a GPU
    run resumed on CPU skips them (such a run cannot replay bit-exactly anyway).
    """
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


# ---------------------------------------------------------------------------------------
# In-memory tier
# ---------------------------------------------------------------------------------------


class SnapshotRing:
    """The last ``capacity`` snapshots, oldest first: the fast emergency-rollback path."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise CheckpointError(f"snapshot ring capacity must be >= 1 (got {capacity})")
        self._snapshots: deque[Snapshot] = deque(maxlen=capacity)

    def push(self, snapshot: Snapshot) -> None:
        """Add ``snapshot`` as the newest, evicting the oldest when full.

        After a rollback the run re-enters epochs it has snapshotted before; snapshots at or
        after the new one's epoch belong to the abandoned timeline and are dropped first.
        """
        while self._snapshots and self._snapshots[-1].epoch >= snapshot.epoch:
            self._snapshots.pop()
        self._snapshots.append(snapshot)

    def recyclable(self) -> Snapshot | None:
        """Take out the snapshot the next push would evict, for ``capture_snapshot(reuse=)``.

        Only from a full ring of two or more: the newest snapshot is never handed out, so a
        rollback target survives even a capture that fails half-way.
        """
        full = len(self._snapshots) == self._snapshots.maxlen
        if full and len(self._snapshots) >= 2:
            return self._snapshots.popleft()
        return None

    def newest_before(self, epoch: int) -> Snapshot | None:
        """The newest snapshot that captures an epoch earlier than ``epoch``, if any."""
        for snapshot in reversed(self._snapshots):
            if snapshot.epoch < epoch:
                return snapshot
        return None

    def __len__(self) -> int:
        return len(self._snapshots)


# ---------------------------------------------------------------------------------------
# Durable tier
# ---------------------------------------------------------------------------------------

_NAME = re.compile(r"^ckpt-(\d{6,})-epoch-(-?\d+)$")


class CheckpointStore:
    """Durable checkpoints in one directory, newest ``keep`` retained.

    Checkpoint ``ckpt-<sequence>-epoch-<epoch>`` directories are ordered by their sequence
    number, which only grows, so a checkpoint written after a rollback to an earlier epoch
    is still the newest.  Leftovers of an interrupted write or prune (dot-prefixed
    directories) are never read and are removed by the next :meth:`save`, which assumes
    one writer per directory (one run per run directory).
    """

    def __init__(self, directory: Path, keep: int) -> None:
        if keep < 1:
            raise CheckpointError(f"checkpoints to keep must be >= 1 (got {keep})")
        self.directory = Path(directory)
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first (validity is checked on load)."""
        if not self.directory.is_dir():
            return []
        found = [
            (int(match.group(1)), path)
            for path in self.directory.iterdir()
            if (match := _NAME.match(path.name)) and path.is_dir()
        ]
        return [path for _, path in sorted(found)]

    def save(self, snapshot: Snapshot) -> Path:
        """Write ``snapshot`` atomically; only then prune the oldest beyond ``keep``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        existing = self.checkpoints()
        sequence = int(_NAME.match(existing[-1].name).group(1)) + 1 if existing else 0
        tensors, state = _to_files(snapshot)
        path = write_checkpoint_dir(
            self.directory / f"ckpt-{sequence:06d}-epoch-{snapshot.epoch}", tensors, state
        )
        for old in self.checkpoints()[: -self.keep]:
            # Rename first: a crash mid-delete then leaves a leftover, not a torn checkpoint.
            trash = old.with_name(f".trash-{old.name}")
            old.replace(trash)
            shutil.rmtree(trash)
        return path

    def load_latest(
        self, *, on_skip: Callable[[Path, str], None] | None = None
    ) -> Snapshot:
        """The newest checkpoint that verifies; ``on_skip(path, reason)`` for each bad one.

        Reading changes nothing on disk.  No valid checkpoint -> :class:`CheckpointError`.
        """
        candidates = self.checkpoints()
        for path in reversed(candidates):
            try:
                return load_snapshot(path)
            except CheckpointError as exc:
                if on_skip is not None:
                    on_skip(path, str(exc))
        if not candidates:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        raise CheckpointError(
            f"none of the {len(candidates)} checkpoints in {self.directory} is valid"
        )

    def _remove_leftovers(self) -> None:
        for path in self.directory.iterdir():
            if path.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(path, ignore_errors=True)


def load_snapshot(path: Path) -> Snapshot:
    """Read and verify one checkpoint directory (see :func:`read_checkpoint_dir`)."""
    tensors, state = read_checkpoint_dir(Path(path))
    try:
        model = {name: tensors[f"model/{name}"] for name in state["model"]}
        sections = {name: join_tensors(state[name], tensors) for name in _TREE_SECTIONS}
        return Snapshot(
            epoch=int(state["epoch"]), global_step=int(state["global_step"]), model=model,
            **sections,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: state does not describe a snapshot ({exc!r})") from None


def _to_files(snapshot: Snapshot) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {f"model/{name}": t for name, t in snapshot.model.items()}
    state: dict[str, Any] = {
        "epoch": snapshot.epoch,
        "global_step": snapshot.global_step,
        "model": list(snapshot.model),
    }
    for name in _TREE_SECTIONS:
        state[name], section_tensors = split_tensors(getattr(snapshot, name), name)
        tensors.update(section_tensors)
    return tensors, state
