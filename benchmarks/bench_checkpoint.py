"""What do snapshots, rollbacks and durable checkpoints cost for 1M and 10M parameters?

For each size a whole system is built as the trainer builds it: an MLP host with seeds
injected on its first layer (one seed grafted and TRAINING, so both optimizer groups are
in use), a ``DynamicOptimizerManager`` over Adam with a StepLR schedule, a
``TamiyoController``; a few optimizer steps populate the Adam moments.  Then, per round:

- ``capture``: ``capture_snapshot`` + ``SnapshotRing.push`` -- the per-epoch snapshot cost,
  A/B: ``fresh`` allocates new buffers, ``recycled`` copies into the buffers of the snapshot
  the ring is about to evict (``capture_snapshot(reuse=ring.recyclable())``);
- ``rollback``: ``restore_snapshot`` of the ring's newest snapshot -- the fast rollback
  (design budget 500 ms, our goal <= 50 ms);
- ``disk_save``: ``CheckpointStore.save`` -- serialise, SHA-256, fsync, atomic rename
  (budget 12 s, our goal <= 1 s);
- ``disk_restore``: ``CheckpointStore.load_latest`` (read + verify) + ``restore_snapshot``
  -- the full rollback/resume (budget 12 s, our goal <= 1 s).  The file was just written,
  so it is read from the page cache: a cold disk adds its read time.

Rounds interleave the sizes and operations so drift in machine speed hits all alike; we
report medians, and for the capture A/B the median of per-round ratios.  Run
``python -m benchmarks.bench_checkpoint`` (``--json`` prints the result object); it also
writes ``benchmarks/results/checkpoint.json``.  Threads are pinned to one, as in the
trainer's default (``run.num_threads``) and every benchmark here.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    RESULTS_DIR,
    bench_main,
    median,
    mlp_of_size,
    paired_ratio,
    rotated,
    timed,
)
from tolaria.checkpoint import (
    CheckpointStore,
    ModelState,
    RngState,
    SnapshotRing,
    capture_snapshot,
    restore_snapshot,
)
from tolaria.config import KasminaConfig, OptimizerConfig, SchedulerConfig, TamiyoConfig
from tolaria.contracts import SeedState
from tolaria.hosts import count_parameters
from tolaria.kasmina import find_seeds, inject_seeds
from tolaria.optim import DynamicOptimizerManager
from tolaria.tamiyo import TamiyoController

#: (design budget, our goal) in milliseconds, ARCHITECTURE §4.
BUDGETS_MS = {
    "rollback": (500.0, 50.0),
    "disk_save": (12_000.0, 1_000.0),
    "disk_restore": (12_000.0, 1_000.0),
}
INPUTS, CLASSES, DEPTH = 256, 10, 3
#: The settings the published figures were measured with, spelled out: the defaults may move.
OPTIMIZER = OptimizerConfig(name="Adam", lr=1e-3, seed_lr_multiplier=1.0)
TAMIYO = TamiyoConfig(blueprints=["residual_mlp", "low_rank"], param_budget_fraction=1.0)


class System:
    """One run's model, optimizer manager and controller, with a grafted seed in training."""

    def __init__(self, target_params: int) -> None:
        self.model = mlp_of_size(target_params, INPUTS, CLASSES, DEPTH)
        kasmina = KasminaConfig(layers=["0"], chunks=4)
        inject_seeds(self.model, kasmina)
        self.model(torch.zeros(2, INPUTS))  # seeds learn their chunk shapes
        self.tamiyo = TamiyoController(
            TAMIYO, kasmina, num_classes=CLASSES,
            host_parameters=count_parameters(self.model),
        )
        seeds = find_seeds(self.model)
        for seed in seeds:
            self.tamiyo.register_seed(seed)
        # A small graft, so the parameter count stays the target's.
        seeds[0].germinate("low_rank", epoch=0, rank=8)
        seeds[0].transition(SeedState.TRAINING, epoch=0, reason="benchmark")
        self.manager = DynamicOptimizerManager(
            self.model, OPTIMIZER, SchedulerConfig(name="StepLR", kwargs={"step_size": 5}),
        )
        optimizer = self.manager.get_optimizer()
        for _ in range(2):  # populate the Adam moments of every parameter
            x, y = torch.randn(32, INPUTS), torch.randint(0, CLASSES, (32,))
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(self.model(x), y).backward()
            optimizer.step()
            self.manager.after_optimizer_step()
        self.manager.end_epoch(1.0)
        self.params = count_parameters(self.model)

    @property
    def components(self) -> dict:
        """As the trainer names them (less the counters and data order, which cost nothing)."""
        return {"model": ModelState(self.model), "optimizer": self.manager,
                "tamiyo": self.tamiyo, "rng": RngState()}

    def capture(self, epoch: int, reuse=None):
        return capture_snapshot(self.components, epoch=epoch, global_step=epoch, reuse=reuse)

    def restore(self, snapshot) -> None:
        restore_snapshot(snapshot, self.components)


