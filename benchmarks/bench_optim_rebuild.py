"""What does rebuilding the optimizer of a growing 10M-parameter model cost?

The system is built as the trainer builds it: an MLP host (about 10M parameters) with
Kasmina seeds injected on its first layer, a ``DynamicOptimizerManager`` over Adam whose
moments are populated by a real optimizer step.  Each round times, on the same model:

- ``no_change``: ``rebuild_optimizer()`` with nothing changed (state preservation; design
  budget 100 ms, our goal <= 20 ms);
- ``add``: a seed germinates a ``residual_mlp`` and enters TRAINING, then
  ``rebuild_optimizer()`` (parameter addition; design budget 20 ms, our goal <= 20 ms);
- ``remove``: that seed, after an optimizer step gave its parameters Adam state, is culled,
  then ``rebuild_optimizer()`` (its state must go);
- ``check_manifest``: the per-epoch guard;
- ``torch_reload`` (reference B): what a conventional rebuild does for the ``no_change``
  case -- a fresh optimizer over the same groups plus ``load_state_dict`` of the old
  state remapped by position.  It is built and discarded, never installed.

A/B are interleaved in every round on the same model, so machine drift hits both alike;
we report medians and the ratio.  Around every manager rebuild we record each surviving
state tensor's ``data_ptr`` and identity: ``state_copies`` counts the ones that changed
(must be 0).  Run ``python -m benchmarks.bench_optim_rebuild`` (``--json`` prints the
result object); it also writes ``benchmarks/results/optim_rebuild.json``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from benchmarks.common import bench_main, median, mlp_of_size, timed
from tolaria.config import KasminaConfig, OptimizerConfig
from tolaria.contracts import SeedState
from tolaria.hosts import count_parameters
from tolaria.kasmina import find_seeds, inject_seeds
from tolaria.optim import DynamicOptimizerManager

#: (design budget, our goal) in milliseconds, ARCHITECTURE §4.
BUDGETS_MS = {"no_change": (100.0, 20.0), "add": (20.0, 20.0), "remove": (100.0, 20.0)}
INPUTS, CLASSES, DEPTH, TARGET_PARAMS = 256, 10, 3, 10_000_000
#: The settings the published figures were measured with, spelled out: the defaults may move.
OPTIMIZER = OptimizerConfig(name="Adam", lr=1e-3, seed_lr_multiplier=1.0)


class GrowingSystem:
    """A 10M-parameter MLP with 4 seeds on layer 0 and a manager over Adam."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = mlp_of_size(TARGET_PARAMS, INPUTS, CLASSES, DEPTH)
        inject_seeds(self.model, KasminaConfig(layers=["0"], chunks=4, embargo_epochs=0))
        self.model(torch.zeros(2, INPUTS))  # seeds learn their chunk shapes
        self.seed = find_seeds(self.model)[0]
        self.manager = DynamicOptimizerManager(self.model, OPTIMIZER)
        self.host_params = count_parameters(self.model)
        self.epoch = 0
        self.train_step()

    def train_step(self) -> None:
        optimizer = self.manager.get_optimizer()
        x, y = torch.randn(32, INPUTS), torch.randint(0, CLASSES, (32,))
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(self.model(x), y).backward()
        optimizer.step()
        self.manager.after_optimizer_step()

    def graft(self) -> None:
        self.seed.germinate("residual_mlp", epoch=self.epoch)
        self.seed.transition(SeedState.TRAINING, epoch=self.epoch, reason="benchmark")

    def cull(self) -> None:
        self.seed.transition(SeedState.CULLED, epoch=self.epoch, reason="benchmark")
        self.seed.on_epoch_end(self.epoch)  # embargo 0: DORMANT again, ready to regraft
        self.epoch += 1


def torch_reload(manager: DynamicOptimizerManager) -> torch.optim.Optimizer:
    """The conventional rebuild: a new optimizer, then the old state loaded by position."""
    old = manager.get_optimizer()
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])}
        for g in old.param_groups
    ]
    fresh = type(old)(groups)
    fresh.load_state_dict(old.state_dict())
    return fresh


def _pointers(optimizer: torch.optim.Optimizer) -> dict[tuple[int, str], tuple[int, int]]:
    return {
        (id(p), key): (id(t), t.data_ptr())
        for p, state in optimizer.state.items()
        for key, t in state.items()
        if isinstance(t, torch.Tensor)
    }


