"""What does TolariaTrainer cost over a hand-written PyTorch loop when nothing adapts?

Four contenders train the same host from the same initial weights (same ``run.seed``),
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
  sums read once;
- ``lightning``: the same host, loss, Adam and validation sums in a ``LightningModule``
  trained by PyTorch Lightning's ``Trainer`` (``LightningLoop``), as context for what a
  general-purpose trainer costs; skipped, with a note, where Lightning is not installed
  (``make bench`` installs it: ``pip install -e '.[bench]'``).

Epochs are interleaved (the order rotates each epoch); we report each contender's median
epoch time, the ratio of medians and the median of per-epoch ratios against
``hand_written`` (goal <= 1.02, for ``tolaria``), and whether the final host weights are
bitwise identical (Tolaria's must be: a dormant seed passes its chunk through untouched).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from types import ModuleType
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
    timed,
)
from tolaria.build import build_trainer, seed_everything
from tolaria.config import TolariaConfig, load_config
from tolaria.data import DataBundle, load_data, make_loaders
from tolaria.hosts import build_host, count_parameters
from tolaria.kasmina import find_seeds

GOAL_RATIO = 1.02
#: ``fit`` calls with no epoch left that time ``LightningLoop``'s fixed cost per call.
FIT_CALLS = 20


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


def import_lightning() -> ModuleType | None:
    """The ``lightning`` package, or None (with a note on stderr) where it is not installed."""
    try:
        import lightning
    except ImportError:
        # stderr: with --json, stdout carries the result object alone.
        print("trainer_overhead: lightning is not installed; skipping the `lightning` "
              "contender (pip install -e '.[bench]')", file=sys.stderr)
        return None
    return lightning


def lightning_module(lightning: ModuleType, host: nn.Module, lr: float) -> Any:
    """``host`` in a ``LightningModule`` doing the hand-written loop's work, step for step."""

    class HostModule(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.host = host
            self.loss_fn = nn.CrossEntropyLoss()
            # Built once and handed to every ``fit`` call, so Adam's moments carry over from
            # one call to the next as they would in a single long ``fit``.
            self.optimizer = torch.optim.Adam(host.parameters(), lr=lr)
            self.val_loss, self.val_accuracy = math.nan, math.nan

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return self.optimizer

        def on_train_epoch_start(self) -> None:
            # Summed on the device and read once, as the hand-written loop does: same work.
            self.loss_sum = torch.zeros(())

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            x, y = batch
            loss = self.loss_fn(self.host(x), y)
            self.loss_sum += loss.detach()
            return loss

        def on_train_epoch_end(self) -> None:
            self.loss_sum.item()

        def on_validation_epoch_start(self) -> None:
            self.totals, self.count = torch.zeros(2), 0

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
            x, y = batch
            logits = self.host(x)
            self.totals[0] += self.loss_fn(logits, y) * y.numel()
            self.totals[1] += (logits.argmax(dim=1) == y).sum()
            self.count += y.numel()

        def on_validation_epoch_end(self) -> None:
            self.val_loss, self.val_accuracy = (self.totals / self.count).tolist()

    return HostModule()


class LightningLoop:
    """The hand-written loop's epoch run by a PyTorch Lightning ``Trainer``, one per call.

    A ``Trainer`` owns its epoch loop, while ``interleave`` needs one epoch per call.  Each
    call therefore raises ``fit_loop.max_epochs`` to ``epoch + 1`` and calls ``fit`` again
    on the same Trainer, module and loaders: the fit loop keeps its epoch count between
    calls, so exactly one more epoch trains and validates.  Nothing is rebuilt, but every
    call still pays ``fit``'s fixed setup and teardown (strategy and loop setup, dataloader
    checks, fit hooks).  ``fit_call_seconds`` times a ``fit`` with no epoch left, a lower
    bound on that cost (it stops before the train-start hooks and the validation loader).
    The alternative -- one long ``fit`` paused at each epoch start by a callback and resumed
    from the timing thread -- was measured against this refit, the two interleaved with the
    hand-written loop (2-core AMD EPYC, 31 epochs, 4 runs): the refit was 0.8-2.5 ms slower
    per epoch of 53-97 ms, 0.01-0.06 of the paired ratio, where a ``fit`` with no epoch left
    took 1.1-1.6 ms.  The refit stays: public API only, no thread, and the lower bound on its
    fixed cost is reported beside it.

    The Trainer has logger, checkpointing, progress bar, model summary and sanity-check
    validation off, on the CPU with one device (``barebones=True``, Lightning's own
    raw-speed mode, measured no faster).  ``deterministic`` stays unset: ``True`` would
    switch ``torch.use_deterministic_algorithms`` on for the whole process, under the other
    contenders too, and the CPU kernels here are deterministic anyway (the bitwise
    comparison shows whether the weights agree).  Validation sums loss and hits on the
    device and reads them once, like the hand-written loop; no ``self.log``, which would
    add Lightning's metric bookkeeping to every step.
    """

    def __init__(self, config: TolariaConfig, data: DataBundle, lightning: ModuleType) -> None:
        seed_everything(config.run.seed)  # the init HandWrittenLoop gives its host
        self.model = build_host(config.model, data.input_shape, data.num_classes)
        self.loaders = make_loaders(data, config.data, config.run.seed)
        self.module = lightning_module(lightning, self.model, config.optimizer.lr)
        # Every ``fit`` logs "`Trainer.fit` stopped: `max_epochs=N` reached." at INFO: a
        # line per epoch in the output, written inside the timed call.
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        self.trainer = lightning.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )

    def fit(self) -> None:
        self.trainer.fit(self.module, train_dataloaders=self.loaders.train,
                         val_dataloaders=self.loaders.val)

    def epoch(self, epoch: int) -> None:
        # Lightning calls ``set_epoch`` on a loader's sampler, but ours sits inside the
        # BatchSampler the loader takes as its sampler, out of Lightning's reach.
        self.loaders.train_sampler.set_epoch(epoch)
        self.trainer.fit_loop.max_epochs = epoch + 1
        self.fit()

    def fit_call_seconds(self, calls: int = FIT_CALLS) -> float:
        """Median seconds of a ``fit`` with no epoch left: what each ``epoch`` pays on top."""
        return median(timed(self.fit) for _ in range(calls))


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


