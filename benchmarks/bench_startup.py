"""How long from the command to the first training batch of the default job?  Goal <= 3 s.

Whole-process figures: every run spawns a fresh ``python -m tolaria train`` (the default
job, nothing changed but a callback and its run directory) and measures, with the one wall
clock parent and child share:

- ``first_batch_s``: from just before the spawn to the end of the first training batch
  (its ``batch_end`` event, noted by ``benchmarks.startup_probe.FirstBatchClock``);
- ``first_batch_cpu_s``: the CPU time the child had used by then -- a busy machine
  stretches the wall figure, much less this one;
- ``process_s``: the whole run, spawn to exit;
- ``config_error_s``: ``tolaria train --set optimizer.lrr=0.1``, spawn to exit: a typo
  must be answered (exit code 2, one line) before torch is imported;
- ``floor_s`` and ``floor_cpu_s`` (the anchor): spawn to the end of ``import torch,
  torch._dynamo`` in a bare ``python -c`` (its own clock, as the probe's: a process that
  imported torch._dynamo takes a while more to exit), what any PyTorch training process
  pays before its first optimizer step (see below).

One unrecorded run first fills the MNIST-1D cache (a cold cache generates the data, which
takes longer and happens once per machine) and Python's bytecode cache: the children run
as an ordinary install does, with ``PYTHONDONTWRITEBYTECODE`` unset (with it set, every run
compiles Tolaria's modules again, ~0.2 s).  The two commands alternate, so drift in the
machine's speed hits all three alike; medians of ``--runs`` runs.

What is left is imports: torch itself, and ``torch._dynamo`` (with sympy and
``torch.distributed``), which ``torch.optim`` imports at the first call of any optimizer
method -- ``add_param_group`` and ``zero_grad`` are wrapped by ``torch._disable_dynamo``
and ``step`` by ``_use_grad_for_differentiable``, which import it unconditionally, even in
eager mode.  ``imported_at_first_batch`` lists which of the heavy optional modules had
been imported when the first batch ended.
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

from benchmarks.common import bench_main, median
from benchmarks.startup_probe import PROBE_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent
GOAL_S = 3.0
TRAIN = [sys.executable, "-m", "tolaria", "train"]
PROBE = 'run.callbacks=["benchmarks.startup_probe:FirstBatchClock"]'
TYPO = [*TRAIN, "--set", "optimizer.lrr=0.1"]
FLOOR = [sys.executable, "-c", "import torch, torch._dynamo, resource, time; "
         "u = resource.getrusage(resource.RUSAGE_SELF); "
         "print(time.time(), u.ru_utime + u.ru_stime)"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each command")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of the job (default: the default job's)")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, **extra}


def spawn(command: list[str], env: dict[str, str], expect: int = 0) -> tuple[float, float, str]:
    """(start time, seconds to exit, stderr) of one child, which must exit with ``expect``."""
    started = time.time()
    process = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             check=False)
    seconds = time.time() - started
    if process.returncode != expect:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{process.stderr}")
    return started, seconds, process.stderr


def train_once(folder: Path, index: int, extra: list[str]) -> dict[str, Any]:
    probe_file = folder / f"probe-{index}.json"
    env = child_env(**{PROBE_ENV: str(probe_file)})
    command = [*TRAIN, "--run-dir", str(folder / f"run-{index}"), "--set", PROBE, *extra]
    started, seconds, stderr = spawn(command, env)
    if not probe_file.exists():
        raise RuntimeError(f"{' '.join(command)} reached no training batch:\n{stderr}")
    probe = json.loads(probe_file.read_text())
    return {"first_batch_s": probe["first_batch_at"] - started,
            "first_batch_cpu_s": probe["cpu_s"], "process_s": seconds,
            "imported_at_first_batch": probe["imported"]}


def typo_once() -> float:
    _, seconds, stderr = spawn(TYPO, child_env(), expect=2)
    if "optimizer.lrr: unknown key" not in stderr:
        raise RuntimeError(f"{' '.join(TYPO)} did not answer with the unknown key:\n{stderr}")
    return seconds


def floor_once() -> tuple[float, float]:
    """Wall and CPU seconds a process takes to import what ``torch.optim`` needs."""
    started = time.time()
    done = subprocess.run(FLOOR, cwd=REPO_ROOT, env=child_env(), capture_output=True,
                          text=True, check=True)
    imported_at, cpu = map(float, done.stdout.split())
    return imported_at - started, cpu


def run(args: argparse.Namespace) -> dict[str, Any]:
    extra = [] if args.epochs is None else ["--set", f"run.epochs={args.epochs}"]
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        folder = Path(tmp)
        train_once(folder, -1, extra)  # warm-up: the MNIST-1D cache, the page cache
        runs, typos, floors = [], [], []
        for index in range(args.runs):
            runs.append(train_once(folder, index, extra))
            typos.append(typo_once())
            floors.append(floor_once())
    samples = {key: [r[key] for r in runs]
               for key in ("first_batch_s", "first_batch_cpu_s", "process_s")}
    samples["config_error_s"] = typos
    samples["floor_s"] = [wall for wall, _ in floors]
    samples["floor_cpu_s"] = [cpu for _, cpu in floors]
    return {
        "goal_s": GOAL_S,
        "runs": args.runs,
        "epochs": args.epochs,
        "command": " ".join(["python", *TRAIN[1:], "--set", PROBE, *extra]),
        "median_s": {key: median(values) for key, values in samples.items()},
        "samples_s": samples,
        "imported_at_first_batch": runs[-1]["imported_at_first_batch"],
    }


def report(result: dict[str, Any]) -> None:
    m = result["median_s"]
    print(f"start-up, medians of {result['runs']} runs (goal: first batch <= "
          f"{result['goal_s']:.0f} s)")
    print(f"  command -> first training batch   {m['first_batch_s']:.2f} s "
          f"({m['first_batch_cpu_s']:.2f} s of CPU)")
    print(f"  whole process                     {m['process_s']:.2f} s")
    print(f"  config typo answered in           {m['config_error_s']:.2f} s")
    print(f"  import torch, torch._dynamo        {m['floor_s']:.2f} s "
          f"({m['floor_cpu_s']:.2f} s of CPU): the floor")
    print(f"  imported by the first batch: {', '.join(result['imported_at_first_batch'])}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main("startup", __doc__.split("\n")[0], argv, configure, run, report)


if __name__ == "__main__":
    main()
