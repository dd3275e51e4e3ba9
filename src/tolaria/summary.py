"""The run summary: what a researcher reads first, and what ``summary.json`` holds."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

from tolaria.hosts import count_parameters
from tolaria.inference import evaluate_model


def run_summary(
    trainer: Any, *, status: str, error: str | None = None, diverged: bool = False
) -> dict[str, Any]:
    """Best/final validation, test metrics (measured now, once, of the model ``test_of``
    names), growth, why the run stopped and bookkeeping.

    Metrics appear by their labels: ``best_val_<monitor>`` (the best epoch by the task's
    score), ``final_val_<metric>`` and ``test_<metric>`` for every configured metric --
    ``best_val_accuracy``, ``final_val_accuracy`` and ``test_accuracy`` for the default task.
    """
    task = trainer.task
    last = trainer.last_record or {}
    final = last.get("val_metrics", {})
    test, test_of = None, None
    if trainer.loaders.test:
        model, test_of = trainer.selection.tested_model(trainer)
        test = evaluate_model(trainer, model, trainer.loaders.test)
    labels = [metric.label for metric in task.metrics]
    epochs = trainer.config.run.epochs
    stopped_early = status == "completed" and trainer.current_epoch < epochs
    return {
        f"best_val_{task.monitor}": task.monitored(trainer.best_val_accuracy),
        **{f"final_val_{label}": final.get(label) for label in labels},
        "final_val_loss": last.get("val_loss"),
        **{f"test_{label}": test.metrics[label] if test else None for label in labels},
        "test_loss": test.loss if test else None,
        "task": task.kind,
        "monitor": task.monitor,
        "monitor_mode": task.mode,
        "test_of": test_of,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "params_initial": trainer.params_initial,
        "params_final": count_parameters(trainer.model),
        "seeds": seed_counts(trainer.tamiyo.seed_states),
        # Grafts whose trial the run ended in the middle of (their fate was not decided).
        "seeds_on_trial": {seed_id: state.value for seed_id, state
                           in sorted(trainer.tamiyo.seed_states.items()) if state.is_active},
        "best": trainer.selection.describe(trainer),
        "rollbacks": trainer.rollbacks,
        "wall_time_s": trainer.wall_time_s,
        "status": status,
        "error": error,
        "stopped_early": stopped_early,
        "stop_reason": _stop_reason(trainer, status, error, stopped_early),
        # Stopped because its loss diverged (or went NaN) again after every rollback.
        "diverged": diverged,
        "device": trainer.device.type,
    }


def seed_counts(seed_states: Mapping[str, Any]) -> dict[str, int]:
    """How many seeds are in each state that has any, by state name."""
    return dict(sorted(Counter(str(state) for state in seed_states.values()).items()))


def plain_value(value: Any) -> str:
    """A summary value as a person reads it, never a Python repr: numbers formatted,
    a mapping as ``fossilized 1, dormant 3``, a list joined, nothing as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{key} {plain_value(v)}" for key, v in value.items()) or "none"
    if isinstance(value, list | tuple):
        return ", ".join(plain_value(v) for v in value) or "none"
    return str(value)


def _stop_reason(trainer: Any, status: str, error: str | None, stopped_early: bool) -> str:
    if stopped_early:
        return trainer.selection.stop_reason(trainer.tamiyo.seed_states)
    if status == "completed":
        return f"ran all {trainer.config.run.epochs} epochs"
    return f"failed: {error}" if status == "failed" else status
