"""What do 2 processes buy over 1, and what does a re-wrap after a graft cost?

Epoch time: the trainer on the same job, alone (``python -m benchmarks.bench_distributed
--child``) and as 2 gloo ranks (the same under ``torch.distributed.run``), on the same
*global* batch, so both take the same optimizer steps on the same samples.  The host is a
wide MLP on in-memory blobs, large enough that the work (not the per-batch overheads)
dominates an epoch; growth is off (no decision changes the work between contenders).  The
two contenders alternate, the order rotating every round; each child times its epochs by
``perf_counter`` from epoch start to epoch end, the first epoch left out (warm-up), and the
result is the median over rounds and epochs.  Scaling efficiency is ``t1 / (2 * t2)``
(1.0: twice as fast).

Re-wrap: in the 2-rank child, a 10M-parameter MLP with seeds on its first layer is wrapped
in DDP; then each round a seed germinates a ``residual_mlp`` and enters TRAINING and the
wrapper is made again (``tolaria.distributed.Replica``: it drops the old reducer's hooks,
wraps, broadcasts rank 0's parameters and checks every trainable one is in the buckets),
then the seed is culled and it is made again.  Compared with the design's 20 ms budget for
a parameter addition (ARCHITECTURE §4).

On a 2-core machine two ranks share the two cores with the gloo threads and everything
else running: expect little speed-up.  ``python -m benchmarks.bench_distributed`` (``--json``
prints the result object); it writes ``benchmarks/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from benchmarks.common import bench_main, median, mlp_of_size, rotated
from tolaria.events import Callback

REPO_ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = {"1 process": None, "2 processes": 2}
#: The design's budget for adding parameters (ARCHITECTURE §4), milliseconds.
ADDITION_BUDGET_MS = 20.0
REWRAP_PARAMS, REWRAP_INPUTS, REWRAP_CLASSES, REWRAP_DEPTH = 10_000_000, 256, 10, 3


def blobs(n: int = 8192, features: int = 64, classes: int = 10):
    """``(train, test, classes)``: overlapping Gaussian blobs (``data.dataset``): the loss
    stays far from 0, so no tiny validation loss makes noise look like divergence."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, features, generator=g) * 0.2  # overlapping: no 0 loss
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(centers[y] + torch.randn(n, features, generator=g), y), None, classes


class EpochClock(Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_epoch_start(self, trainer, record) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, trainer, record) -> None:
        self.seconds.append(time.perf_counter() - self._started)


def job(args: argparse.Namespace) -> list[str]:
    hidden = ", ".join(args.hidden.split(","))
    return [
        f"run.epochs={args.epochs}", "run.device=cpu", "run.progress=false",
        "run.tensorboard=false", "run.csv=false", "academy.replay=false",
        "data.dataset=benchmarks.bench_distributed:blobs",
        f"data.kwargs={{n: {args.samples}}}", f"data.batch_size={args.batch_size}",
        f"model.kwargs={{hidden: [{hidden}]}}",
        "kasmina.layers=[hidden.0]", f"tamiyo.min_epochs_before_growth={args.epochs + 1}",
    ]


def child(args: argparse.Namespace) -> None:
    """One contender's process (or rank): train, time the epochs, rank 0 writes them."""
    from tolaria.build import build_trainer
    from tolaria.config import load_config

    torch.set_num_threads(1)
    clock = EpochClock()
    trainer = build_trainer(load_config(None, job(args)), callbacks=[clock])
    trainer.train()
    result: dict[str, Any] = {"epoch_s": clock.seconds[1:],
                              "batches": len(trainer.train_loader)}
    if trainer.group is not None:
        result["rewrap_ms"] = rewrap_ms(trainer.group, args.rewrap_rounds)
    if trainer.group is None or trainer.group.is_writer:
        Path(args.child).write_text(json.dumps(result))
    if trainer.group is not None:
        trainer.group.release(0)


