"""The `tolaria` command: parse, build, call.  Errors print one line; the traceback only with
`--debug`.

Nothing here imports torch at module level: a config is validated (and a typo answered) in
a fraction of a second, before the run's heavy imports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from tolaria import __version__
from tolaria.config import RESUMABLE_FIELDS, changed_fields, config_for_resume, load_config
from tolaria.errors import TolariaError

if TYPE_CHECKING:
    from tolaria.rundir import RunDirectory

#: Set to 1 for ``--debug``: the traceback behind an error, for whoever debugs Tolaria.
DEBUG_VARIABLE = "TOLARIA_DEBUG"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tolaria", description="Train neural networks that grow while they train."
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback behind an error (or set {DEBUG_VARIABLE}=1)",
    )
    parser.add_argument("--version", action="version", version=f"tolaria {__version__}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def overrides(command: argparse.ArgumentParser, help: str) -> None:
        command.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
        )

    def config_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--config", type=Path, help="YAML config (default: built-in)")
        overrides(command, "override a config field, e.g. --set run.epochs=5 (repeatable)")

    train = commands.add_parser("train", help="train a model from a config")
    config_options(train)
    train.add_argument(
        "--run-dir", type=Path, help="where to write the run (default: runs/NAME-TIME)"
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --run-dir (refused while another process runs it)",
    )

    resume = commands.add_parser("resume", help="continue a killed run from its last checkpoint")
    resume.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="the run directory a `tolaria train` wrote")
    overrides(
        resume,
        f"change a field that keeps the resume exact: {', '.join(sorted(RESUMABLE_FIELDS))} "
        "(repeatable; written to RUN_DIR/config.yaml)",
    )

    from tolaria import distributed_cli  # torch-free; it imports the launcher when it runs

    for command in (train, resume):
        command.add_argument(
            "--quiet", action="store_true",
            help="print only errors and, when the run ends, the path of its summary.json",
        )
        distributed_cli.add_arguments(command)

    plot = commands.add_parser("plot", help="draw a run's learning curves and growth events")
    plot.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory to draw")
    plot.add_argument("--out", type=Path, help="image file (default: RUN_DIR/curves.png)")

    from tolaria import export_cli  # torch-free; it imports the exporter when it runs

    export_cli.add_parser(commands)

    show = commands.add_parser(
        "config", help="print the resolved config as YAML, each field under its comment"
    )
    config_options(show)
    show.add_argument("--no-comments", action="store_true",
                      help="plain YAML, without the fields' comments")

    from tolaria.academy import cli as academy_cli  # import-light: handlers import the rest

    academy_cli.add_parser(commands)
    from tolaria import evaluate_cli  # its own module; it imports torch only when it runs

    evaluate_cli.add_parser(commands)
    from tolaria.dashboard import cli as dashboard_cli  # import-light: uvicorn only when it runs

    dashboard_cli.add_parser(commands)
    from tolaria.academy import nightly_cli  # import-light: the session imports torch

    nightly_cli.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)  # messages stay one line in logs
    try:
        if getattr(args, "handler", None) is not None:  # commands living in their own module
            return args.handler(args, console)
        if args.command == "config":
            config = load_config(args.config, args.overrides)
            if args.no_comments:
                print(config.to_yaml(), end="")
            else:
                from tolaria.config_comments import commented_yaml

                print(commented_yaml(config), end="")
            return 0
        if args.command in ("train", "resume"):  # --nproc N, or one rank of several
            from tolaria import distributed_cli

            return distributed_cli.run(args, argv, console,
                                       _train if args.command == "train" else _resume)
        if args.command == "plot":
            return _plot(args, console)
        from tolaria.academy import cli as academy_cli  # the one command left

        return academy_cli.run(args, console)
    except TolariaError as exc:
        if args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            traceback.print_exception(exc)
        console.print(f"[bold red]tolaria: error:[/] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted(console)


def _train(args: argparse.Namespace, console: Console) -> int:
    config = load_config(args.config, args.overrides)
    # Heavy imports (torch with them) only once the config is valid.
    from tolaria.build import build_trainer
    from tolaria.rundir import RunDirectory

    info = _informational(console, args.quiet)
    path = args.run_dir or RunDirectory.default_path(config)
    if args.overwrite and path.is_dir():
        # Locked first, replaced last: a run in progress is refused, and a mistake in the
        # new config (found while building) leaves the old run as it was.
        run_dir = RunDirectory.claim(path)
        try:
            trainer = build_trainer(config, run_dir=run_dir, callbacks=_progress(config, info))
            run_dir.replace(config)
        except BaseException:
            run_dir.close()
            raise
    else:
        RunDirectory.check_free(path)  # fail before minutes of data generation, not after
        trainer = build_trainer(config, run_dir=path, callbacks=_progress(config, info))
    try:
        info.print(f"run directory: [bold]{path}[/]")
        summary = trainer.train()
    except KeyboardInterrupt:
        return _interrupted(console, path)
    _print_summary(summary, path, args.quiet)
    return 0


def _resume(args: argparse.Namespace, console: Console) -> int:
    from tolaria.build import build_trainer
    from tolaria.rundir import RunDirectory

    run_dir, stored = RunDirectory.open_existing(args.run_dir, lock=False)
    info = _informational(console, args.quiet)
    config = config_for_resume(
        stored,
        args.overrides,
        str(run_dir.path / "config.yaml"),
        checkpointed_epochs=_checkpointed_epochs(run_dir),
    )
    # Asked before locking: a finished run is left untouched, unless it is asked for more.
    more = (config.run.epochs > stored.run.epochs
            or config.run.early_stopping != stored.run.early_stopping)
    if _completed(run_dir.path, console) and not more:
        info.print(f"{run_dir.path} already completed (to go on: resume --set run.epochs=N, "
                      "or a looser run.early_stopping)")
        return 0
    run_dir.take()  # held until the run ends
    try:
        trainer = build_trainer(config, run_dir=run_dir, callbacks=_progress(config, info))
        epoch = trainer.resume(
            on_skip=lambda path, reason: console.print(
                f"[yellow]skipping checkpoint {path}: {reason}"
            )
        )
        changed = changed_fields(stored, config)
        if changed:  # only now: a refused resume leaves the config it ran with
            run_dir.write_config(config)
            info.print(f"{run_dir.path / 'config.yaml'}: changed {', '.join(changed)}")
        if epoch == 0:
            info.print(
                f"no checkpoint in {run_dir.path} yet: starting it over from epoch 0 "
                "(same config and seed, same run)"
            )
        else:
            info.print(f"resuming [bold]{run_dir.path}[/] at epoch {epoch}")
        summary = trainer.train()
    except KeyboardInterrupt:
        return _interrupted(console, run_dir.path)
    finally:
        run_dir.close()  # train() releases it too; this is for a failure before it
    _print_summary(summary, run_dir.path, args.quiet)
    return 0


def _interrupted(console: Console, run_path: Path | None = None) -> int:
    """Ctrl-C: where there is a run directory, the trainer has marked it interrupted and kept
    its last finished epoch; say how to go on."""
    hint = f"; continue with `tolaria resume {run_path}`" if run_path is not None else ""
    console.print(f"interrupted{hint}", highlight=False)
    return 130


def _checkpointed_epochs(run_dir: RunDirectory) -> int:
    """Epochs the newest durable checkpoint holds, by its name (0: none yet)."""
    from tolaria.checkpoint import CheckpointStore, checkpoint_epoch

    newest = CheckpointStore(run_dir.checkpoint_dir, keep=1).checkpoints()[-1:]
    return checkpoint_epoch(newest[0]) + 1 if newest else 0


def _completed(run_dir: Path, console: Console) -> bool:
    summary_file = Path(run_dir) / "summary.json"
    if not summary_file.exists():
        return False
    try:
        summary = json.loads(summary_file.read_bytes())
        problem = None if isinstance(summary, dict) else "not a JSON object"
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        problem = f"not JSON ({exc})"
    if problem is not None:
        # Written atomically at the very end: a summary that does not read never completed.
        console.print(
            f"{summary_file}: {problem}; the run did not complete, so it is resumed",
            highlight=False,
        )
        return False
    return summary.get("status") == "completed"


def _plot(args: argparse.Namespace, console: Console) -> int:
    from tolaria.plots import plot_run
    from tolaria.rundir import RunDirectory

    run_dir, _ = RunDirectory.open_existing(args.run_dir, lock=False)  # only reads
    console.print(f"wrote {plot_run(run_dir, args.out)}")
    return 0


def _informational(console: Console, quiet: bool) -> Console:
    """Where the lines that only inform go: nowhere with ``--quiet`` (errors and warnings
    keep ``console``)."""
    return Console(stderr=True, quiet=True) if quiet else console


def _progress(config, console: Console) -> list:
    from tolaria.progress import make_display  # rich.progress: only for a run

    return make_display(console, progress=config.run.progress)


def _print_summary(summary: dict, path: Path, quiet: bool) -> None:
    # The result goes to stdout, progress to stderr; --quiet leaves only where it lies.
    if quiet:
        print(path / "summary.json", flush=True)
        return
    from rich.table import Table

    from tolaria.summary import plain_value

    table = Table(title=f"Tolaria run summary ({path})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, plain_value(value))
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