def measure(hidden: list[int], epochs: int, lightning: ModuleType | None) -> dict[str, Any]:
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
    lightning_loop = None if lightning is None else LightningLoop(config, data, lightning)
    if lightning_loop is not None:
        contenders["lightning"] = lightning_loop.epoch
    # Epoch 0 is the warm-up round; every contender still trains it.
    times = interleave(contenders, rounds=epochs - 1, warmup=1)
    base = times["hand_written"]
    models = {name: trainer.model for name, trainer in trainers.items()}
    accuracies = {name: trainer.last_record["val_accuracy"] for name, trainer in trainers.items()}
    if lightning_loop is not None:
        models["lightning"] = lightning_loop.model
        accuracies["lightning"] = lightning_loop.module.val_accuracy
    result = {
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
            name: identical_host_weights(loop.model, model) for name, model in models.items()
        },
        "final_val_accuracy": accuracies | {"hand_written": loop.validate()[1]},
    }
    if lightning_loop is not None:
        result["lightning_fit_call_ms"] = lightning_loop.fit_call_seconds() * 1e3
    return result


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=31, help="epochs (the first is warm-up)")
    add_mlp_workloads(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    lightning = import_lightning()
    return {
        "goal_ratio": GOAL_RATIO,
        "lightning_version": None if lightning is None else lightning.__version__,
        "workloads": [measure(hidden, args.epochs, lightning) for hidden in mlp_workloads(args)],
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
    for w in result["workloads"]:
        if "lightning_fit_call_ms" in w:
            print(f"{w['host']}: lightning {result['lightning_version']} runs one `fit` per "
                  f"epoch; a `fit` with no epoch left takes {w['lightning_fit_call_ms']:.2f} ms")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main("trainer_overhead", __doc__.split("\n")[0], argv, configure, run, report)


if __name__ == "__main__":
    main()
