"""``tolaria train/resume --nproc N`` and the part each launched process plays.

``--nproc N`` runs the same command in N processes on this machine through torch's own
launcher (``torch.distributed.run``, what ``torchrun --standalone --nproc-per-node N -m
tolaria ...`` runs).  A process torchrun started is rank 0 -- the command as it is, the
only one with a run directory -- or another rank, which builds the same trainer without
one and follows rank 0 (``tolaria.distributed``).  When a rank fails, the launcher stops the
others and this prints one line naming it.

Torch-free at import, like ``tolaria.cli``: the launcher is imported when it runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape

from tolaria.config import config_for_resume, load_config
from tolaria.errors import ConfigError, DistributedError, TolariaError


def add_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--nproc", type=int, metavar="N",
        help="run in N processes on this machine through torchrun (gloo on CPU, NCCL with a "
             "GPU per process); data.batch_size is the global batch (docs/distributed.md)",
    )


def run(
    args: argparse.Namespace,
    argv: list[str],
    console: Console,
    command: Callable[[argparse.Namespace, Console], int],
) -> int:
    """``command(args, console)`` as this process's part of the run."""
    launched = "WORLD_SIZE" in os.environ
    if args.nproc is not None and not launched:
        _config(args)  # a config error is said once, here, rather than by every rank
        return launch(args.nproc, argv, console)
    if not launched:
        return command(args, console)
    from tolaria.distributed import RankGroup, environment_rank

    _stop_on_sigterm(environment_rank())
    try:
        if environment_rank() != 0:
            return follow(args, console)
        try:
            code = command(args, console)
        except TolariaError as exc:
            RankGroup.release(exc.exit_code)  # the others stop too, not at the timeout
            raise
        except RuntimeError as exc:
            raise rank_error(exc) from exc
        RankGroup.release(code)
        return code
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # what is left is saying why, and exit


def _stop_on_sigterm(rank: int) -> None:
    """When one rank fails the launcher stops the others with SIGTERM (and SIGKILL 30 s
    later): end as an error does, so rank 0 still marks its run directory failed -- or,
    when this rank is already failing (its peer went away), let it finish doing so."""

    def stop(signum, frame) -> None:
        if sys.exc_info()[0] is None:
            raise DistributedError(f"rank {rank}: stopped by the launcher: another rank failed")

    signal.signal(signal.SIGTERM, stop)


def rank_error(exc: RuntimeError) -> DistributedError:
    """One line for an error a rank met outside Tolaria's own collectives -- DDP's
    all-reduce in the backward pass most often, when another rank went away."""
    from torch.distributed import DistError

    from tolaria.distributed import environment_rank, one_line

    rank = environment_rank()
    message = f"rank {rank}: {type(exc).__name__}: {one_line(exc)}"
    if isinstance(exc, DistError) or any(word in str(exc) for word in _COMMUNICATION):
        others = ", ".join(str(r) for r in range(int(os.environ["WORLD_SIZE"])) if r != rank)
        message += (f" (rank(s) {others} stopped, or did not answer within "
                    "run.distributed_timeout_s)")
    return DistributedError(message)


#: Words of the errors torch's gloo and NCCL backends raise when a peer is lost.
_COMMUNICATION = ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out")


def follow(args: argparse.Namespace, console: Console) -> int:
    """A rank other than 0: the same trainer, no run directory, no display."""
    from tolaria.distributed import RankGroup, RankStopped, environment_rank

    try:
        _train_as_follower(args)
    except RankStopped as stop:  # rank 0 found nothing to do, or failed: it said why
        RankGroup.leave()
        return stop.exit_code
    except (TolariaError, RuntimeError) as exc:
        error = exc if isinstance(exc, TolariaError) else rank_error(exc)
        message = str(error) if str(error).startswith("rank ") else (
            f"rank {environment_rank()}: {error}")
        console.print(f"[bold red]tolaria: error:[/] {escape(message)}", highlight=False,
                      soft_wrap=True)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    RankGroup.release(0)  # the trainer is out of scope now: release can collect it
    return 0


def _train_as_follower(args: argparse.Namespace) -> None:
    from tolaria.build import build_trainer

    trainer = build_trainer(_config(args))
    if args.command == "resume":
        trainer.resume()
    trainer.train()


def _config(args: argparse.Namespace):
    """The config rank 0 runs, found the same way (the run directory read, not locked)."""
    if args.command == "train":
        return load_config(args.config, args.overrides)
    from tolaria.cli import _checkpointed_epochs
    from tolaria.rundir import RunDirectory

    run_dir, stored = RunDirectory.open_existing(args.run_dir, lock=False)
    return config_for_resume(stored, args.overrides, str(run_dir.path / "config.yaml"),
                             checkpointed_epochs=_checkpointed_epochs(run_dir))


def launch(nproc: int, argv: list[str], console: Console) -> int:
    """The command of ``argv`` (without ``--nproc``) in ``nproc`` processes; the exit code is
    the failed rank's (1 for a signal), 0 when every rank finished."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: must be at least 1")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    # Set, torchrun does not print its banner about it; each rank sets run.num_threads.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    command = _without_nproc(argv)
    launcher = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "tolaria", *command]
    )
    try:
        torchrun(launcher)
    except ChildFailedError as exc:
        # A rank killed by a signal (not the launcher's own SIGTERM) is the cause; one that
        # exited because its peer went away (code 1) is a consequence, however early.
        rank, failure = min(exc.failures.items(), key=lambda item: (
            item[1].exitcode >= 0 or -item[1].exitcode == signal.SIGTERM, item[1].timestamp))
        why = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        console.print(
            f"[bold red]tolaria: error:[/] rank {rank} (pid {failure.pid}) {why}; "
            f"the launcher stopped the other {nproc - 1} rank(s)",
            highlight=False, soft_wrap=True,
        )
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept

