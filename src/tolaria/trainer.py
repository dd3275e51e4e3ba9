"""TolariaTrainer: the epoch lifecycle of design §2, read top to bottom.

Per epoch::

    check the optimizer holds exactly the trainable parameters
    training loop            (seeds monitor their chunks; metrics stay on the device)
    tamiyo.on_epoch_boundary (the epoch's telemetry becomes current)
    validation loop          (inference mode; counterfactuals for the seeds Tamiyo asks about)
    assemble SystemStatePacket
    signal = tamiyo.step(packet)
    rollback  -> restore the newest snapshot older than this epoch, the run goes on
    otherwise -> rebuild the optimizer if flagged, then snapshot (memory; disk every N)

Every step emits an event (:mod:`tolaria.events`): the run directory, TensorBoard and the
progress display are callbacks.  Components are known by protocol (:mod:`tolaria.components`).
In a multi-process run ``self.group`` (:mod:`tolaria.distributed`) is called at the
boundaries: the training forward goes through DDP, the evidence is summed over the ranks
before the packet, rank 0 decides, and the structure is compared after every epoch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tolaria import records
from tolaria.checkpoint import (
    ModelState,
    RngState,
    Snapshot,
    SnapshotRing,
    capture_snapshot,
    restore_snapshot,
)
from tolaria.components import Controller, OptimizerManager
from tolaria.config import TolariaConfig
from tolaria.contracts import AdaptationSignal, EvalMetrics, SystemStatePacket
from tolaria.data import DataBundle, load_data, make_loaders
from tolaria.emitter import Emitter
from tolaria.errors import CheckpointError, RepeatedFailureError, TolariaError
from tolaria.events import Callbacks, Event
from tolaria.fingerprint import RunFingerprint
from tolaria.hardware import HardwareMonitor, resolve_device
from tolaria.hosts import count_parameters
from tolaria.kasmina import ablated
from tolaria.optim import DynamicOptimizerManager
from tolaria.rundir import RunDirectory, attach_run_directory
from tolaria.selection import ModelSelection
from tolaria.stepping import AccumulationWindows, BatchStepper, Precision
from tolaria.summary import run_summary
from tolaria.task import Task

if TYPE_CHECKING:  # torch.distributed's wrappers: only a multi-process run imports them
    from tolaria.distributed import RankGroup

#: Batches between checks of the running loss for NaN/inf.  Each check is one host sync;
#: this keeps it far from every batch while still stopping a diverged epoch early.
NONFINITE_CHECK_INTERVAL = 32


class TolariaTrainer:
    """Owns the loops, the data, the optimizer and the cadence of the Tamiyo controller."""

    def __init__(
        self,
        model: nn.Module,
        tamiyo: Controller,
        config: TolariaConfig,
        *,
        data: DataBundle | None = None,
        run_dir: RunDirectory | Path | None = None,
        callbacks: Iterable[object] = (),
        task: Task | None = None,
        group: RankGroup | None = None,
    ) -> None:
        self.config = config
        #: This process's place in a multi-process run (``tolaria.distributed``); None: alone.
        self.group = group
        if config.run.num_threads:
            torch.set_num_threads(config.run.num_threads)
        self.device = resolve_device(config.run.device)
        self.precision = Precision(config.run.precision, self.device)
        self.model = model.to(self.device)
        self.tamiyo = tamiyo
        self.data = data if data is not None else load_data(config.data, config.run.seed)
        self.loaders = make_loaders(self.data, config.data, config.run.seed,
                                    pin_memory=self.device.type == "cuda",
                                    shard=None if group is None else group.shard)
        self.train_loader, self.val_loader = self.loaders.train, self.loaders.val
        #: What is learned and how it is scored (``tolaria.task``): the loss, metrics, monitor.
        self.task = task if task is not None else Task(config.task)
        self.loss_fn = self.task.loss.to(self.device)
        # Loaders yield CPU tensors: only another device needs a copy per batch.
        self._move_batches = self.device.type != "cpu"

        windows = AccumulationWindows(len(self.loaders.train_sampler),
                                      self.loaders.train_batch_size,
                                      config.optimizer.accumulate_batches)
        steps = windows.steps_per_epoch  # optimizer steps: what the LR schedule counts
        self.optimizer_manager: OptimizerManager = DynamicOptimizerManager(
            self.model, config.optimizer, config.scheduler,
            total_steps=config.run.epochs * steps, steps_per_epoch=steps,
        )
        self.optimizer = self.optimizer_manager.get_optimizer()
        self.stepper = BatchStepper(self.optimizer_manager, windows, config.optimizer,
                                    self.precision.grad_scaler())
        self.hardware_monitor = HardwareMonitor(self.device)
        self.snapshots = SnapshotRing(config.checkpoint.memory_snapshots)
        self.selection = ModelSelection(
            config.checkpoint, config.run.early_stopping, [m.label for m in self.task.metrics]
        )
        # Only now, with everything above built: a mistake in any of it leaves no directory.
        self.run_dir, run_callbacks, self.store = attach_run_directory(run_dir, config)
        # The best checkpoint is written after the epoch's records, before its durable one.
        self.callbacks = Callbacks([*run_callbacks, self.selection, *callbacks])
        self._emit = Emitter(self, self.callbacks, lambda: self.current_epoch)
        tamiyo.event_sink = self._emit.controller_event
        #: Snapshot components in restore order: the same run?  Weights, then the optimizer.
        self.components = {
            "fingerprint": RunFingerprint(config, self.data, self.model),
            "model": ModelState(self.model),
            "optimizer": self.optimizer_manager,
            "tamiyo": self.tamiyo,
            "rng": RngState(),
            "data_order": self.loaders.train_sampler,
            "selection": self.selection,
        }
        if self.stepper.grad_scaler is not None:  # fp16 only: other checkpoints keep their layout
            self.components["grad_scaler"] = self.stepper.grad_scaler

        self.current_epoch = 0
        self.global_step = 0  # optimizer steps (one per optimizer.accumulate_batches batches)
        self.rollbacks = 0
        self.best_val_accuracy = -math.inf
        self.params_initial = count_parameters(self.model)
        self.wall_time_before = 0.0  # seconds spent before a resume
        self._started = time.perf_counter()
        self._last_durable_epoch: int | None = None
        self._rollbacks_at: dict[int, int] = {}  # incident epoch -> rollbacks it caused
        self.last_record: dict[str, Any] | None = None
        # The state before any training: what an incident in the first epoch rolls back to.
        self.snapshots.push(self._capture(epoch=-1))

    # ------------------------------------------------------------------ the run
    def train(self) -> dict[str, Any]:
        """Run the remaining epochs; return the run summary (``run_end`` carries it).

        A ``TolariaError`` (e.g. the controller giving up after repeated failures) still
        ends the run with ``status: failed`` and the message before it propagates.
        """
        self._started = time.perf_counter()
        epochs = self.config.run.epochs
        finished = self.current_epoch - 1  # the newest epoch whose snapshot and records are whole
        self._emit(records.RunStart, epochs=epochs, params=count_parameters(self.model),
                   device=self.device.type)
        status, error, diverged = "failed", None, False
        try:
            stop = self.selection.stop_reason  # early stopping, on the monitored metric
            while self.current_epoch < epochs and not stop(self.tamiyo.seed_states):
                self.run_epoch(self.current_epoch)
                finished = self.current_epoch - 1
            if self.store is not None and self._last_durable_epoch != self.current_epoch - 1:
                self._save_durable(self._capture(epoch=self.current_epoch - 1))
            status = "completed"
        except RepeatedFailureError as exc:
            error, diverged = str(exc), exc.kind in ("divergence", "nonfinite_loss")
            # The summary describes one model: the last good one, not the one that failed.
            self._rewind(self.snapshots.rollback_target(self.current_epoch, 0))
            raise
        except TolariaError as exc:
            error = str(exc)
            raise
        except KeyboardInterrupt:
            status = "interrupted"
            self._save_interrupted(finished)
            raise
        finally:
            summary = run_summary(self, status=status, error=error, diverged=diverged)
            self._emit(records.RunEnd, status=status, error=error, summary=summary)
            if self.run_dir is not None:
                self.run_dir.close()  # after every callback: the lock goes last
        return summary

    def run_epoch(self, epoch: int) -> AdaptationSignal:
        """One pass of the design §2 lifecycle; advances ``current_epoch`` (or rolls it back)."""
        self.current_epoch = epoch
        self._emit.start(epoch)
        self._emit(records.EpochStart, batches=len(self.train_loader))
        self.optimizer_manager.check_manifest()
        self.loaders.train_sampler.set_epoch(epoch)
        training_loss = self._run_train_epoch()
        self._emit(records.TrainEnd, training_loss=training_loss)

        # Design Figure 2: the boundary rotates Tamiyo's epoch state before validation.
        if self.group is not None:  # the telemetry of every rank's batches
            self.group.sum_telemetry(self.model)
        self.tamiyo.on_epoch_boundary(epoch)
        metrics, counterfactual = self.evaluate(self.val_loader, self.tamiyo.seeds_to_evaluate())
        self._emit(records.ValidationEnd, validation=metrics, counterfactual=counterfactual)
        packet = self._assemble_system_state(training_loss, metrics, counterfactual)
        self._emit(records.PacketAssembled, packet=packet)
        signal = (self.tamiyo.step(packet) if self.group is None  # or: rank 0 decides
                  else self.group.step(self.tamiyo, packet))
        self._emit(records.SignalReceived, signal=signal)
        self._emit.adaptations(signal.adaptations)
        rollback = signal.emergency_rollback_required or not math.isfinite(training_loss)
        end = self._epoch_record(packet, signal, rollback)
        if rollback:
            self.restore_from_checkpoint(signal.reason or "non-finite training loss")
        else:
            self.current_epoch = epoch + 1
            if signal.optimizer_rebuild_required:
                self.optimizer_manager.rebuild_optimizer()
                trained = len(self.optimizer_manager.manifest())
                self._emit(records.OptimizerRebuild, epoch=epoch, parameters_trained=trained)
            self.optimizer_manager.end_epoch(metrics.loss)
            # Snapshot last: it must hold the rebuilt optimizer (a restore needs an entry for
            # every trainable parameter) and the stepped schedule (or a resume runs one behind).
            snapshot = self.create_checkpoint()
        self.callbacks.emit(self, end)
        every = self.config.checkpoint.every_epochs
        if not rollback and self.store is not None and every and (epoch + 1) % every == 0:
            self._save_durable(snapshot)  # after the epoch's records: a kill loses none of them
        if self.group is not None:  # the same structure everywhere; behind the checkpoint
            self.group.check_structure(self.model, epoch)
        return signal

    # ------------------------------------------------------------------ loops
    def _run_train_epoch(self) -> float:
        """Mean training loss of the epoch; NaN if a non-finite loss stopped it early."""
        self.model.train()
        # Under DDP (wrapped again after growth), which all-reduces the gradients.
        model = self.model if self.group is None else self.group.replica(self.model)
        # Decided once per epoch: with no listener the loop builds no per-batch record.
        batch_listeners = self.callbacks.listens(Event.BATCH_END)
        attempt = self._emit.attempts[self.current_epoch]
        loss_sum = torch.zeros((), device=self.device)
        batches = 0
        for x, y in self.train_loader:
            if self._move_batches:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
            with self._autocast():
                loss = self.loss_fn(model(x), y)
            if self.stepper(loss, batches):  # backward; True when it took an optimizer step
                self.global_step += 1
            loss_sum += loss.detach().float()
            batches += 1
            if batch_listeners:
                self.callbacks.emit(self, records.BatchEnd(
                    epoch=self.current_epoch, attempt=attempt, batch=batches - 1,
                    global_step=self.global_step, loss=loss.detach(),
                ))
            if batches % NONFINITE_CHECK_INTERVAL == 0 and not torch.isfinite(
                loss_sum if self.group is None else self.group.sum(loss_sum)  # all stop
            ):
                break
        if self.group is not None:  # the ranks' slices make the global batches
            loss_sum = self.group.sum(loss_sum) / self.group.world_size
        mean = (loss_sum / max(batches, 1)).item()  # the one read of the epoch
        return mean if math.isfinite(mean) else math.nan

    @torch.inference_mode()
    def evaluate(
        self, loader, counterfactual_ids: list[str] = ()
    ) -> tuple[EvalMetrics, dict[str, EvalMetrics]]:
        """The task's loss, score and metrics on ``loader``, plus the same with each named
        seed's alpha forced to 0.  The test split goes through here once, for the summary,
        never to Tamiyo."""
        self.model.eval()
        variants = [None, *counterfactual_ids]
        # Each pass keeps its sums on the device until the end (invariant: no per-batch sync).
        passes = [self.task.evaluation(self.device) for _ in variants]
        for x, y in loader:
            if self._move_batches:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
            for evaluation, seed_id in zip(passes, variants, strict=True):
                scope = ablated(self.model, [seed_id]) if seed_id else contextlib.nullcontext()
                with scope, self._autocast():
                    output = self.model(x)
                evaluation.update(output.float(), y)
        if self.group is not None and loader is self.val_loader:  # each rank has a part
            self.group.sum_evaluations(passes)
        metrics = [evaluation.result() for evaluation in passes]
        return metrics[0], dict(zip(counterfactual_ids, metrics[1:], strict=True))

    def _autocast(self):
        return self.precision.autocast()

    # ------------------------------------------------------------------ end-of-epoch hook
    def _assemble_system_state(
        self,
        training_loss: float,
        global_metrics: EvalMetrics,
        counterfactual: dict[str, EvalMetrics],
    ) -> SystemStatePacket:
        return SystemStatePacket(
            current_epoch=self.current_epoch,
            global_step=self.global_step,
            training_loss=training_loss,
            validation_loss=global_metrics.loss,
            validation_accuracy=global_metrics.accuracy,
            validation_metrics=dict(global_metrics.metrics),
            hardware_context=self.hardware_monitor.current(),
            health_map=dict(self.tamiyo.health_map),
            seed_states=dict(self.tamiyo.seed_states),
            counterfactual=counterfactual,
        )

    def create_checkpoint(self) -> Snapshot:
        """Snapshot the system as of the end of ``current_epoch - 1`` into the ring."""
        # The snapshot this push evicts lends its buffers: no fresh allocation per epoch.
        snapshot = self._capture(epoch=self.current_epoch - 1, reuse=self.snapshots.recyclable())
        self.snapshots.push(snapshot)
        return snapshot

    def _save_interrupted(self, finished: int) -> None:
        """A Ctrl-C keeps every finished epoch: the in-memory snapshot of ``finished`` (whose
        records are all written, unlike an epoch interrupted between its snapshot and its
        ``epoch_end``) becomes the newest durable checkpoint."""
        snapshot = self.snapshots.newest_before(finished + 1)
        if self.store is None or snapshot is None or snapshot.epoch < 0:
            return  # no run directory, or nothing trained: nothing to keep
        if snapshot.epoch != self._last_durable_epoch:
            self._save_durable(snapshot)

    def _save_durable(self, snapshot: Snapshot) -> None:
        path = self.store.save(snapshot)
        self._last_durable_epoch = snapshot.epoch
        self._emit(records.CheckpointSaved, epoch=snapshot.epoch, path=str(path))

    def restore_from_checkpoint(self, reason: str) -> None:
        """Emergency rollback of the whole system to the newest snapshot older than this
        epoch -- or, when this epoch already failed after such a rollback, one epoch further
        back per repeat: damage done in an epoch that passed the checks lives in its snapshot.
        """
        incident_epoch = self.current_epoch
        depth = self._rollbacks_at.get(incident_epoch, 0)
        self._rollbacks_at[incident_epoch] = depth + 1
        snapshot = self.snapshots.rollback_target(incident_epoch, depth)
        self._rewind(snapshot)
        # The controller removes what its incident memory implicates, so the epoch is not
        # replayed bit for bit into the same failure.
        amends = self.tamiyo.on_rollback(snapshot.epoch)
        if amends.optimizer_rebuild_required:
            self.optimizer_manager.rebuild_optimizer()
        self._emit.adaptations(amends.adaptations, epoch=incident_epoch)
        self.rollbacks += 1
        self._emit(records.Rollback, epoch=incident_epoch, restored_epoch=snapshot.epoch,
                   reason=reason)

    def _rewind(self, snapshot: Snapshot) -> None:
        """Back to ``snapshot``: the system and the counters -- but not the rollback count,
        clock and attempts: the abandoned epochs still happened (a resume restores those)."""
        restore_snapshot(snapshot, self.components)
        state = snapshot["trainer"]
        self.current_epoch = state["current_epoch"]
        self.global_step = snapshot.global_step
        self.best_val_accuracy = state["best_val_accuracy"]
        self.last_record = state["last_record"]

    def resume(self, on_skip=None) -> int:
        """Continue from the newest valid durable checkpoint; returns the epoch it resumes at,
        0 for a run stopped before its first checkpoint: it starts over."""
        def load() -> Snapshot | None:
            if self.store is None:
                raise CheckpointError("resume needs a run directory")
            if not self.store.checkpoints():
                return None
            return self.store.load_latest(
                on_skip=on_skip, restore=lambda s: restore_snapshot(s, self.components)
            )

        # Several processes: rank 0 loads, every rank restores the same snapshot.
        snapshot = load() if self.group is None else self.group.resume_point(
            load, self.components)
        if snapshot is None:
            # Its config and seed are all such a run kept, and they make the same run again;
            # what it recorded is dropped (a resume from epoch -1), to be written once more.
            self._emit(records.Resume, epoch=-1, checkpoint_epoch=-1)
            return self.current_epoch
        self.load_state_dict(snapshot["trainer"])
        self._last_durable_epoch = snapshot.epoch
        self.snapshots.push(snapshot)
        self._emit(records.Resume, epoch=snapshot.epoch, checkpoint_epoch=snapshot.epoch)
        return self.current_epoch

    # ------------------------------------------------------------------ the trainer's state
    @property
    def wall_time_s(self) -> float:
        """Seconds this run has trained, across resumes."""
        return self.wall_time_before + time.perf_counter() - self._started

    def state_dict(self) -> dict[str, Any]:
        return {
            "current_epoch": self.current_epoch,
            "global_step": self.global_step,
            "rollbacks": self.rollbacks,
            "best_val_accuracy": self.best_val_accuracy,
            "params_initial": self.params_initial,
            "wall_time_s": self.wall_time_s,
            "last_record": self.last_record,
            "attempts": self._emit.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current_epoch, self.global_step = state["current_epoch"], state["global_step"]
        self.rollbacks = state["rollbacks"]
        self.best_val_accuracy = state["best_val_accuracy"]
        self.params_initial = state["params_initial"]
        self.wall_time_before = state["wall_time_s"]
        self.last_record = state["last_record"]
        self._emit.load_state_dict(state["attempts"])
        self._started = time.perf_counter()

    def _capture(self, *, epoch: int, reuse: Snapshot | None = None) -> Snapshot:
        # Always called with ``current_epoch == epoch + 1``: the counters are the epoch's.
        components = {**self.components, "trainer": self}
        return capture_snapshot(components, epoch=epoch, global_step=self.global_step, reuse=reuse)

    # ------------------------------------------------------------------ events
    def _epoch_record(self, packet, signal, rollback: bool) -> records.EpochEnd:
        if math.isfinite(accuracy := packet.validation_accuracy):
            self.best_val_accuracy = max(self.best_val_accuracy, accuracy)
        end = self._emit.record(
            records.EpochEnd,
            global_step=packet.global_step,
            train_loss=packet.training_loss,
            val_loss=packet.validation_loss,
            val_accuracy=accuracy,
            val_metrics=dict(packet.validation_metrics),
            lr=self.optimizer.param_groups[0]["lr"],
            params=count_parameters(self.model),
            seed_states=dict(self.tamiyo.seed_states),
            adaptations=len(signal.adaptations),
            rollback=rollback,
        )
        self.last_record = end.to_dict()
        return end