def _timed_capture(system: System, ring: SnapshotRing, epoch: int, recycle: bool) -> float:
    """One per-epoch snapshot as the trainer takes it: capture, then push into the ring."""
    return timed(lambda: ring.push(system.capture(epoch, ring.recyclable() if recycle else None)))


def _snapshot_bytes(snapshot) -> int:
    tensors = list(snapshot["model"]["weights"].values())
    tensors += [t for s in snapshot["optimizer"]["state"].values() for t in s.values()
                if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


OPERATIONS = ("capture_fresh", "capture_recycled", "rollback", "disk_save", "disk_restore")


def measure(sizes: dict[str, int], rounds: int, directory: Path) -> dict[str, Any]:
    systems = {name: System(target) for name, target in sizes.items()}
    rings = {name: SnapshotRing(3) for name in sizes}
    stores = {name: CheckpointStore(directory / name, keep=2) for name in sizes}
    times: dict[str, dict[str, list[float]]] = {
        name: {op: [] for op in OPERATIONS} for name in sizes
    }
    for round_ in range(rounds + 1):  # round 0 fills the rings and warms caches: not recorded
        for name, system in systems.items():
            ring, store = rings[name], stores[name]
            epoch = 2 * round_
            # Two snapshots a round, one of each kind, each kind first every other round.
            kinds = rotated(["fresh", "recycled"], round_)
            samples = {
                f"capture_{kind}": _timed_capture(system, ring, epoch + i, kind == "recycled")
                for i, kind in enumerate(kinds)
            }
            newest = ring.newest_before(epoch + 2)
            samples["rollback"] = timed(lambda: system.restore(newest))  # noqa: B023
            samples["disk_save"] = timed(lambda: store.save(newest))  # noqa: B023
            samples["disk_restore"] = timed(
                lambda: system.restore(store.load_latest())  # noqa: B023
            )
            if round_:
                for op, seconds in samples.items():
                    times[name][op].append(seconds)

    results = {}
    for name, system in systems.items():
        medians = {op: median(values) * 1e3 for op, values in times[name].items()}
        entry = {
            "params": system.params,
            "snapshot_mb": _snapshot_bytes(rings[name].newest_before(2 * rounds + 2)) / 2**20,
            "checkpoint_mb": sum(
                p.stat().st_size for p in stores[name].checkpoints()[-1].iterdir()
            ) / 2**20,
            "median_ms": medians,
            "recycled_vs_fresh_capture": paired_ratio(
                times[name]["capture_recycled"], times[name]["capture_fresh"]
            ),
        }
        for op, (budget, goal) in BUDGETS_MS.items():
            entry[f"{op}_vs_budget"] = medians[op] / budget
            entry[f"{op}_meets_goal"] = medians[op] <= goal
        results[name] = entry
    return results


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=7, help="recorded rounds per size")


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = {"1M": 1_000_000, "10M": 10_000_000}
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-", dir=RESULTS_DIR.parent) as tmp:
        results = measure(sizes, args.rounds, Path(tmp))
    return {
        "setup": {
            "rounds": args.rounds,
            "optimizer": "Adam + StepLR",
            "host": f"MLP {INPUTS}->{DEPTH}x width->{CLASSES}, 4 seeds on layer 0, 1 training",
            "page_cache": "warm (the checkpoint was just written)",
        },
        "budgets_ms": {op: {"design": b, "goal": g} for op, (b, g) in BUDGETS_MS.items()},
        "sizes": results,
    }


def report(result: dict[str, Any]) -> None:
    machine = result["machine"]
    print(f"{result['setup']['host']}; {machine['torch_threads']} thread(s), load average "
          f"{machine['load_average_1min']}; medians of {result['setup']['rounds']} rounds (ms)")
    header = f"{'size':<5} {'params':>11} {'MB':>6} {'capture fresh':>14} {'recycled':>9} "
    header += f"{'ratio':>6} {'rollback':>9} {'disk save':>10} {'disk restore':>13}"
    print(header)
    for name, entry in result["sizes"].items():
        m = entry["median_ms"]
        print(f"{name:<5} {entry['params']:>11,} {entry['snapshot_mb']:>6.1f} "
              f"{m['capture_fresh']:>14.1f} {m['capture_recycled']:>9.1f} "
              f"{entry['recycled_vs_fresh_capture']:>6.2f} {m['rollback']:>9.1f} "
              f"{m['disk_save']:>10.1f} {m['disk_restore']:>13.1f}")
    for op, (budget, goal) in BUDGETS_MS.items():
        verdicts = ", ".join(
            f"{name} {entry['median_ms'][op]:.0f} ms "
            f"({'meets' if entry[f'{op}_meets_goal'] else 'MISSES'} goal)"
            for name, entry in result["sizes"].items()
        )
        print(f"{op}: budget {budget:.0f} ms, goal <= {goal:.0f} ms: {verdicts}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main("checkpoint", __doc__.split("\n")[0], argv, configure, run, report)


if __name__ == "__main__":
    main()
