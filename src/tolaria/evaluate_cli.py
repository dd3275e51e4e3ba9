"""``tolaria evaluate RUN_DIR``: a run's best or last model, measured again on its own split.

The model comes out of the checkpoint by :func:`tolaria.inference.load_model`'s path; the
data is loaded per the run's ``config.yaml`` (the validation split is carved by its
``run.seed``, as in the run), and the metrics come from the trainer's own evaluation: the
numbers match the run's ``summary.json`` (test) and ``metrics.jsonl`` (validation).  Seeds
on trial are kept by default, as the run measured them.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "evaluate", help="measure a run's best or last model on its test or validation split"
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="the run directory whose model to measure")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="the dataset's test split, or the validation split the run used")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="the best checkpoint (by checkpoint.monitor) or the newest one")
    parser.add_argument("--trials", choices=("keep", "drop"), default="keep",
                        help="seeds still on trial: kept at their alpha (as the run measured "
                             "them) or dropped")
    parser.add_argument("--device", help="evaluate on this device (default: the run's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Any) -> int:
    from tolaria import records
    from tolaria.build import build_trainer
    from tolaria.errors import ConfigError
    from tolaria.inference import evaluate_model, host_of, open_checkpoint, restore_model
    from tolaria.rundir import RunDirectory

    run_dir, config = RunDirectory.open_existing(args.run_dir, lock=False)  # only reads
    checkpoint, snapshot = open_checkpoint(
        run_dir.path, args.checkpoint,
        on_skip=lambda path, reason: console.print(f"[yellow]skipping checkpoint {path}: {reason}"),
    )
    model = restore_model(host_of(snapshot, checkpoint), snapshot["model"], args.trials)
    config.run.callbacks = []  # nothing is trained: the run's own callbacks have no events
    if args.device:
        config.run.device = args.device
    trainer = build_trainer(config)  # the run's data and evaluation, no run directory
    loader = trainer.loaders.test if args.split == "test" else trainer.val_loader
    if loader is None:
        raise ConfigError(f"data.dataset={config.data.dataset!r} has no test split")
    recorded = snapshot["fingerprint"].get("data content")
    if trainer.components["fingerprint"].values["data content"] != recorded:
        console.print(f"[yellow]warning: data.dataset={config.data.dataset!r} now gives other "
                      "data than the run trained on: these numbers will not match its own")
    metrics = evaluate_model(trainer, model.to(trainer.device), loader)
    result = {
        "run": str(run_dir.path),
        "checkpoint": f"{checkpoint.parent.name}/{checkpoint.name}",
        "epoch": snapshot.epoch,
        "split": args.split,
        "samples": len(loader.dataset),
        "trials": args.trials,
        **_flat(dataclasses.asdict(metrics)),
    }
    if args.json:
        print(records.encode(result))
    else:
        _print_table(result)
    return 0


def _flat(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Loss, accuracy and any named metrics side by side."""
    flat: dict[str, Any] = {}
    for name, value in metrics.items():
        flat.update(value if isinstance(value, Mapping) else {name: value})
    return flat


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Tolaria evaluation ({result['run']})")
    table.add_column("")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if key != "run":
            table.add_row(key, f"{value:.6f}" if isinstance(value, float) else str(value))
    Console().print(table)  # the result goes to stdout, messages to stderr
