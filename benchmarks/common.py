"""What every benchmark shares: the machine record, interleaved A/B timing, result files.

The measurement discipline of ``benchmarks/`` (ARCHITECTURE §4):

* contenders run in one process, **interleaved** -- the order rotates every round -- so a
  drift in machine speed (these are 2 shared cores) hits every contender alike;
* a round's samples ran back to back, so the **median of per-round ratios** cancels slow
  drift better than the ratio of medians; both are reported;
* ``torch.set_num_threads(1)``: the models are tiny, one thread is fastest and least
  disturbed by other processes (the trainer's ``run.num_threads=1`` does the same);
* each module ``benchmarks/bench_<name>.py`` has ``main(argv) -> dict``; ``--json`` prints
  the result as one JSON object on stdout, and the result is written to
  ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tolaria.hardware import cpu_model_name

RESULTS_DIR = Path(__file__).parent / "results"
#: Environment variable that redirects result files (tests write to a temporary folder).
RESULTS_ENV = "TOLARIA_BENCH_RESULTS"
BENCH_THREADS = 1


def machine() -> dict[str, Any]:
    """The record every result carries: which CPU, how many cores, how busy it was."""
    return {
        "cpu": cpu_model_name(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        # Other processes on a 2-core machine distort timings: say how busy it was.
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def now() -> str:
    """UTC time to the second, ISO 8601: when a result was produced."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (``perf_counter``)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rotated(names: list[str], round_: int) -> list[str]:
    """``names`` rotated by ``round_``: each contender takes each position in turn."""
    shift = round_ % len(names)
    return names[shift:] + names[:shift]


def interleave(
    contenders: Mapping[str, Callable[[int], object]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each contender over ``rounds`` rotated rounds.

    ``contenders[name](round_)`` runs one unit of work (an epoch, a rebuild) for round
    ``round_``; ``warmup`` unrecorded rounds first pay for allocator growth and first-call
    binding.
    """
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + rounds):
        for name in rotated(names, round_):
            seconds = timed(functools.partial(contenders[name], round_))
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def median(values: Iterable[float]) -> float:
    return statistics.median(values)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of ``a[i] / b[i]`` -- each pair ran back to back."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (linear interpolation between order statistics)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def mlp_of_size(target_params: int, inputs: int, classes: int, depth: int) -> nn.Sequential:
    """A ReLU MLP of ``depth`` equal hidden layers with about ``target_params`` parameters.

    Solves ``(depth - 1) w^2 + (inputs + classes) w = target`` for the width ``w``
    (rounded to a multiple of 8)."""
    a, b = depth - 1, inputs + classes
    width = round((math.sqrt(b * b + 4 * a * target_params) - b) / (2 * a) / 8) * 8
    layers: list[nn.Module] = [nn.Linear(inputs, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def add_mlp_workloads(parser: argparse.ArgumentParser) -> None:
    """``--hosts 32,32;256,256``: the MLP hidden widths of each workload."""
    parser.add_argument(
        "--hosts", default="32,32;256,256",
        help="MLP hidden widths per workload, ';' between workloads (default: %(default)s)",
    )


def mlp_workloads(args: argparse.Namespace) -> list[list[int]]:
    return [[int(w) for w in spec.split(",")] for spec in args.hosts.split(";")]


def results_dir() -> Path:
    """Where results go: ``$TOLARIA_BENCH_RESULTS`` if set, else ``benchmarks/results``."""
    return Path(os.environ.get(RESULTS_ENV) or RESULTS_DIR)


def result_path(name: str) -> Path:
    return results_dir() / f"{name}.json"


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``result`` to ``<results_dir()>/<name>.json`` (pretty, stable key order)."""
    path = result_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def read_result(name: str) -> dict[str, Any] | None:
    path = result_path(name)
    return json.loads(path.read_text()) if path.exists() else None


def bench_main(
    name: str,
    description: str,
    argv: list[str] | None,
    configure: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], dict[str, Any]],
    report: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """The command line of a benchmark module: parse, pin threads, run, write, print.

    ``configure`` adds the module's own options, ``run`` returns the result body,
    ``report`` prints the human table.  The result gets ``benchmark``, ``machine`` and
    ``wall_time_s`` added and is written before anything is printed.
    """
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.bench_{name}",
                                     description=description)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    configure(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(BENCH_THREADS)
    started = time.perf_counter()
    body = run(args)
    result = {"benchmark": name, "machine": machine(), **body,
              "wall_time_s": time.perf_counter() - started, "finished": now()}
    write_result(name, result)
    if args.json:
        print(json.dumps(result))
    else:
        report(result)
    return result
