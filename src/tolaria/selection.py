"""Judging epochs by one monitored metric: the best checkpoint, and early stopping.

:class:`ModelSelection` is a snapshot component and a callback of the trainer.

As a component its state is the best value so far (with the epoch and attempt it came
from) and early stopping's count, so a rollback or a resume restores them with everything
else: the best is the best of the epochs the run kept.

As a callback it keeps the best checkpoint.  When an epoch's validation (its packet)
improves on the best, the model is captured right then, as validated -- before the
controller's decisions of that epoch change it (a blend step, a cull) -- and written to
``checkpoints/best-epoch-<E>-attempt-<A>/`` at the epoch's end, once the epoch is kept
(a rolled-back epoch's capture is dropped), and before the epoch's durable checkpoint: a
durable checkpoint never names a best that was not written.  A best checkpoint holds the
model, the fingerprint (what :func:`tolaria.inference.load_model` rebuilds the host from)
and this component's state (its metric value); the optimizer is not in it.

A best checkpoint stays while a state the run can return to names it: the live state,
every snapshot of the rollback ring, the newest durable checkpoint; once the run ends, the
live state and the newest durable checkpoint.  So after a rollback, a resume (even from an
older checkpoint than the newest) or a kill, the best a restored run names is on disk, or
is written again when the run gets back to its epoch.  Without a run directory there is no
store: the best is tracked, not kept, and the summary tests the last model.

Early stopping counts the kept epochs since the monitor last improved on its best by more
than ``min_delta``; at ``patience`` the run stops -- unless a seed is on trial and
``during_trials`` is off: growth that may still pay off is seen through first.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from tolaria import records
from tolaria.checkpoint import Snapshot, best_checkpoint_name, capture_snapshot, load_snapshot
from tolaria.checkpoint_io import STATE_FILE
from tolaria.config import CheckpointConfig, EarlyStoppingConfig
from tolaria.contracts import SeedState, SystemStatePacket
from tolaria.errors import CheckpointError, ConfigError
from tolaria.events import Callback
from tolaria.inference import restore_model

#: Monitor names (as in metrics.jsonl) -> the packet field that holds each.
PACKET_FIELDS = {
    "val_accuracy": "validation_accuracy",
    "val_loss": "validation_loss",
    "train_loss": "training_loss",
}
#: What a best checkpoint holds: enough to rebuild, load and describe the model.
BEST_COMPONENTS = ("fingerprint", "model", "selection")


def monitored_value(packet: SystemStatePacket, monitor: str) -> float:
    """The value of ``monitor`` in an epoch's packet: the one place names meet fields.
    ``val_<label>`` names one of the task's metrics (``val_r2``, ``val_mae``)."""
    if monitor in PACKET_FIELDS:
        return float(getattr(packet, PACKET_FIELDS[monitor]))
    return float(packet.validation_metrics[monitor.removeprefix("val_")])


def resolve_mode(monitor: str, mode: str) -> str:
    """``max`` or ``min``; ``auto`` makes a loss smaller-is-better, anything else larger."""
    if mode != "auto":
        return mode
    return "min" if monitor.endswith("loss") else "max"


