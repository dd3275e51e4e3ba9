"""What does TolariaTrainer cost over a hand-written PyTorch loop when nothing adapts?

Three contenders train the same host from the same initial weights (same ``run.seed``),
on the same batches in the same order (the same ``make_loaders``), with the same Adam,
one full epoch at a time -- training loop, then validation:

- ``tolaria``: ``build_trainer`` on the default job (MNIST-1D, a seed injected on the
  flattened input, DORMANT, telemetry on, a real ``TamiyoController`` whose
  ``min_epochs_before_growth`` lies beyond the run so it never adapts); no run directory,
  so no disk checkpoints -- but the in-memory snapshot of every epoch end, the packet,
  ``tamiyo.step`` and the manifest check all count;
- ``tolaria_no_seeds``: the same with ``kasmina.layers = []`` (trainer cost alone);
- ``hand_written``: the loop a researcher writes by hand -- zero_grad, forward, loss,
  backward, step, loss summed on the device; validation under ``inference_mode`` with
  sums read once.

Epochs are interleaved (the order rotates each epoch); we report each contender's median
epoch time, the ratio of medians and the median of per-epoch ratios against
``hand_written`` (goal <= 1.02), and whether the final host weights are bitwise identical
(they must be: a dormant seed passes its chunk through untouched).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    add_mlp_workloads,
    bench_main,
    interleave,
    median,
    mlp_workloads,
    paired_ratio,
)
from tolaria.build import build_trainer, seed_everything
from tolaria.config import TolariaConfig, load_config
from tolaria.data import DataBundle, load_data, make_loaders
from tolaria.hosts import build_host, count_parameters
from tolaria.kasmina import find_seeds

GOAL_RATIO = 1.02


class HandWrittenLoop:
    """The plain PyTorch epoch the trainer must not be slower than."""

    def __init__(self, config: TolariaConfig, data: DataBundle) -> None:
        seed_everything(config.run.seed)  # the init build_trainer gives its host
        self.model = build_host(config.model, data.input_shape, data.num_classes)
        self.loaders = make_loaders(data, config.data, config.run.seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.optimizer.lr)
        self.loss_fn = nn.CrossEntropyLoss()

    def epoch(self, epoch: int) -> tuple[float, float]:
        self.model.train()
        self.loaders.train_sampler.set_epoch(epoch)
        loss_sum = torch.zeros(())
        for x, y in self.loaders.train:
            loss = self.loss_fn(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach()
        loss_sum.item()
        return self.validate()

    @torch.inference_mode()
    def validate(self) -> tuple[float, float]:
        self.model.eval()
        totals, count = torch.zeros(2), 0
        for x, y in self.loaders.val:
            logits = self.model(x)
            totals[0] += self.loss_fn(logits, y) * y.numel()
            totals[1] += (logits.argmax(dim=1) == y).sum()
            count += y.numel()
        loss, accuracy = (totals / count).tolist()
        return loss, accuracy


def overhead_config(hidden: list[int], epochs: int) -> TolariaConfig:
    """The default job, sized by ``hidden``, with a controller that never adapts."""
    return load_config(overrides=[
        f"model.kwargs.hidden={hidden}",
        f"run.epochs={epochs}",
        "run.device=cpu",
        "run.progress=false",
        "run.tensorboard=false",
        f"tamiyo.min_epochs_before_growth={epochs + 1}",
    ])


def identical_host_weights(reference: nn.Module, candidate: nn.Module) -> bool:
    """Every tensor of ``reference`` equals, bit for bit, the same-named one of ``candidate``."""
    theirs = candidate.state_dict()
    return all(
        name in theirs and torch.equal(tensor, theirs[name])
        for name, tensor in reference.state_dict().items()
    )


def measure(hidden: list[int], epochs: int) -> dict[str, Any]:
    config = overhead_config(hidden, epochs)
    data = load_data(config.data, config.run.seed)
    no_seeds = config.model_copy(deep=True)
    no_seeds.kasmina.layers = []
    trainers = {
        "tolaria": build_trainer(config, data=data),
        "tolaria_no_seeds": build_trainer(no_seeds, data=data),
    }
    loop = HandWrittenLoop(config, data)
    contenders = {name: trainer.run_epoch for name, trainer in trainers.items()}
    contenders["hand_written"] = loop.epoch
    # Epoch 0 is the warm-up round; every contender still trains it.
    times = interleave(contenders, rounds=epochs - 1, warmup=1)
    base = times["hand_written"]
    return {
        "host": f"mlp hidden {hidden}",
        "params": count_parameters(loop.model),
        "seeds": len(trainers["tolaria"].tamiyo.seed_states),
        # Must be 0: the comparison is only fair while nothing adapts.
        "seed_transitions": sum(len(s.history) for s in find_seeds(trainers["tolaria"].model)),
        "batches_per_epoch": len(loop.loaders.train),
        "val_batches_per_epoch": len(loop.loaders.val),
        "epochs_timed": len(base),
        "median_epoch_ms": {name: median(t) * 1e3 for name, t in times.items()},
        "ratio_vs_hand_written": {
            name: median(t) / median(base) for name, t in times.items() if t is not base
        },
        "median_paired_ratio_vs_hand_written": {
            name: paired_ratio(t, base) for name, t in times.items() if t is not base
        },
        "bitwise_identical_weights": {
            name: identical_host_weights(loop.model, trainer.model)
            for name, trainer in trainers.items()
        },
        "final_val_accuracy": {
            name: trainer.last_record["val_accuracy"] for name, trainer in trainers.items()
        } | {"hand_written": loop.validate()[1]},
    }


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=31, help="epochs (the first is warm-up)")
    add_mlp_workloads(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "goal_ratio": GOAL_RATIO,
        "workloads": [measure(hidden, args.epochs) for hidden in mlp_workloads(args)],
    }


def report(result: dict[str, Any]) -> None:
    print(f"Trainer overhead vs a hand-written loop (goal: ratio <= {GOAL_RATIO}); "
          f"{result['machine']['cpu']}, {result['machine']['torch_threads']} thread")
    print(f"{'workload':<22} {'contender':<18} {'median epoch ms':>16} {'ratio':>7} "
          f"{'paired':>7}  bitwise")
    for w in result["workloads"]:
        for name, ms in w["median_epoch_ms"].items():
            ratio = w["ratio_vs_hand_written"].get(name)
            paired = w["median_paired_ratio_vs_hand_written"].get(name)
            same = w["bitwise_identical_weights"].get(name)
            print(f"{w['host']:<22} {name:<18} {ms:>16.2f} "
                  f"{'' if ratio is None else f'{ratio:.3f}':>7} "
                  f"{'' if paired is None else f'{paired:.3f}':>7}  "
                  f"{'' if same is None else same}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main("trainer_overhead", __doc__.split("\n")[0], argv, configure, run, report)


if __name__ == "__main__":
    main()
