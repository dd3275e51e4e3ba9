"""TolariaTrainer: the epoch lifecycle of design §2, read top to bottom.

Per epoch::

    check the optimizer holds exactly the trainable parameters
    training loop            (seeds monitor their chunks; metrics stay on the device)
    tamiyo.on_epoch_boundary (the epoch's telemetry becomes current)
    validation loop          (inference mode; counterfactuals for the seeds Tamiyo asks about)
    assemble SystemStatePacket
    signal = tamiyo.step(packet)
    rollback  -> restore the newest snapshot older than this epoch, the run goes on
    otherwise -> snapshot (memory every epoch, disk every N), then rebuild the optimizer if flagged

The trainer knows the components only through their interfaces (contracts, the Tamiyo
methods above, DynamicOptimizerManager, tolaria.checkpoint); it never looks inside a seed.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tolaria.checkpoint import (
    CheckpointStore,
    SnapshotRing,
    capture_snapshot,
    restore_snapshot,
)
from tolaria.config import TolariaConfig
from tolaria.contracts import AdaptationSignal, EvalMetrics, SystemStatePacket
from tolaria.data import DataBundle, load_data, make_loaders
from tolaria.errors import CheckpointError, TolariaError
from tolaria.hardware import HardwareMonitor, resolve_device
from tolaria.hosts import count_parameters
from tolaria.kasmina import ablated
from tolaria.optim import DynamicOptimizerManager
from tolaria.progress import NullProgress, ProgressReporter
from tolaria.rundir import RunDirectory

#: Batches between checks of the running loss for NaN/inf.  Each check is one host sync;
#: this keeps it far from every batch while still stopping a diverged epoch early.
NONFINITE_CHECK_INTERVAL = 32

#: Reusable "no autocast" context: one object instead of one per batch.
_NO_AUTOCAST = contextlib.nullcontext()


class TolariaTrainer:
    """Owns the loops, the data, the optimizer and the cadence of the Tamiyo controller."""

    def __init__(
        self,
        model: nn.Module,
        tamiyo: Any,
        config: TolariaConfig,
        *,
        data: DataBundle | None = None,
        run_dir: RunDirectory | Path | None = None,
        progress: ProgressReporter | None = None,
    ) -> None:
        self.config = config
        if config.run.num_threads:
            torch.set_num_threads(config.run.num_threads)
        self.device = resolve_device(config.run.device)
        self.model = model.to(self.device)
        self.tamiyo = tamiyo
        self.data = data if data is not None else load_data(config.data, config.run.seed)
        self.loaders = make_loaders(self.data, config.data, config.run.seed)
        self.train_loader, self.val_loader = self.loaders.train, self.loaders.val
        if isinstance(run_dir, Path | str):
            run_dir = RunDirectory.create(Path(run_dir), config)
        self.run_dir = run_dir
        self.progress: ProgressReporter = progress or NullProgress()
        self.loss_fn = nn.CrossEntropyLoss()
        self.amp = config.run.amp and self.device.type == "cuda"
        # Loaders yield CPU tensors: only another device needs a copy per batch.
        self._move_batches = self.device.type != "cpu"

        self.optimizer_manager = DynamicOptimizerManager(
            self.model,
            config.optimizer,
            config.scheduler,
            total_steps=config.run.epochs * len(self.train_loader),
            steps_per_epoch=len(self.train_loader),
        )
        self.optimizer = self.optimizer_manager.get_optimizer()
        self.hardware_monitor = HardwareMonitor(self.device)
        self.snapshots = SnapshotRing(config.checkpoint.memory_snapshots)
        self.store = (
            CheckpointStore(self.run_dir.checkpoint_dir, config.checkpoint.keep)
            if self.run_dir is not None
            else None
        )

        self.current_epoch = 0
        self.global_step = 0
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
        """Run the remaining epochs; return (and write) the run summary.

        A ``TolariaError`` (e.g. the controller giving up after repeated failures) still
        writes ``summary.json`` with ``status: failed`` and the message before it propagates.
        """
        self._started = time.perf_counter()
        epochs = self.config.run.epochs
        self._event("run_start", epoch=self.current_epoch, params=count_parameters(self.model))
        self.progress.start(self.current_epoch, epochs)
        status, error = "failed", None
        try:
            while self.current_epoch < epochs:
                self.run_epoch(self.current_epoch)
            if self.store is not None and self._last_durable_epoch != self.current_epoch - 1:
                self.store.save(self._capture(epoch=self.current_epoch - 1))
            status = "completed"
        except TolariaError as exc:
            error = str(exc)
            self._event("run_failed", epoch=self.current_epoch, error=error)
            raise
        finally:
            self.progress.stop()
            summary = self.summary(status=status, error=error)
            if self.run_dir is not None:
                self.run_dir.write_summary(summary)
                self.run_dir.close()
        return summary

    def run_epoch(self, epoch: int) -> AdaptationSignal:
        """One pass of the design §2 lifecycle; advances ``current_epoch`` (or rolls it back)."""
        self.current_epoch = epoch
        self.optimizer_manager.check_manifest()
        self.loaders.train_sampler.set_epoch(epoch)
        training_loss = self._run_train_epoch()

        global_metrics, counterfactual = self._run_validation_epoch()
        packet = self._assemble_system_state(training_loss, global_metrics, counterfactual)
        signal = self.tamiyo.step(packet)
        self._record_epoch(packet, signal)

        if signal.emergency_rollback_required or not math.isfinite(training_loss):
            reason = signal.reason or "non-finite training loss"
            self.restore_from_checkpoint(reason)
            return signal
        self.current_epoch = epoch + 1
        if signal.optimizer_rebuild_required:
            self.optimizer = self.optimizer_manager.rebuild_optimizer()
            trained = len(self.optimizer_manager.manifest())
            self._event("optimizer_rebuild", epoch=epoch, parameters_trained=trained)
        self.optimizer_manager.end_epoch(global_metrics.loss)
        # Snapshot last: it must hold the rebuilt optimizer (a restore needs an entry for
        # every trainable parameter) and the stepped schedule (or a resume runs one behind).
        self.create_checkpoint()
        return signal

    # ------------------------------------------------------------------ loops
    def _run_train_epoch(self) -> float:
        """Mean training loss of the epoch; NaN if a non-finite loss stopped it early."""
        self.model.train()
        self.progress.start_epoch(self.current_epoch, len(self.train_loader))
        loss_sum = torch.zeros((), device=self.device)
        batches = 0
        for x, y in self.train_loader:
            if self._move_batches:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
            with self._autocast():
                loss = self.loss_fn(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.optimizer_manager.after_optimizer_step()
            loss_sum += loss.detach().float()
            batches += 1
            self.global_step += 1
            self.progress.advance_batch()
            if batches % NONFINITE_CHECK_INTERVAL == 0 and not torch.isfinite(loss_sum):
                break
        mean = (loss_sum / max(batches, 1)).item()  # the one read of the epoch
        return mean if math.isfinite(mean) else math.nan

    def _run_validation_epoch(self) -> tuple[EvalMetrics, dict[str, EvalMetrics]]:
        # Design Figure 2: the boundary rotates Tamiyo's epoch state before validation.
        self.tamiyo.on_epoch_boundary(self.current_epoch)
        return self._run_validation(self.val_loader, self.tamiyo.seeds_to_evaluate())

    @torch.inference_mode()
    def _run_validation(
        self, loader, counterfactual_ids: list[str] = ()
    ) -> tuple[EvalMetrics, dict[str, EvalMetrics]]:
        """Loss and accuracy, plus the same with each named seed's alpha forced to 0."""
        self.model.eval()
        variants = [None, *counterfactual_ids]
        # Sums stay on the device; one transfer at the end (invariant: no per-batch sync).
        totals = torch.zeros(len(variants), 2, device=self.device)
        count = 0
        for x, y in loader:
            if self._move_batches:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
            for row, seed_id in enumerate(variants):
                scope = ablated(self.model, [seed_id]) if seed_id else contextlib.nullcontext()
                with scope, self._autocast():
                    logits = self.model(x)
                totals[row, 0] += self.loss_fn(logits.float(), y) * y.numel()
                totals[row, 1] += (logits.argmax(dim=1) == y).sum()
            count += y.numel()
        sums = (totals / max(count, 1)).tolist()
        metrics = [EvalMetrics(loss=loss, accuracy=acc) for loss, acc in sums]
        return metrics[0], dict(zip(counterfactual_ids, metrics[1:], strict=True))

    def evaluate_test(self) -> EvalMetrics | None:
        """Test-split metrics: reported only, never shown to the controller."""
        if self.loaders.test is None:
            return None
        metrics, _ = self._run_validation(self.loaders.test)
        return metrics

    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return _NO_AUTOCAST

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
            hardware_context=self.hardware_monitor.current(),
            health_map=dict(self.tamiyo.health_map),
            seed_states=dict(self.tamiyo.seed_states),
            counterfactual=counterfactual,
        )

    def create_checkpoint(self) -> None:
        """Snapshot the system as of the end of ``current_epoch - 1`` (memory; disk every N)."""
        epoch = self.current_epoch - 1
        # The snapshot this push evicts lends its buffers: no fresh allocation per epoch.
        snapshot = self._capture(epoch=epoch, reuse=self.snapshots.recyclable())
        self.snapshots.push(snapshot)
        every = self.config.checkpoint.every_epochs
        if self.store is not None and every and (epoch + 1) % every == 0:
            self.store.save(snapshot)
            self._last_durable_epoch = epoch

    def restore_from_checkpoint(self, reason: str) -> None:
        """Emergency rollback of the whole system to the newest snapshot older than this
        epoch -- or, when this epoch already failed after such a rollback, one epoch further
        back per repeat: damage done in an epoch that passed the checks lives in its snapshot.
        """
        incident_epoch = self.current_epoch
        depth = self._rollbacks_at.get(incident_epoch, 0)
        self._rollbacks_at[incident_epoch] = depth + 1
        snapshot = None
        for back in range(depth, -1, -1):  # as far back as asked, or the oldest we hold
            snapshot = self.snapshots.newest_before(incident_epoch - back)
            if snapshot is not None:
                break
        if snapshot is None:
            raise CheckpointError(f"rollback at epoch {incident_epoch}: no snapshot to restore")
        restore_snapshot(snapshot, self.model, self.optimizer_manager, self.tamiyo)
        # The controller removes what its incident memory implicates, so the epoch is not
        # replayed bit for bit into the same failure.
        amends = self.tamiyo.on_rollback(snapshot.epoch)
        if amends.optimizer_rebuild_required:
            self.optimizer_manager.rebuild_optimizer()
        self.optimizer = self.optimizer_manager.get_optimizer()
        for adaptation in amends.adaptations:
            self._event("adaptation", epoch=incident_epoch, **adaptation.to_dict())
        self._load_state(snapshot, resume=False)
        self.rollbacks += 1
        self.progress.note(
            f"[red]rollback[/] at epoch {incident_epoch} "
            f"to the end of epoch {snapshot.epoch}: {reason}"
        )
        self._event("rollback", epoch=incident_epoch, restored_epoch=snapshot.epoch, reason=reason)

    def resume(self, on_skip=None) -> int:
        """Continue from the newest valid durable checkpoint; returns the epoch it resumes at."""
        if self.store is None:
            raise CheckpointError("resume needs a run directory")
        snapshot = self.store.load_latest(on_skip=on_skip)
        restore_snapshot(snapshot, self.model, self.optimizer_manager, self.tamiyo)
        self.optimizer = self.optimizer_manager.get_optimizer()
        self._load_state(snapshot, resume=True)
        self._last_durable_epoch = snapshot.epoch
        self.snapshots.push(snapshot)
        self.run_dir.rewind(snapshot.epoch)
        self._event("resume", epoch=snapshot.epoch, checkpoint_epoch=snapshot.epoch)
        return self.current_epoch

    def _capture(self, *, epoch: int, reuse=None):
        extra = {
            "current_epoch": epoch + 1,
            "rollbacks": self.rollbacks,
            "best_val_accuracy": self.best_val_accuracy,
            "params_initial": self.params_initial,
            "wall_time_s": self.wall_time_before + time.perf_counter() - self._started,
            "last_record": self.last_record,
            # The data order is a pure function of (seed, epoch); the sampler's state also
            # lets a resume notice that the dataset or the seed changed under it.
            "data_order": self.loaders.train_sampler.state_dict(),
        }
        return capture_snapshot(
            self.model,
            self.optimizer_manager,
            self.tamiyo,
            epoch=epoch,
            global_step=self.global_step,
            extra=extra,
            reuse=reuse,
        )

    def _load_state(self, snapshot, *, resume: bool) -> None:
        """Counters from a snapshot.  A rollback keeps its own rollback count and clock:
        the abandoned epochs still happened; a resume restores them from the checkpoint."""
        extra = snapshot.extra
        self.current_epoch = extra["current_epoch"]
        self.global_step = snapshot.global_step
        self.best_val_accuracy = extra["best_val_accuracy"]
        self.last_record = extra["last_record"]
        if resume:
            self.loaders.train_sampler.load_state_dict(extra["data_order"])
            self.rollbacks = extra["rollbacks"]
            self.params_initial = extra["params_initial"]
            self.wall_time_before = extra["wall_time_s"]
            self._started = time.perf_counter()

    # ------------------------------------------------------------------ records
    def _record_epoch(self, packet: SystemStatePacket, signal: AdaptationSignal) -> None:
        accuracy = packet.validation_accuracy
        if math.isfinite(accuracy):
            self.best_val_accuracy = max(self.best_val_accuracy, accuracy)
        record = {
            "epoch": packet.current_epoch,
            "global_step": packet.global_step,
            "train_loss": packet.training_loss,
            "val_loss": packet.validation_loss,
            "val_accuracy": accuracy,
            "lr": self.optimizer.param_groups[0]["lr"],
            "params": count_parameters(self.model),
            # After this epoch's decisions: what the next epoch trains with.
            "seed_states": {k: v.value for k, v in self.tamiyo.seed_states.items()},
            "adaptations": len(signal.adaptations),
            "rollback": signal.emergency_rollback_required,
        }
        self.last_record = record
        for adaptation in signal.adaptations:
            self._event("adaptation", epoch=packet.current_epoch, **adaptation.to_dict())
            blueprint = f" ({adaptation.blueprint})" if adaptation.blueprint else ""
            self.progress.note(
                f"epoch {packet.current_epoch}: {adaptation.seed_id}{blueprint} "
                f"{adaptation.from_state.value} -> {adaptation.to_state.value}: {adaptation.reason}"
            )
        if self.run_dir is not None:
            self.run_dir.log_metrics(record)
        self.progress.end_epoch(record)

    def _event(self, kind: str, **fields: Any) -> None:
        if self.run_dir is not None:
            self.run_dir.log_event(kind, **fields)

    def summary(self, *, status: str = "completed", error: str | None = None) -> dict[str, Any]:
        last = self.last_record or {}
        test = self.evaluate_test()
        states = Counter(s.value for s in self.tamiyo.seed_states.values())
        return {
            "best_val_accuracy": self.best_val_accuracy,
            "final_val_accuracy": last.get("val_accuracy"),
            "final_val_loss": last.get("val_loss"),
            "test_accuracy": test.accuracy if test else None,
            "test_loss": test.loss if test else None,
            "epochs": self.current_epoch,
            "global_step": self.global_step,
            "params_initial": self.params_initial,
            "params_final": count_parameters(self.model),
            "seeds": dict(sorted(states.items())),
            "rollbacks": self.rollbacks,
            "wall_time_s": self.wall_time_before + time.perf_counter() - self._started,
            "status": status,
            "error": error,
            "device": self.device.type,
        }
