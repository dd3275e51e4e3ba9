"""The run summary: what a researcher reads first, and what ``summary.json`` holds."""

from __future__ import annotations

from collections import Counter
from typing import Any

from tolaria.hosts import count_parameters


def run_summary(
    trainer: Any, *, status: str, error: str | None = None, diverged: bool = False
) -> dict[str, Any]:
    """Best/final validation, test metrics (measured now, once), growth and bookkeeping."""
    last = trainer.last_record or {}
    test = trainer.evaluate(trainer.loaders.test)[0] if trainer.loaders.test else None
    states = Counter(s.value for s in trainer.tamiyo.seed_states.values())
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
        "seeds": dict(sorted(states.items())),
        "rollbacks": trainer.rollbacks,
        "wall_time_s": trainer.wall_time_s,
        "status": status,
        "error": error,
        # Stopped because its loss diverged (or went NaN) again after every rollback.
        "diverged": diverged,
        "device": trainer.device.type,
    }
