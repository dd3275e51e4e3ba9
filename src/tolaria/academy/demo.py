"""``tolaria academy demo``: the academy's day and night on a workload v0 never saw.

By day, ``--runs`` short runs grow a host on the synthetic ``rings`` family (held out of the
v0 campaign: ``benchmarks/bench_academy.py`` measures v0 on it) with the learned policy
exploring (``tamiyo.temperature`` above 0, so the replay holds real choices and their
propensities); every run appends to the demo academy's replay buffer.  By night, one
nightly session learns from them: the same :func:`~tolaria.academy.nightly.run_session` and
display as ``tolaria nightly``, ending with the gates' values and the deploy decision.

The academy is its own directory (``--dir``), never the one real runs record into; running
the demo again adds runs to it and holds the next session.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from tolaria.academy.campaign import GROWTH_SETTINGS, SYNTHETIC

#: The workload: a family and a host the v0 campaign never ran.
WORKLOAD = (SYNTHETIC, "data.kwargs={family: rings, size: 8}", "model.kwargs={hidden: [32, 32]}")
#: Daytime runs: short, exploring, on the CPU (the demo is the same on every machine).
DAYTIME = ("tamiyo.policy=learned", "tamiyo.temperature=0.02", "run.epochs=16",
           "run.device=cpu", "run.progress=false", "run.tensorboard=false")


def demo_config(directory: Path, seed: int = 0):
    """The config of the demo's daytime run ``seed`` (and of its nightly session)."""
    from tolaria.config import load_config

    return load_config(None, [
        *GROWTH_SETTINGS, *WORKLOAD, *DAYTIME, f"run.seed={seed}",
        f"run.name=rings-s{seed}", f"run.runs_root={directory / 'runs'}",
        f"data.cache_dir={directory / 'cache'}", f"academy.dir={directory}",
    ])


def run(args: argparse.Namespace, console: Console) -> int:
    import time

    from tolaria.academy.nightly import run_session
    from tolaria.academy.nightly_cli import EXIT_CODES, display, print_outcome
    from tolaria.build import build_trainer
    from tolaria.errors import ConfigError

    if args.runs < 0:
        raise ConfigError(f"--runs {args.runs}: the number of daytime runs is 0 or more")
    directory = Path(args.dir)
    runs = directory / "runs"
    done = len(list(runs.iterdir())) if runs.is_dir() else 0
    started = time.perf_counter()
    for seed in range(done, done + args.runs):
        config = demo_config(directory, seed)
        trainer = build_trainer(config, run_dir=runs / f"day-{seed:03d}")
        summary = trainer.train()
        console.print(
            f"daytime run {seed - done + 1}/{args.runs} (seed {seed}): test accuracy "
            f"{summary['test_accuracy']:.3f}, policy {trainer.tamiyo.policy.version} "
            f"({time.perf_counter() - started:.0f} s)", highlight=False)
    record = run_session(directory, demo_config(directory), listener=display(console))
    print_outcome(record, Console(soft_wrap=True))
    console.print(f"the demo took {time.perf_counter() - started:.0f} s; its academy: "
                  f"{directory} (tolaria academy status --academy {directory})", highlight=False)
    return EXIT_CODES[record["status"]]
