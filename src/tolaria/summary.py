"""The run summary: what a researcher reads first, and what ``summary.json`` holds."""

from __future__ import annotations

from collections import Counter
from typing import Any

from tolaria.hosts import count_parameters


def run_summary(
    trainer: Any, *, status: str, error: str | None = None, diverged: bool = False
) -> dict[str, Any]:
    """Best/final validation, test metrics (measured now, once), growth and bookkeeping.

    Metrics appear by their labels: ``best_val_<monitor>`` (the best epoch by the task's
    score), ``final_val_<metric>`` and ``test_<metric>`` for every configured metric --
    ``best_val_accuracy``, ``final_val_accuracy`` and ``test_accuracy`` for the default task.
    """
    task = trainer.task
    last = trainer.last_record or {}
    final = last.get("val_metrics", {})
    test = trainer.evaluate(trainer.loaders.test)[0] if trainer.loaders.test else None
    states = Counter(s.value for s in trainer.tamiyo.seed_states.values())
    labels = [metric.label for metric in task.metrics]
    return {
        f"best_val_{task.monitor}": task.monitored(trainer.best_val_accuracy),
        **{f"final_val_{label}": final.get(label) for label in labels},
        "final_val_loss": last.get("val_loss"),
        **{f"test_{label}": test.metrics[label] if test else None for label in labels},
        "test_loss": test.loss if test else None,
        "task": task.kind,
        "monitor": task.monitor,
        "monitor_mode": task.mode,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "params_initial": trainer.params_initial,
        "params_final": count_parameters(trainer.model),
        "seeds": dict(sorted(states.items())),
        "rollbacks": trainer.rollbacks,
        "wall_time_s": trainer.wall_time_s,
        "status": status,
        "error": error,
        # Stopped because its loss diverged (or went NaN) again after every rollback.
        "diverged": diverged,
        "device": trainer.device.type,
    }
