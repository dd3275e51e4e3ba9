"""What do dormant seeds cost?  A training epoch of a host with and without Kasmina.

Three copies of one MLP host (same weights, same batches) train side by side:

- ``plain``: the host as written;
- ``dormant``: seeds injected on every hidden block, all DORMANT, the default
  ``KasminaConfig`` (telemetry on, sampling every ``telemetry_interval``-th batch),
  telemetry flushed at the end of every epoch;
- ``dormant_every_batch``: the same with ``telemetry_interval = 1``;
- ``dormant_quiet``: the same with ``telemetry = False`` (the cost of the hooks alone).

Epochs are interleaved (the order rotates each round) so drift in machine speed hits
every variant alike; we report the median epoch time of each, its ratio to ``plain``'s
(target for ``dormant``: <= 1.02) and the median of the per-round ratios.

Run ``python -m benchmarks.bench_kasmina_overhead`` (``--json`` prints the result as one
JSON object); it also writes ``benchmarks/results/kasmina_overhead.json``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tolaria.config import KasminaConfig
from tolaria.kasmina import find_seeds, inject_seeds

RESULT = Path(__file__).parent / "results" / "kasmina_overhead.json"


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
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, epoch_end: Callable[[], None]
) -> Callable[[], None]:
    """One epoch of Adam on ``(x, y)``; the loss is summed on the device and read once."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def epoch() -> None:
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
        epoch_end()

    return epoch


def run(*, samples: int, batch: int, width: int, depth: int, chunks: int, rounds: int) -> dict:
    torch.manual_seed(0)
    x, y = torch.randn(samples, 40), torch.randint(0, 10, (samples,))
    host = MLP(40, width, depth, 10)
    variants: dict[str, Callable[[], None]] = {}
    epoch_counter = iter(range(10**9))
    configs = {
        "plain": None,
        "dormant": {},
        "dormant_every_batch": {"telemetry_interval": 1},
        "dormant_quiet": {"telemetry": False},
    }
    for name, overrides in configs.items():
        model = copy.deepcopy(host)
        flush: Callable[[], None] = lambda: None  # noqa: E731
        if overrides is not None:
            config = KasminaConfig(layers=["hidden.*"], chunks=chunks, **overrides)
            layers = inject_seeds(model, config)

            def flush(layers=layers) -> None:
                epoch = next(epoch_counter)
                for layer in layers:
                    layer.flush_telemetry(epoch)

        variants[name] = make_epoch(model, x, y, batch, flush)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for name in names:  # warm-up: allocator, first-forward binding, kernel selection
        variants[name]()
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    # Each round's epochs ran back to back: their ratio cancels slow drift in machine load.
    paired = {
        name: statistics.median(a / b for a, b in zip(t, times["plain"], strict=True))
        for name, t in times.items()
    }
    return {
        "benchmark": "kasmina_overhead",
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "setup": {
            "host": f"MLP 40-{'-'.join([str(width)] * depth)}-10",
            "samples": samples,
            "batch": batch,
            "chunks_per_layer": chunks,
            "seeds": chunks * depth,
            "rounds": rounds,
            "seed_states": sorted({s.state.value for s in find_seeds(model)}),
            "default_telemetry_interval": KasminaConfig().telemetry_interval,
        },
        "median_epoch_s": medians,
        "ratio_vs_plain": {name: medians[name] / medians["plain"] for name in medians},
        "median_paired_ratio_vs_plain": paired,
        "target_ratio_dormant": 1.02,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(
        samples=args.samples,
        batch=args.batch,
        width=args.width,
        depth=args.depth,
        chunks=args.chunks,
        rounds=args.rounds,
    )
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['setup']['host']}, {result['setup']['seeds']} dormant seeds, "
            f"batch {args.batch}, {result['machine']}"
        )
        print(f"{'variant':<20} {'median epoch (ms)':>18} {'ratio':>7} {'paired ratio':>13}")
        for name, median in result["median_epoch_s"].items():
            ratio = result["ratio_vs_plain"][name]
            pair = result["median_paired_ratio_vs_plain"][name]
            print(f"{name:<20} {median * 1e3:>18.2f} {ratio:>7.3f} {pair:>13.3f}")
    return result


if __name__ == "__main__":
    main()
