"""``make bench``: every benchmark in turn, then ``BENCHMARKS.md`` from their results.

Each benchmark runs in its own process (``python -m benchmarks.bench_<name> --json``), so
one's memory and thread settings never leak into the next and the documented command
line is exercised; ``OMP_NUM_THREADS=1`` pins torch to one thread in every one of them.
A failing benchmark is reported and the rest still run; the exit status is then 1.
The run's own record (per-benchmark wall time, status, total) is written to
``benchmarks/results/run_all.json`` and ``BENCHMARKS.md`` is regenerated from all results
(``python -m benchmarks.report`` regenerates it without rerunning anything).

    python -m benchmarks.run_all                       # everything (< 20 min on 2 cores)
    python -m benchmarks.run_all --only growth         # one benchmark, report refreshed
    python -m benchmarks.run_all --quick               # tiny sizes: a smoke run in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine, now, read_result, write_result
from benchmarks.report import REPORT_PATH, write_report

REPO_ROOT = Path(__file__).resolve().parent.parent
#: In the order they run: the cheap micro-benchmarks first, the long growth study last.
BENCHMARKS = (
    "kasmina_overhead",
    "optim_rebuild",
    "checkpoint",
    "startup",
    "trainer_overhead",
    "epoch_boundary",
    "distributed",
    "growth",
    "academy",
    "dashboard",
)
#: Sizes for ``--quick``: each benchmark's full code path in a few seconds (numbers are
#: meaningless at these sizes; only the smoke tests use them).
QUICK_ARGS = {
    "kasmina_overhead": ["--samples", "256", "--rounds", "2"],
    "optim_rebuild": ["--rounds", "1"],
    "checkpoint": ["--rounds", "1"],
    "startup": ["--runs", "1", "--epochs", "1"],
    "trainer_overhead": ["--epochs", "3", "--hosts", "16"],
    "epoch_boundary": ["--epochs", "3", "--hosts", "16"],
    "distributed": ["--rounds", "1", "--epochs", "2", "--samples", "512", "--hidden", "16",
                    "--rewrap-rounds", "1"],
    "growth": ["--epochs", "2", "--seeds", "2", "--widths", "1.5", "--tasks", "mnist1d-hidden",
               "digits-cnn"],
    "academy": ["--epochs", "2", "--seeds", "1"],
    "dashboard": ["--runs", "3", "--events", "200", "--rounds", "2"],
}


def run_benchmark(name: str, args: list[str]) -> dict[str, Any]:
    """Run one benchmark module in a child process; its status, wall time and exit code."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-m", f"benchmarks.bench_{name}", "--json", *args]
    started = time.perf_counter()
    # stderr passes through, so warnings and tracebacks reach the terminal as they happen.
    process = subprocess.run(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
                             check=False)
    record: dict[str, Any] = {
        "command": " ".join(["python", *command[1:]]),
        "wall_time_s": time.perf_counter() - started,
        "returncode": process.returncode,
    }
    lines = process.stdout.strip().splitlines()
    try:
        json.loads(lines[-1])
        record["status"] = "ok" if process.returncode == 0 else "failed"
    except (IndexError, json.JSONDecodeError):
        record["status"] = "failed"
        record["error"] = "no JSON object on stdout"
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--report", type=Path, default=REPORT_PATH,
                        help="where to write the summary (default: %(default)s)")
    args = parser.parse_args(argv)
    names = BENCHMARKS if not args.only else tuple(args.only.split(","))
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")

    previous = read_result("run_all") or {}
    records: dict[str, Any] = dict(previous.get("benchmarks", {})) if args.only else {}
    started = time.perf_counter()
    for index, name in enumerate(names, 1):
        print(f"[{index}/{len(names)}] {name} ...", flush=True)
        record = run_benchmark(name, QUICK_ARGS[name] if args.quick else [])
        records[name] = record
        print(f"[{index}/{len(names)}] {name}: {record['status']} "
              f"in {record['wall_time_s']:.1f} s", flush=True)
    total = time.perf_counter() - started
    run_record = {
        "benchmark": "run_all",
        "machine": machine(),
        "finished": now(),
        "quick": args.quick,
        "subset": list(names) if args.only else None,
        "benchmarks": records,
        "total_s": total if not args.only else sum(r["wall_time_s"] for r in records.values()),
        "this_invocation_s": total,
    }
    write_result("run_all", run_record)
    write_report(args.report)
    failed = [name for name in names if records[name]["status"] != "ok"]
    print(f"all benchmarks: {total:.0f} s; {args.report} refreshed"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
