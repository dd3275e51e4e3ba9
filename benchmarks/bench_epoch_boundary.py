"""How long is the end-of-epoch hook?  Design budget 18 ms, our goal <= 5 ms.

The default job (MNIST-1D, MLP host, a seed on its flattened input, Tamiyo's heuristic
policy, and then the learned policy v0) runs for real with no run directory (so no disk
I/O), and a callback times every epoch's end from the trainer's own events:

- ``boundary``: ``validation_end`` -> ``epoch_end`` -- packet assembly, ``tamiyo.step``
  (decisions, seed transitions, ``on_epoch_end``), recording, the optimizer rebuild when
  flagged, the scheduler step and the in-memory snapshot: everything the design's
  end-of-epoch hook does, validation and disk excluded;
- ``boundary_without_snapshot``: the same less the snapshot;
- its parts: ``packet`` (-> ``packet_assembled``), ``tamiyo_step`` (-> ``signal_received``),
  ``rebuild`` (-> ``optimizer_rebuild``, epochs that rebuilt only), ``snapshot`` (the
  last of those -> ``epoch_end``: scheduler step, capture into recycled buffers, ring push);
- ``telemetry_flush``: ``tamiyo.on_epoch_boundary``, which the design places before
  validation (one device-to-host transfer of every seed's telemetry); reported apart, by
  timing that public controller call.

Epochs that adapt (germinate, blend, fossilize, cull) are part of the sample: the
median is the typical epoch, the maximum the worst one.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

from benchmarks.common import add_mlp_workloads, bench_main, median, mlp_workloads, quantile
from tolaria.build import build_trainer
from tolaria.config import load_config
from tolaria.events import Callback
from tolaria.hosts import count_parameters

DESIGN_BUDGET_MS = 18.0
GOAL_MS = 5.0
PARTS = ("packet", "tamiyo_step", "snapshot", "rebuild", "telemetry_flush")


class BoundaryClock(Callback):
    """Marks the end-of-epoch events and turns them into per-epoch part durations."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.current: dict[str, float] = {}
        self._marks: dict[str, float] = {}

    def watch(self, tamiyo: Any) -> None:
        """Time ``tamiyo.on_epoch_boundary``: it has no event of its own."""
        original = tamiyo.on_epoch_boundary

        @functools.wraps(original)
        def timed(epoch: int) -> None:
            start = time.perf_counter()
            original(epoch)
            self.current["telemetry_flush"] = time.perf_counter() - start

        tamiyo.on_epoch_boundary = timed

    def _mark(self, name: str) -> float:
        self._marks[name] = now = time.perf_counter()
        return now

    def on_epoch_start(self, trainer, record) -> None:
        self.current, self._marks = {}, {}

    def on_validation_end(self, trainer, record) -> None:
        self._mark("validated")

    def on_packet_assembled(self, trainer, record) -> None:
        self.current["packet"] = self._mark("packet") - self._marks["validated"]

    def on_signal_received(self, trainer, record) -> None:
        self.current["tamiyo_step"] = self._mark("decided") - self._marks["packet"]
        self._mark("acted")

    def on_adaptation(self, trainer, record) -> None:
        self._mark("acted")

    def on_optimizer_rebuild(self, trainer, record) -> None:
        self.current["rebuild"] = time.perf_counter() - self._marks["acted"]
        self._mark("acted")

    def on_epoch_end(self, trainer, record) -> None:
        end = time.perf_counter()
        self.current["snapshot"] = end - self._marks["acted"]
        self.current["boundary"] = end - self._marks["validated"]
        self.current["boundary_without_snapshot"] = (
            self.current["boundary"] - self.current["snapshot"]
        )
        self.current["adaptations"] = record.adaptations
        self.epochs.append(self.current)


def summarize(samples: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in samples]
    return {"median": median(ms), "p90": quantile(ms, 0.9), "max": max(ms), "n": len(ms)}


#: The policies timed: the default heuristic, and the shipped learned v0 sampling as it does
#: by day (its scorer runs at every epoch where growth is possible).
POLICIES = {"heuristic": [], "learned": ["tamiyo.policy=learned", "tamiyo.policy_version=v0"]}


def measure(hidden: list[int], epochs: int, policy: str) -> dict[str, Any]:
    config = load_config(overrides=[
        f"model.kwargs.hidden={hidden}",
        f"run.epochs={epochs}",
        "run.device=cpu",
        "run.progress=false",
        "run.tensorboard=false",
        *POLICIES[policy],
    ])
    clock = BoundaryClock()
    trainer = build_trainer(config, callbacks=[clock])
    clock.watch(trainer.tamiyo)
    while trainer.current_epoch < epochs:
        trainer.run_epoch(trainer.current_epoch)
    recorded = clock.epochs[1:]  # the first epoch pays for first-call binding
    timings = {
        part: summarize([e[part] for e in recorded if part in e])
        for part in ("boundary", "boundary_without_snapshot", *PARTS)
        if any(part in e for e in recorded)
    }
    return {
        "host": f"mlp hidden {hidden}" + ("" if policy == "heuristic" else f", {policy}"),
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
        "workloads": [
            measure(hidden, args.epochs, policy)
            for policy in POLICIES
            for hidden in mlp_workloads(args)
        ],
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
