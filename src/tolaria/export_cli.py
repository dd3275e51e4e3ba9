"""``tolaria export RUN_DIR``: a run's model, grafts folded, in files that run without Tolaria.

This module is the command and its vocabulary (the formats, what to do with seeds on
trial); it imports torch only when the command runs, so ``tolaria --help`` and every other
command stay as fast as they were.  The work is ``tolaria.export.export_model``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

FORMATS = ("exported-program", "state-dict")
#: Seeds still on trial at the checkpoint: left out, or kept at their current alpha.
TRIALS = ("drop", "keep")
CHECKPOINTS = ("best", "last")
#: Where exports go by default: ``RUN_DIR/export/best.pt2``, ``RUN_DIR/export/best/``.
EXPORT_DIR = "export"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    command = subparsers.add_parser(
        "export", help="write a run's model, grafts folded, so that it runs without Tolaria"
    )
    command.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                         help="the run directory whose model to export")
    command.add_argument(
        "--format",
        choices=FORMATS,
        default=FORMATS[0],
        help="a torch.export program (.pt2), or model.safetensors + a torch-only model.py "
        "(default: %(default)s)",
    )
    command.add_argument(
        "--checkpoint",
        choices=CHECKPOINTS,
        default="best",
        help="the best validated model or the last checkpoint (default: %(default)s)",
    )
    command.add_argument(
        "--trials",
        choices=TRIALS,
        default="drop",
        help="seeds still on trial: leave them out, or keep them at their current alpha "
        "(default: %(default)s)",
    )
    command.add_argument(
        "--out",
        type=Path,
        help=f"file (exported-program) or folder (state-dict); default: "
        f"RUN_DIR/{EXPORT_DIR}/CHECKPOINT.pt2 or RUN_DIR/{EXPORT_DIR}/CHECKPOINT/",
    )
    command.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from tolaria.rundir import RunDirectory

    run_dir, config = RunDirectory.open_existing(args.run_dir, lock=False)  # only reads

    from torch.utils.data import default_collate

    from tolaria.data import load_data
    from tolaria.export import export_model
    from tolaria.inference import load_model

    model = load_model(run_dir.path, which=args.checkpoint, trials=args.trials, map_location="cpu")
    # Two training samples: the shape and dtype the model was trained on.
    data = load_data(config.data, config.run.seed)
    example = default_collate([data.train[i] for i in range(min(2, len(data.train)))])[0]
    out = args.out or default_out(run_dir.path, args.checkpoint, args.format)
    written = export_model(model, example, out, args.format, trials=args.trials)
    console.print(f"wrote {written}", highlight=False)
    return 0


def default_out(run_dir: Path, checkpoint: str, format: str) -> Path:
    name = f"{checkpoint}.pt2" if format == "exported-program" else checkpoint
    return Path(run_dir) / EXPORT_DIR / name
