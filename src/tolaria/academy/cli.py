"""``tolaria academy ...``: look at the policy versions and move the champion by hand.

Import-light on purpose: ``tolaria.cli`` builds this parser for every command, so torch and
the registry are imported only by the handlers.  One more subcommand is a parser in
:func:`add_parser` and an entry in ``_HANDLERS``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

#: Where the academy lives when ``--academy`` is not given: where a run with the default
#: ``academy.dir`` records (``$TOLARIA_ACADEMY`` when set, else this).
DEFAULT_ACADEMY = Path("runs/academy")
#: Attempts ``status`` shows, newest first.
STATUS_ATTEMPTS = 10


def add_parser(subparsers: Any) -> None:
    academy = subparsers.add_parser(
        "academy",
        help="the learned controller's policy versions (status, promote, revert, demo)"
    )
    commands = academy.add_subparsers(dest="academy_command", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--academy", type=Path,
        help=f"the academy directory (default: $TOLARIA_ACADEMY, else {DEFAULT_ACADEMY})",
    )
    status = commands.add_parser(
        "status", parents=[where],
        help="versions, the champion, replay size, recent attempts, the monitor's metrics "
        "and alerts",
    )
    status.add_argument("--json", action="store_true",
                        help="the monitor's metrics, alerts, sessions and versions as one "
                        "JSON object, for scripts")
    promote = commands.add_parser("promote", parents=[where], help="make a version the champion")
    promote.add_argument("version", help="e.g. v3")
    promote.add_argument("--reason", default="promoted by hand", help="recorded with the move")
    revert = commands.add_parser(
        "revert", parents=[where], help="give the champion back to the one before it"
    )
    revert.add_argument("--reason", default="reverted by hand", help="recorded with the move")
    pretrain = commands.add_parser(
        "pretrain", parents=[where],
        help="rebuild base policy v0: the replay campaign, then the scorer trained on it",
    )
    pretrain.add_argument(
        "--out", type=Path,
        help="the version directory to write (default: ACADEMY/policies/v0, which then "
        "stands in for the built-in)",
    )
    pretrain.add_argument(
        "--size", choices=("full", "tiny"), default="full",
        help="full: the campaign v0 ships from (minutes); tiny: a smoke run (seconds)",
    )
    pretrain.add_argument(
        "--workdir", type=Path,
        help="keep the campaign's runs and replay buffer here (default: a temporary folder)",
    )
    demo = commands.add_parser(
        "demo", help="daytime runs on a workload v0 never saw, then one nightly session"
    )
    demo.add_argument("--dir", type=Path, default=Path("runs/academy-demo"),
                      help="the demo's own academy (default: runs/academy-demo; run again, "
                           "it adds runs and holds the next session)")
    demo.add_argument("--runs", type=int, default=6, help="daytime runs before the night")


def run(args: argparse.Namespace, console: Console) -> int:
    if args.academy_command == "demo":  # its own academy, in --dir
        from tolaria.academy import demo

        return demo.run(args, console)
    if args.academy is None:
        from tolaria.config import TolariaConfig  # the rule runs follow, so both agree

        args.academy = TolariaConfig().academy_dir()
    return _HANDLERS[args.academy_command](args, console)


def _pretrain(args: argparse.Namespace, console: Console) -> int:
    import tempfile

    from tolaria.academy.campaign import SIZES
    from tolaria.academy.pretrain import pretrain
    from tolaria.academy.registry import BUILTIN_V0, read_version
    from tolaria.errors import PolicyVersionError

    out = args.out or args.academy / "policies" / "v0"
    if out.exists():
        raise PolicyVersionError(f"{out}: already exists (a policy version is never rewritten)")
    size, started = SIZES[args.size], time.perf_counter()
    runs = size.tasks * size.seeds

    def on_run(task: str, seed: int, index: int) -> None:
        console.print(f"campaign run {index + 1}/{runs}: {task} seed {seed} "
                      f"({time.perf_counter() - started:.0f} s)", highlight=False)

    with tempfile.TemporaryDirectory() as scratch:
        card = pretrain(out, size, workdir=args.workdir or Path(scratch), on_run=on_run)
    trained = card["trained_on"]
    console.print(f"wrote {out}: {trained['examples']} decision points with outcomes "
                  f"({trained['grafts']} grafts), loss {card['loss']}", highlight=False)
    try:
        shipped = read_version(BUILTIN_V0, "v0").card.get("tensors_digest")
    except PolicyVersionError:
        shipped = None
    if shipped is not None and out.resolve() != BUILTIN_V0.resolve():
        same = "match" if shipped == card["tensors_digest"] else "differ from"
        console.print(f"its weights {same} the shipped v0's, bit for bit", highlight=False)
    return 0


def _status(args: argparse.Namespace, console: Console) -> int:
    """A report, so every part is shown as far as it reads: a broken version or replay
    buffer is a line in it, and the exit code stays 0."""
    from tolaria.academy.registry import PolicyRegistry
    from tolaria.monitor import report

    if args.json:
        print(report.status_json(args.academy))
        return 0
    out = Console(soft_wrap=True)  # the report goes to stdout, warnings to stderr
    if not args.academy.is_dir():
        out.print(f"{args.academy}: no academy directory yet (only the built-in v0)",
                  highlight=False)
    registry = PolicyRegistry(args.academy)
    for part in (*_versions(registry, console), *_replay(args.academy),
                 *report.status_parts(args.academy)):
        out.print(part, highlight=False)
    return 0


def _versions(registry: Any, console: Console) -> list[str | Table]:
    from tolaria.academy.registry import PolicyVersion
    from tolaria.errors import PolicyVersionError

    try:
        champion = registry.champion(
            warn=lambda line: console.print(f"[yellow]warning:[/] {line}", highlight=False)
        ).name
        headline = f"champion: {champion}"
    except PolicyVersionError as exc:
        champion, headline = None, f"champion: none ({exc})"
    survey = registry.survey()
    if not survey:
        return [headline, "no policy versions"]
    table = _table(f"policy versions in {registry.directory} (* champion)",
                   "version", "parent", "created", "trained on", "gates", flexible=2)
    for name, found in survey:
        label = f"{name} *" if name == champion else name
        parent = "built-in" if registry.path_of(name) == registry.builtin else "-"
        if isinstance(found, PolicyVersion):
            card = found.card
            table.add_row(
                label, card["parent"] or parent, str(card["created"])[:16].replace("T", " "),
                _brief(card["trained_on"]), _brief(card["gates"]),
            )
        else:
            table.add_row(label, parent, "", f"does not load: {found}", "")
    return [headline, table]


def _replay(academy: Path) -> list[str | Table]:
    from tolaria.academy.replay import REPLAY_FILE, ReplayBuffer
    from tolaria.errors import ReplayError

    path = academy / REPLAY_FILE
    if not path.exists():  # status only looks: it creates no buffer
        return [f"replay buffer: none yet ({path})"]
    try:
        with ReplayBuffer(path) as replay:
            sizes, attempts = replay.size_by_task(), replay.attempts(STATUS_ATTEMPTS)
    except ReplayError as exc:
        return [f"replay buffer: {exc}"]
    parts: list[str | Table] = []
    if sizes:
        table = _table(f"replay buffer {path}: {sum(sizes.values())} decision points",
                       "task", "decision points")
        for task, size in sizes.items():
            table.add_row(task, str(size))
        parts.append(table)
    else:
        parts.append(f"replay buffer {path}: no runs yet")
    if not attempts:
        return [*parts, "no attempts recorded yet"]
    from tolaria.academy.auto_revert import REASON_PREFIX

    table = _table("recent attempts, newest first",
                   "finished", "kind", "version", "from", "outcome", "detail")
    auto_reverts = []
    for attempt in attempts:
        finished = time.strftime("%Y-%m-%d %H:%M", time.localtime(attempt["finished"]))
        kind, cell = attempt["kind"], _brief(attempt["detail"])
        reason = attempt["detail"].get("reason") if isinstance(attempt["detail"], dict) else None
        if kind == "revert" and isinstance(reason, str) and reason.startswith(REASON_PREFIX):
            # A run reverted the champion it ran.  Its reason (run, epoch, decision point,
            # seed) is a sentence with a path in it: under the table, on a line of its own.
            rest = _brief({k: v for k, v in attempt["detail"].items() if k != "reason"})
            kind, cell = "auto-revert", "why: below" if rest == "-" else f"{rest}; why: below"
            auto_reverts.append(f"auto-revert {attempt['parent']} -> {attempt['version']} "
                                f"({finished}): {reason.removeprefix(REASON_PREFIX)}")
        table.add_row(finished, kind, attempt["version"], attempt["parent"] or "-",
                      attempt["outcome"], cell)
    return [*parts, table, *auto_reverts]


def _table(title: str, *columns: str, flexible: int = 1) -> Table:
    # The short columns keep their width; the last ``flexible`` ones wrap and fold, never
    # cut, so a reason or the gates stay readable in an 80-column CI log.
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for index, column in enumerate(columns):
        if index < len(columns) - flexible:
            table.add_column(column, no_wrap=True)
        else:
            table.add_column(column, overflow="fold", ratio=1)
    return table


def _promote(args: argparse.Namespace, console: Console) -> int:
    from tolaria.academy.registry import PolicyRegistry

    PolicyRegistry(args.academy).promote(args.version, reason=args.reason)
    console.print(f"champion: {args.version} ({args.reason})", highlight=False)
    return 0


def _revert(args: argparse.Namespace, console: Console) -> int:
    from tolaria.academy.registry import PolicyRegistry

    target = PolicyRegistry(args.academy).revert(
        reason=args.reason,
        warn=lambda line: console.print(f"[yellow]warning:[/] {line}", highlight=False),
    )
    console.print(f"champion: {target} (reverted: {args.reason})", highlight=False)
    return 0


def _brief(value: Any) -> str:
    """A card or attempt field in one short cell: text as is, a mapping as ``key=value``
    pairs (empty ones left out), anything else as compact JSON."""
    if isinstance(value, str):
        return value or "-"
    if isinstance(value, dict):
        pairs = [f"{key}={_brief(item)}" for key, item in value.items() if item not in ("", [], {})]
        return " ".join(pairs) or "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else json.dumps(value, separators=(",", ":"))


_HANDLERS = {"status": _status, "promote": _promote, "revert": _revert, "pretrain": _pretrain}
