"""Snapshots of the whole system, the in-memory rollback ring and the durable checkpoint store.

A :class:`Snapshot` is everything a run needs to continue exactly from the end of one epoch
(ARCHITECTURE §2 invariants 3-5): the ``state_dict`` of every named stateful component --
the model with its grown structure, the optimizer manager's name-keyed state (with
scheduler and warm-up), the Tamiyo controller, the RNG states, the data order and the
trainer's counters.  Components are an ordered mapping of name -> :class:`Stateful`
(Ignite's ``to_save``), restored in that order, so a new component joins checkpoints
without a change here.

Two tiers hold snapshots:

* :class:`SnapshotRing` -- the last K snapshots in memory, the fast path of an emergency
  rollback (design §2);
* :class:`CheckpointStore` -- durable checkpoints in ``<run_dir>/checkpoints/``, written
  crash-safely by :mod:`tolaria.checkpoint_io`, for ``tolaria resume``; beside them the
  best checkpoints :mod:`tolaria.selection` keeps, which the last-N rule never prunes.

Structure comes before weights (:class:`ModelState`): seeds grafted after the snapshot lose
their blueprints and seeds culled after it are regrown, then the tensors load strictly; the
optimizer manager, restored next, matches its state to the restored parameters by name.
"""

from __future__ import annotations

import copy
import itertools
import random
import re
import shutil
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from tolaria.checkpoint_io import (
    join_tensors,
    read_checkpoint_dir,
    split_tensors,
    write_checkpoint_dir,
)
from tolaria.errors import CheckpointError, RunMismatch, TolariaError
from tolaria.kasmina import export_structure, replay_structure

#: The layout of a snapshot inside a checkpoint's ``state.json``.  1 (Tolaria 0.1.0) had a
#: fixed list of sections; 2 holds a mapping of named components.
SNAPSHOT_LAYOUT = 2


class Stateful(Protocol):
    """What a component of a snapshot must offer.

    ``state_dict`` may return live tensors (the snapshot copies them); ``load_state_dict``
    must copy what it keeps, because the ring may restore the same snapshot twice.  A
    component whose ``state_dict`` builds new objects on every call (the RNG states) may
    say so with a class attribute ``state_is_private = True``: the copy is then skipped.
    """

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Snapshot:
    """The whole system at the end of one epoch; every tensor is a private CPU copy.

    ``epoch`` is the epoch whose end it captures (-1: before any training);
    ``components`` maps each component's name to its captured state.
    """

    epoch: int
    global_step: int
    components: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.components[name]