class ModelSelection(Callback):
    """The best epoch by ``checkpoint.monitor``, its checkpoint, and early stopping."""

    state_is_private = True  # state_dict builds new containers of plain values every call

    def __init__(
        self,
        checkpoint: CheckpointConfig,
        early_stopping: EarlyStoppingConfig | None,
        metrics: Sequence[str] = (),
    ) -> None:
        self.monitor = checkpoint.monitor
        known = [*PACKET_FIELDS, *(f"val_{label}" for label in metrics)]
        if self.monitor is not None and self.monitor not in known:
            raise ConfigError(
                f"checkpoint.monitor={self.monitor!r}: unknown metric "
                f"(known: {', '.join(dict.fromkeys(known))}; or null)"
            )
        if early_stopping is not None and self.monitor is None:
            raise ConfigError("run.early_stopping needs a checkpoint.monitor to watch")
        self.mode = resolve_mode(self.monitor or "", checkpoint.mode)
        self.test_of = checkpoint.test_of
        self.early_stopping = early_stopping
        #: ``{"epoch", "attempt", "value"}`` of the best kept epoch so far.
        self.best: dict[str, Any] | None = None
        #: Early stopping's yardstick: the value of the last improvement by > min_delta.
        self.reference: float | None = None
        #: Kept epochs since then.
        self.stale = 0
        self._pending: Snapshot | None = None  # the best model as validated, not yet written

    # -- the component -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"best": copy.copy(self.best), "reference": self.reference, "stale": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.reference = copy.copy(state["best"]), state["reference"]
        self.stale = state["stale"]
        self._pending = None

    # -- judging epochs ------------------------------------------------------------------
    def on_packet_assembled(self, trainer: Any, record: records.PacketAssembled) -> None:
        if self.monitor is None:
            return
        value = monitored_value(record.packet, self.monitor)
        margin = self.early_stopping.min_delta if self.early_stopping else 0.0
        if self._better(value, self.reference, margin):
            self.reference, self.stale = value, 0
        else:
            self.stale += 1
        if self._better(value, None if self.best is None else self.best["value"]):
            self.best = {"epoch": record.epoch, "attempt": record.attempt, "value": value}
            if trainer.store is not None:
                self._pending = capture_snapshot(
                    {name: trainer.components[name] for name in BEST_COMPONENTS},
                    epoch=record.epoch, global_step=trainer.global_step,
                )

    def _better(self, value: float, than: float | None, margin: float = 0.0) -> bool:
        if not math.isfinite(value):
            return False
        if than is None:
            return True
        return value > than + margin if self.mode == "max" else value < than - margin

    def stop_reason(self, seed_states: Mapping[str, SeedState]) -> str | None:
        """Why the run should stop now, or None to go on."""
        rule = self.early_stopping
        if rule is None or self.stale < rule.patience:
            return None
        if not rule.during_trials and any(state.is_active for state in seed_states.values()):
            return None
        since = "" if self.reference is None else f" on {self.reference:.6g}"
        margin = f" by more than {rule.min_delta:g}" if rule.min_delta else ""
        return (f"early stopping: {self.monitor} has not improved{since}{margin} "
                f"for {self.stale} epochs")

    # -- keeping the best checkpoint ---------------------------------------------------
    def on_epoch_end(self, trainer: Any, record: records.EpochEnd) -> None:
        pending, self._pending = self._pending, None
        if record.rollback:
            return  # the epoch was undone, and the restore put the selection back
        if pending is not None:
            trainer.store.save_best(pending, _name(self.best))
        self._prune(trainer, ring=True)

    def on_rollback(self, trainer: Any, record: records.Rollback) -> None:
        self._prune(trainer, ring=True)

    def on_resume(self, trainer: Any, record: records.Resume) -> None:
        self._prune(trainer, ring=True)  # what a killed process wrote after its checkpoint

    def on_run_end(self, trainer: Any, record: records.RunEnd) -> None:
        self._prune(trainer, ring=False)

    def _prune(self, trainer: Any, *, ring: bool) -> None:
        """Remove the best checkpoints no state the run can return to names."""
        store = trainer.store
        if store is None:
            return
        named = {_name(self.best)}
        if ring:  # snapshots after the current epoch are of an abandoned timeline
            named |= {_name(s["selection"]["best"]) for s in trainer.snapshots
                      if s.epoch < trainer.current_epoch}
        unnamed = [path for path in store.best_checkpoints() if path.name not in named]
        if not unnamed:
            return
        durable = _named_by_newest_checkpoint(store)
        if durable is None:
            return  # unreadable: it may name any of them, so keep them all
        for path in unnamed:
            if path.name != durable:
                store.discard(path)

    # -- what the summary says -----------------------------------------------------------
    def tested_model(self, trainer: Any) -> tuple[nn.Module, str]:
        """The model the summary's test metrics describe, and how the summary names it."""
        epoch = trainer.current_epoch - 1
        last = f"last (epoch {epoch})" if epoch >= 0 else "last (untrained)"
        if self.test_of == "last" or self.best is None or trainer.store is None:
            return trainer.model, last
        path = trainer.store.directory / _name(self.best)
        try:
            snapshot = load_snapshot(path)
        except CheckpointError as exc:  # never written (the run stopped first), or damaged
            return trainer.model, f"{last}; the best checkpoint cannot be read: {exc}"
        model = restore_model(copy.deepcopy(trainer.model), snapshot["model"], "keep")
        return model, f"best (epoch {self.best['epoch']})"

    def describe(self, trainer: Any) -> dict[str, Any] | None:
        """The summary's ``best``: the monitor, the best epoch and value, its checkpoint."""
        if self.monitor is None:
            return None
        described: dict[str, Any] = {"monitor": self.monitor, "mode": self.mode}
        if self.best is None:
            return {**described, "epoch": None, "attempt": None, "value": None,
                    "checkpoint": None}
        path = None if trainer.store is None else trainer.store.directory / _name(self.best)
        kept = path is not None and path.is_dir()
        return {**described, **self.best,
                "checkpoint": f"{path.parent.name}/{path.name}" if kept else None}


def _name(best: dict[str, Any] | None) -> str | None:
    return None if best is None else best_checkpoint_name(best["epoch"], best["attempt"])


def _named_by_newest_checkpoint(store: Any) -> str | None:
    """The best checkpoint the newest durable checkpoint names ("" for none); None when its
    state cannot be read.  Read as plain JSON: only this one name is wanted from it."""
    newest = store.checkpoints()[-1:]
    if not newest:
        return ""
    try:
        state = json.loads((newest[0] / STATE_FILE).read_text())
        return _name(state["components"]["selection"]["best"]) or ""
    except (OSError, ValueError, KeyError, TypeError):
        return None
