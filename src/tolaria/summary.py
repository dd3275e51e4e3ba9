"""The run summary: what a researcher reads first, and what ``summary.json`` holds."""

from __future__ import annotations

from collections import Counter
from typing import Any

from tolaria.hosts import count_parameters
from tolaria.inference import evaluate_model


def run_summary(
    trainer: Any, *, status: str, error: str | None = None, diverged: bool = False
) -> dict[str, Any]:
    """Best/final validation, test metrics (measured now, once, of the model ``test_of``
    names), growth, why the run stopped and bookkeeping."""
    last = trainer.last_record or {}
    test, test_of = None, None
    if trainer.loaders.test:
        model, test_of = trainer.selection.tested_model(trainer)
        test = evaluate_model(trainer, model, trainer.loaders.test)
    states = Counter(s.value for s in trainer.tamiyo.seed_states.values())
    epochs = trainer.config.run.epochs
    stopped_early = status == "completed" and trainer.current_epoch < epochs
    return {
        "best_val_accuracy": trainer.best_val_accuracy,
        "final_val_accuracy": last.get("val_accuracy"),
        "final_val_loss": last.get("val_loss"),
        "test_accuracy": test.accuracy if test else None,
        "test_loss": test.loss if test else None,
        "test_of": test_of,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "params_initial": trainer.params_initial,
        "params_final": count_parameters(trainer.model),
        "seeds": dict(sorted(states.items())),
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


def _stop_reason(trainer: Any, status: str, error: str | None, stopped_early: bool) -> str:
    if stopped_early:
        return trainer.selection.stop_reason(trainer.tamiyo.seed_states)
    if status == "completed":
        return f"ran all {trainer.config.run.epochs} epochs"
    return f"failed: {error}" if status == "failed" else status
