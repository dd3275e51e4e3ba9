"""The run summary: what a researcher reads first, and what ``summary.json`` holds."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

from tolaria.hosts import count_parameters


def run_summary(
    trainer: Any, *, status: str, error: str | None = None, diverged: bool = False
) -> dict[str, Any]:
    """Best/final validation, test metrics (measured now, once), growth and bookkeeping."""
    last = trainer.last_record or {}
    test = trainer.evaluate(trainer.loaders.test)[0] if trainer.loaders.test else None
    return {
        "best_val_accuracy": trainer.best_val_accuracy,
        "final_val_accuracy": last.get("val_accuracy"),
        "final_val_loss": last.get("val_loss"),
        "test_accuracy": test.accuracy if test else None,
        "test_loss": test.loss if test else None,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "params_initial": trainer.params_initial,
        "params_final": count_parameters(trainer.model),
        "seeds": seed_counts(trainer.tamiyo.seed_states),
        "rollbacks": trainer.rollbacks,
        "wall_time_s": trainer.wall_time_s,
        "status": status,
        "error": error,
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
