"""How long is the end-of-epoch hook?  Design budget 18 ms, our goal <= 5 ms.

The default job (MNIST-1D, MLP host, a seed on its flattened input, Tamiyo's heuristic
policy) runs for real with no run directory (so no disk I/O), and every epoch the
trainer's own ``run_epoch`` is timed in pieces by wrapping its steps on the instance:

- ``boundary``: from the end of validation to the end of ``run_epoch`` -- packet
  assembly, ``tamiyo.step`` (decisions, seed transitions, ``on_epoch_end``), recording,
  the optimizer rebuild when flagged, the scheduler step and the in-memory snapshot:
  everything the design's end-of-epoch hook does, validation and disk excluded;
- ``boundary_without_snapshot``: the same less the snapshot;
- its parts: ``packet`` (``_assemble_system_state``), ``tamiyo_step``, ``snapshot``
  (``create_checkpoint``: capture into the recycled buffers + ring push), ``rebuild``
  (epochs that rebuilt the optimizer only);
- ``telemetry_flush``: ``tamiyo.on_epoch_boundary``, which the design places before
  validation (one device-to-host transfer of every seed's telemetry); reported apart.

Epochs that adapt (germinate, blend, fossilize, cull) are part of the sample: the
median is the typical epoch, the maximum the worst one.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import add_mlp_workloads, bench_main, median, mlp_workloads, quantile
from tolaria.build import build_trainer
from tolaria.config import load_config
from tolaria.hosts import count_parameters
from tolaria.trainer import TolariaTrainer

DESIGN_BUDGET_MS = 18.0
GOAL_MS = 5.0
PARTS = ("packet", "tamiyo_step", "snapshot", "rebuild", "telemetry_flush")


class BoundaryClock:
    """Wraps a trainer's steps on the instance and records their durations per epoch."""

    def __init__(self, trainer: TolariaTrainer) -> None:
        self.epochs: list[dict[str, float]] = []
        self.current: dict[str, float] = {}
        self._validated_at = 0.0
        self._time(trainer, "_assemble_system_state", "packet")
        self._time(trainer, "create_checkpoint", "snapshot")
        self._time(trainer.tamiyo, "step", "tamiyo_step")
        self._time(trainer.tamiyo, "on_epoch_boundary", "telemetry_flush")
        self._time(trainer.optimizer_manager, "rebuild_optimizer", "rebuild")
        validation = trainer._run_validation_epoch

        @functools.wraps(validation)
        def validation_then_mark(*args, **kwargs):
            result = validation(*args, **kwargs)
            self._validated_at = time.perf_counter()
            return result

        trainer._run_validation_epoch = validation_then_mark
        self.trainer = trainer

    def _time(self, owner: object, method: str, part: str) -> None:
        original: Callable[..., Any] = getattr(owner, method)

        @functools.wraps(original)
        def timed_part(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[part] = self.current.get(part, 0.0) + time.perf_counter() - start

        setattr(owner, method, timed_part)

    def run_epoch(self) -> None:
        self.current = {}
        signal = self.trainer.run_epoch(self.trainer.current_epoch)
        boundary = time.perf_counter() - self._validated_at
        self.current["boundary"] = boundary
        self.current["boundary_without_snapshot"] = boundary - self.current.get("snapshot", 0.0)
        self.current["adaptations"] = len(signal.adaptations)
        self.epochs.append(self.current)


def summarize(samples: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in samples]
    return {"median": median(ms), "p90": quantile(ms, 0.9), "max": max(ms), "n": len(ms)}


def measure(hidden: list[int], epochs: int) -> dict[str, Any]:
    config = load_config(overrides=[
        f"model.kwargs.hidden={hidden}",
        f"run.epochs={epochs}",
        "run.device=cpu",
        "run.progress=false",
        "run.tensorboard=false",
    ])
    trainer = build_trainer(config)
    clock = BoundaryClock(trainer)
    while trainer.current_epoch < epochs:
        clock.run_epoch()
    recorded = clock.epochs[1:]  # the first epoch pays for first-call binding
    timings = {
        part: summarize([e[part] for e in recorded if part in e])
        for part in ("boundary", "boundary_without_snapshot", *PARTS)
        if any(part in e for e in recorded)
    }
    return {
        "host": f"mlp hidden {hidden}",
        "params_initial": trainer.params_initial,
        "params_final": count_parameters(trainer.model),
        "seeds": len(trainer.tamiyo.seed_states),
        "epochs": len(clock.epochs),
        "epochs_recorded": len(recorded),
        "epochs_with_adaptations": sum(e["adaptations"] > 0 for e in recorded),
        "rollbacks": trainer.rollbacks,
        "ms": timings,
        "boundary_median_meets_goal": timings["boundary"]["median"] <= GOAL_MS,
        "boundary_max_within_budget": timings["boundary"]["max"] <= DESIGN_BUDGET_MS,
    }


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=30)
    add_mlp_workloads(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "design_budget_ms": DESIGN_BUDGET_MS,
        "goal_ms": GOAL_MS,
        "workloads": [measure(hidden, args.epochs) for hidden in mlp_workloads(args)],
    }


def report(result: dict[str, Any]) -> None:
    print(f"End-of-epoch hook, validation and disk excluded (budget {DESIGN_BUDGET_MS:.0f} ms, "
          f"goal <= {GOAL_MS:.0f} ms); {result['machine']['cpu']}")
    print(f"{'workload':<22} {'part':<26} {'median ms':>10} {'p90 ms':>8} {'max ms':>8} {'n':>4}")
    for w in result["workloads"]:
        for part, stats in w["ms"].items():
            print(f"{w['host']:<22} {part:<26} {stats['median']:>10.3f} {stats['p90']:>8.3f} "
                  f"{stats['max']:>8.3f} {stats['n']:>4}")
        print(f"{'':<22} {w['epochs_with_adaptations']} of {w['epochs_recorded']} epochs adapted; "
              f"params {w['params_initial']:,} -> {w['params_final']:,}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main("epoch_boundary", __doc__.split("\n")[0], argv, configure, run, report)


if __name__ == "__main__":
    main()