class ModelState:
    """The model as a component: its grown structure first, then its tensors."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return {"structure": export_structure(self.model), "weights": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        replay_structure(self.model, copy.deepcopy(state["structure"]))
        try:
            self.model.load_state_dict(state["weights"], strict=True)
        except RuntimeError as exc:
            lines = str(exc).strip().splitlines()
            raise CheckpointError(
                "snapshot does not fit the model: " + " ".join(line.strip() for line in lines[:3])
            ) from None


class RngState:
    """Python, NumPy and torch generators as a component."""

    state_is_private = True  # every getter returns a fresh copy

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng_state(state)


# ---------------------------------------------------------------------------------------
# Capture and restore
# ---------------------------------------------------------------------------------------


def capture_snapshot(
    components: Mapping[str, Stateful],
    *,
    epoch: int,
    global_step: int,
    reuse: Snapshot | None = None,
) -> Snapshot:
    """Copy the live system into a :class:`Snapshot` that later training cannot alter.

    ``reuse`` is a snapshot nobody needs any more (see :meth:`SnapshotRing.recyclable`):
    its tensors are overwritten in place wherever name, shape and dtype still match, which
    spares the allocation and page faults of fresh buffers -- most of a capture's cost.
    """
    pool = reuse.components if reuse is not None else {}
    return Snapshot(
        epoch=epoch,
        global_step=global_step,
        components={
            name: component.state_dict()
            if getattr(component, "state_is_private", False)
            else _private_copy(component.state_dict(), pool.get(name))
            for name, component in components.items()
        },
    )


def restore_snapshot(snapshot: Snapshot, components: Mapping[str, Stateful]) -> None:
    """Put each of ``components`` back to ``snapshot``, in order; the snapshot is untouched.

    Every container is rebuilt before it is handed over, so a component that keeps a
    list or dict from its state cannot alias the snapshot; tensors are passed as they are
    (loaders copy them: see :class:`Stateful`).
    """
    missing = [name for name in components if name not in snapshot.components]
    if missing:
        raise CheckpointError(
            f"snapshot of epoch {snapshot.epoch} has no state for {', '.join(missing)}"
        )
    for name, component in components.items():
        component.load_state_dict(_fresh_containers(snapshot.components[name]))


def _fresh_containers(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _fresh_containers(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_fresh_containers(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_fresh_containers(v) for v in tree)
    return tree


_ATOMS = (int, float, str, bool, type(None))
_ATOM_TYPES = frozenset(_ATOMS)


def _private_copy(tree: Any, reuse: Any = None) -> Any:
    """Deep copy of nested containers; every tensor becomes a contiguous CPU copy sharing
    storage with nothing (safetensors needs both).  A tensor at the same place in ``reuse``
    with the same shape and dtype receives the copy instead of a new buffer."""
    if isinstance(tree, _ATOMS):
        return tree  # immutable: nothing to copy (and the RNG state is 625 of them)
    if isinstance(tree, np.ndarray):
        return tree.copy()  # the NumPy RNG key: deepcopy's generic path costs 10x more
    if isinstance(tree, Tensor):
        source = tree.detach()
        if isinstance(reuse, Tensor) and (reuse.shape, reuse.dtype) == (source.shape, source.dtype):
            return reuse.copy_(source)
        return source.to("cpu", copy=True, memory_format=torch.contiguous_format)
    if isinstance(tree, dict):
        pool = reuse if isinstance(reuse, dict) else {}
        return {k: _private_copy(v, pool.get(k)) for k, v in tree.items()}
    if isinstance(tree, tuple) and set(map(type, tree)) <= _ATOM_TYPES:
        # An immutable tuple of immutables is its own copy; ``map(type)`` keeps the check
        # cheap for the 625 integers of Python's RNG state.
        return tree
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

    def rollback_target(self, incident_epoch: int, back: int) -> Snapshot:
        """The snapshot ``back`` epochs before the newest one older than ``incident_epoch``,
        or the oldest held if the ring does not reach that far."""
        for distance in range(back, -1, -1):
            snapshot = self.newest_before(incident_epoch - distance)
            if snapshot is not None:
                return snapshot
        raise CheckpointError(f"rollback at epoch {incident_epoch}: no snapshot to restore")

    def __len__(self) -> int:
        return len(self._snapshots)

    def __iter__(self) -> Iterator[Snapshot]:
        """Oldest first: every state a rollback can return to."""
        return iter(self._snapshots)


# ---------------------------------------------------------------------------------------
# Durable tier
# ---------------------------------------------------------------------------------------

_NAME = re.compile(r"^ckpt-(\d{6,})-epoch-(-?\d+)$")
#: A best checkpoint: the model as validated in one attempt of one epoch.
_BEST_NAME = re.compile(r"^best-epoch-(\d+)-attempt-(\d+)$")


def best_checkpoint_name(epoch: int, attempt: int) -> str:
    """The directory of the best checkpoint of ``attempt`` of ``epoch``: the attempt keeps
    the model of a re-run epoch (after a rollback) apart from the one it replaced."""
    return f"best-epoch-{epoch}-attempt-{attempt}"


def checkpoint_epoch(path: Path) -> int:
    """The epoch a checkpoint directory's name says it holds (its contents are checked on
    load, not here)."""
    return int(_NAME.match(Path(path).name).group(2))


class CheckpointStore:
    """Durable checkpoints in one directory, newest ``keep`` retained.

    Checkpoint ``ckpt-<sequence>-epoch-<epoch>`` directories are ordered by their sequence
    number, which only grows, so a checkpoint written after a rollback to an earlier epoch
    is still the newest.  Best checkpoints (``best-epoch-<epoch>-attempt-<attempt>``) live
    beside them: the store writes and removes them when told (:meth:`save_best`,
    :meth:`discard`), and never counts them among the ``keep``.  Leftovers of an interrupted
    write or prune (dot-prefixed directories) are never read; the run that owns the
    directory removes them when it opens it (:meth:`remove_leftovers`) and before every
    save.
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
        self.remove_leftovers()
        existing = self.checkpoints()
        sequence = int(_NAME.match(existing[-1].name).group(1)) + 1 if existing else 0
        tensors, state = _to_files(snapshot)
        path = write_checkpoint_dir(
            self.directory / f"ckpt-{sequence:06d}-epoch-{snapshot.epoch}", tensors, state
        )
        for old in self.checkpoints()[: -self.keep]:
            self.discard(old)
        return path

    def save_best(self, snapshot: Snapshot, name: str) -> Path:
        """Write ``snapshot`` atomically as the best checkpoint ``name`` (replacing one of
        that name: only a resumed run writes a name twice, and then it is the same model)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.remove_leftovers()
        final = self.directory / name
        if final.exists():
            self.discard(final)
        tensors, state = _to_files(snapshot)
        return write_checkpoint_dir(final, tensors, state)

    def best_checkpoints(self) -> list[Path]:
        """Best checkpoint directories, oldest epoch (then attempt) first."""
        if not self.directory.is_dir():
            return []
        found = [
            ((int(match.group(1)), int(match.group(2))), path)
            for path in self.directory.iterdir()
            if (match := _BEST_NAME.match(path.name)) and path.is_dir()
        ]
        return [path for _, path in sorted(found)]

    def best(self) -> Path | None:
        """The newest best checkpoint: the best model of the newest epochs the run kept."""
        found = self.best_checkpoints()
        return found[-1] if found else None

    def discard(self, path: Path) -> None:
        """Delete one checkpoint directory of this store."""
        # Rename first: a crash mid-delete then leaves a leftover, not a torn checkpoint.
        trash = path.with_name(f".trash-{path.name}")
        path.replace(trash)
        shutil.rmtree(trash)

    def load_latest(
        self,
        *,
        on_skip: Callable[[Path, str], None] | None = None,
        restore: Callable[[Snapshot], None] | None = None,
    ) -> Snapshot:
        """The newest checkpoint that verifies -- and, given ``restore``, that restores
        into the live system; ``on_skip(path, reason)`` for each one passed over.

        A checkpoint can pass its checksums and still not fit (a tensor of another shape,
        malformed controller state): it is passed over like a corrupt file.  A checkpoint
        of another run (:class:`RunMismatch`) stops the search: every older one is too.
        Reading changes nothing on disk.  No usable checkpoint -> :class:`CheckpointError`.
        """
        candidates = self.checkpoints()
        for path in reversed(candidates):
            try:
                snapshot = load_snapshot(path)
                if restore is not None:
                    restore(snapshot)
                return snapshot
            except RunMismatch:
                raise
            except CheckpointError as exc:
                reason = str(exc)
            except (TolariaError, KeyError, TypeError, ValueError, AttributeError,
                    IndexError, RuntimeError) as exc:
                reason = f"{path}: state does not restore ({type(exc).__name__}: {exc})"
            if on_skip is not None:
                on_skip(path, reason)
        if not candidates:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        raise CheckpointError(
            f"none of the {len(candidates)} checkpoints in {self.directory} is valid"
        )

    def remove_leftovers(self) -> None:
        """Delete what an interrupted write or prune left behind.  Only the directory's one
        writer may call it: another process's write in progress looks the same."""
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if path.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(path, ignore_errors=True)


def load_snapshot(path: Path) -> Snapshot:
    """Read and verify one checkpoint directory (see :func:`read_checkpoint_dir`)."""
    tensors, state = read_checkpoint_dir(Path(path))
    layout = state.get("layout", 1)
    if layout != SNAPSHOT_LAYOUT:
        raise CheckpointError(
            f"{path}: snapshot layout {layout!r} was written by another Tolaria release; "
            f"this one reads layout {SNAPSHOT_LAYOUT} (start a new run)"
        )
    try:
        components = {
            name: join_tensors(document, tensors) for name, document in state["components"].items()
        }
        return Snapshot(
            epoch=int(state["epoch"]), global_step=int(state["global_step"]), components=components
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: state does not describe a snapshot ({exc!r})") from None


def _to_files(snapshot: Snapshot) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    documents = {}
    for name, component in snapshot.components.items():
        documents[name], component_tensors = split_tensors(component, name)
        tensors.update(component_tensors)
    state = {
        "layout": SNAPSHOT_LAYOUT,
        "epoch": snapshot.epoch,
        "global_step": snapshot.global_step,
        "components": documents,
    }
    return tensors, state