class CopyCounter:
    """Counts state tensors of surviving parameters that a rebuild replaced or moved."""

    def __init__(self) -> None:
        self.copies = 0
        self.checked = 0

    def timed_rebuild(self, manager: DynamicOptimizerManager) -> float:
        """Seconds taken by ``manager.rebuild_optimizer()`` (the pointer checks are outside)."""
        before = _pointers(manager.get_optimizer())
        seconds = timed(manager.rebuild_optimizer)
        after = _pointers(manager.get_optimizer())
        survivors = before.keys() & after.keys()
        self.checked += len(survivors)
        self.copies += sum(before[k] != after[k] for k in survivors)
        return seconds


def measure(rounds: int) -> dict[str, Any]:
    system = GrowingSystem()
    manager = system.manager
    counter = CopyCounter()
    times: dict[str, list[float]] = {
        op: [] for op in ("no_change", "add", "remove", "check_manifest", "torch_reload")
    }
    grafted_params = 0
    for round_ in range(rounds + 1):  # round 0 warms allocators and caches, not recorded
        samples = {"no_change": counter.timed_rebuild(manager)}
        samples["torch_reload"] = timed(lambda: torch_reload(manager))
        samples["check_manifest"] = timed(manager.check_manifest)
        system.graft()
        samples["add"] = counter.timed_rebuild(manager)
        grafted_params = system.seed.param_count()
        system.train_step()  # the graft now holds Adam state, so removal must drop it
        doomed = [p for p in system.seed.parameters() if p in manager.get_optimizer().state]
        if not doomed:
            raise RuntimeError("the grafted seed should hold optimizer state before its cull")
        system.cull()
        samples["remove"] = counter.timed_rebuild(manager)
        if any(p in manager.get_optimizer().state for p in doomed):
            raise RuntimeError("a culled seed's optimizer state survived the rebuild")
        if round_:
            for op, seconds in samples.items():
                times[op].append(seconds)

    medians = {op: median(values) * 1e3 for op, values in times.items()}
    result = {
        "params": system.host_params,
        "grafted_params": grafted_params,
        "state_tensors": len(_pointers(manager.get_optimizer())),
        "median_ms": medians,
        "manager_vs_torch_reload": medians["no_change"] / medians["torch_reload"],
        "state_copies": counter.copies,
        "state_tensors_checked": counter.checked,
    }
    for op, (budget, goal) in BUDGETS_MS.items():
        result[f"{op}_vs_budget"] = medians[op] / budget
        result[f"{op}_meets_goal"] = medians[op] <= goal
    return result


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=15, help="recorded rounds")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "setup": {
            "rounds": args.rounds,
            "optimizer": "Adam (moments populated)",
            "host": f"MLP {INPUTS}->{DEPTH}x width->{CLASSES}, 4 seeds on layer 0",
        },
        "budgets_ms": {op: {"design": b, "goal": g} for op, (b, g) in BUDGETS_MS.items()},
        **measure(args.rounds),
    }


def report(result: dict[str, Any]) -> None:
    m = result["median_ms"]
    print(
        f"{result['setup']['host']}: {result['params']:,} parameters, "
        f"{result['state_tensors']} Adam state tensors; "
        f"medians of {result['setup']['rounds']} rounds"
    )
    print(f"{'operation':<16} {'median ms':>10} {'budget ms':>10} {'goal ms':>8}  verdict")
    for op in ("no_change", "add", "remove"):
        budget, goal = BUDGETS_MS[op]
        verdict = "meets goal" if result[f"{op}_meets_goal"] else "MISSES goal"
        print(f"{op:<16} {m[op]:>10.3f} {budget:>10.0f} {goal:>8.0f}  {verdict}")
    print(f"{'check_manifest':<16} {m['check_manifest']:>10.3f}")
    print(
        f"{'torch_reload':<16} {m['torch_reload']:>10.3f}  (conventional rebuild; manager/this "
        f"= {result['manager_vs_torch_reload']:.2f})"
    )
    print(
        f"state tensors copied by rebuilds: {result['state_copies']} "
        f"of {result['state_tensors_checked']} checked"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main("optim_rebuild", __doc__.split("\n")[0], argv, configure, run, report)


if __name__ == "__main__":
    main()
