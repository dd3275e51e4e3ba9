"""What do dormant seeds cost?  A training epoch of a host with and without Kasmina.

Copies of one MLP host (same weights, same batches, Adam) train side by side:

- ``plain``: the host as written;
- ``dormant``: seeds injected on every hidden block, all DORMANT, the default
  ``KasminaConfig`` (telemetry on, sampling every ``telemetry_interval``-th batch),
  telemetry flushed at the end of every epoch;
- ``dormant_every_batch``: the same with ``telemetry_interval = 1``;
- ``dormant_quiet``: the same with ``telemetry = False`` (the cost of the hooks alone).

Epochs are interleaved by ``benchmarks.common.interleave``; we report each variant's
median epoch time, its ratio to ``plain``'s (target for ``dormant``: <= 1.02) and the
median of the per-round ratios.  ``python -m benchmarks.bench_kasmina_overhead [--json]``
writes ``benchmarks/results/kasmina_overhead.json``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.common import bench_main, interleave, median, paired_ratio
from tolaria.config import KasminaConfig
from tolaria.kasmina import KasminaLayer, inject_seeds

TARGET = 1.02

#: variant -> KasminaConfig overrides (None: no seeds at all)
VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "dormant": {},
    "dormant_every_batch": {"telemetry_interval": 1},
    "dormant_quiet": {"telemetry": False},
}


class MLP(nn.Module):
    """``[Linear -> ReLU] x depth -> Linear``, blocks named ``hidden.<i>`` like the built-ins."""

    def __init__(self, inputs: int, width: int, depth: int, classes: int) -> None:
        super().__init__()
        widths = [inputs] + [width] * depth
        self.hidden = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in itertools.pairwise(widths)
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.hidden:
            x = block(x)
        return self.head(x)


def make_epoch(
    model: nn.Module, layers: list[KasminaLayer], x: torch.Tensor, y: torch.Tensor, batch: int
) -> Callable[[int], None]:
    """One epoch of Adam on ``(x, y)``; loss summed on the device, read once, then telemetry."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def epoch(index: int) -> None:
        model.train()
        total = torch.zeros(())
        for start in range(0, len(x), batch):
            xb, yb = x[start : start + batch], y[start : start + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        total.item()
        for layer in layers:
            layer.flush_telemetry(index)

    return epoch


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    x, y = torch.randn(args.samples, 40), torch.randint(0, 10, (args.samples,))
    host = MLP(40, args.width, args.depth, 10)
    contenders = {}
    for name, overrides in VARIANTS.items():
        model = copy.deepcopy(host)
        layers = []
        if overrides is not None:
            config = KasminaConfig(layers=["hidden.*"], chunks=args.chunks, **overrides)
            layers = inject_seeds(model, config)
        contenders[name] = make_epoch(model, layers, x, y, args.batch)
    times = interleave(contenders, rounds=args.rounds, warmup=1)
    medians = {name: median(t) for name, t in times.items()}
    return {
        "setup": {
            "host": f"MLP 40-{'-'.join([str(args.width)] * args.depth)}-10",
            "samples": args.samples,
            "batch": args.batch,
            "chunks_per_layer": args.chunks,
            "dormant_seeds": args.chunks * args.depth,
            "rounds": args.rounds,
            "default_telemetry_interval": KasminaConfig().telemetry_interval,
        },
        "median_epoch_s": medians,
        "ratio_vs_plain": {name: medians[name] / medians["plain"] for name in medians},
        "median_paired_ratio_vs_plain": {
            name: paired_ratio(t, times["plain"]) for name, t in times.items()
        },
        "target_ratio_dormant": TARGET,
    }


def report(result: dict[str, Any]) -> None:
    setup, m = result["setup"], result["machine"]
    print(
        f"{setup['host']}, {setup['dormant_seeds']} dormant seeds, batch {setup['batch']}; "
        f"{m['cpu']}, {m['torch_threads']} thread(s), load {m['load_average_1min']}"
    )
    print(f"{'variant':<20} {'median epoch (ms)':>18} {'ratio':>7} {'paired ratio':>13}")
    for name, seconds in result["median_epoch_s"].items():
        ratio = result["ratio_vs_plain"][name]
        paired = result["median_paired_ratio_vs_plain"][name]
        print(f"{name:<20} {seconds * 1e3:>18.2f} {ratio:>7.3f} {paired:>13.3f}")
    print(f"target for dormant: <= {result['target_ratio_dormant']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main("kasmina_overhead", __doc__.split("\n")[0], argv, configure, run, report)


if __name__ == "__main__":
    main()