def rewrap_ms(group: Any, rounds: int) -> dict[str, float]:
    from tolaria.config import KasminaConfig
    from tolaria.contracts import SeedState
    from tolaria.distributed import Replica
    from tolaria.kasmina import find_seeds, inject_seeds

    torch.manual_seed(0)
    model = mlp_of_size(REWRAP_PARAMS, REWRAP_INPUTS, REWRAP_CLASSES, REWRAP_DEPTH)
    inject_seeds(model, KasminaConfig(layers=["0"], chunks=4, embargo_epochs=0))
    model(torch.zeros(2, REWRAP_INPUTS))
    seed, replica = find_seeds(model)[0], Replica(group)
    replica(model)
    graft, cull = [], []
    for epoch in range(rounds):
        seed.germinate("residual_mlp", epoch=2 * epoch)
        seed.transition(SeedState.TRAINING, epoch=2 * epoch, reason="bench")
        started = time.perf_counter()
        replica(model)
        graft.append(time.perf_counter() - started)
        seed.transition(SeedState.CULLED, epoch=2 * epoch + 1, reason="bench")
        seed.on_epoch_end(2 * epoch + 1)  # embargo 0: DORMANT again
        started = time.perf_counter()
        replica(model)
        cull.append(time.perf_counter() - started)
    return {"graft": 1e3 * median(graft), "cull": 1e3 * median(cull),
            "params": sum(p.numel() for p in model.parameters())}


def launch(ranks: int | None, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        module = ["-m", "benchmarks.bench_distributed"] if ranks is None else [
            "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "--module", "benchmarks.bench_distributed"]
        command = [sys.executable, *module, "--child", str(out), *child_args(args)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(command, cwd=REPO_ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def child_args(args: argparse.Namespace) -> list[str]:
    return ["--epochs", str(args.epochs), "--samples", str(args.samples), "--batch-size",
            str(args.batch_size), "--hidden", args.hidden, "--rewrap-rounds",
            str(args.rewrap_rounds)]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=2, help="launches of each contender")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per launch (first: warm-up)")
    parser.add_argument("--samples", type=int, default=8192, help="blobs (80%% train)")
    parser.add_argument("--batch-size", type=int, default=256, help="the global batch")
    parser.add_argument("--hidden", default="512,512", help="the MLP's hidden widths")
    parser.add_argument("--rewrap-rounds", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> dict[str, Any]:
    samples: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    rewrap: list[dict[str, float]] = []
    batches: dict[str, int] = {}
    for round_ in range(args.rounds):
        for name in rotated(list(CONTENDERS), round_):
            result = launch(CONTENDERS[name], args)
            samples[name] += result["epoch_s"]
            batches[name] = result["batches"]
            rewrap += [result["rewrap_ms"]] if "rewrap_ms" in result else []
    epoch_s = {name: median(times) for name, times in samples.items()}
    one, two = epoch_s["1 process"], epoch_s["2 processes"]
    return {
        "setup": {"host": f"MLP {args.hidden} on {args.samples} blobs of 64 features",
                  "global_batch": args.batch_size, "epochs_timed": args.epochs - 1,
                  "rounds": args.rounds, "backend": "gloo", "batches_per_rank": batches},
        "epoch_s": epoch_s,
        "epoch_samples_s": samples,
        "speedup": one / two,
        "scaling_efficiency": one / (2 * two),
        "rewrap_ms": {"graft": median(r["graft"] for r in rewrap),
                      "cull": median(r["cull"] for r in rewrap),
                      "params": rewrap[0]["params"], "budget": ADDITION_BUDGET_MS},
    }


def report(result: dict[str, Any]) -> None:
    for name, seconds in result["epoch_s"].items():
        print(f"{name:12s} {seconds * 1e3:8.1f} ms per epoch")
    print(f"speed-up {result['speedup']:.2f}, scaling efficiency "
          f"{result['scaling_efficiency']:.0%}")
    r = result["rewrap_ms"]
    print(f"re-wrap of {r['params']:,} parameters after a graft {r['graft']:.1f} ms, after a "
          f"cull {r['cull']:.1f} ms (design budget for a parameter addition {r['budget']:.0f} ms)")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = sys.argv[1:] if argv is None else argv
    if "--child" in args:
        parser = argparse.ArgumentParser()
        configure(parser)
        child(parser.parse_args(args))
        return None
    return bench_main("distributed", __doc__.splitlines()[0], argv, configure, run, report)


if __name__ == "__main__":
    main()
