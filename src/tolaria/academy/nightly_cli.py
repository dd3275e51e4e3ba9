"""``tolaria nightly``: one nightly session on an academy, for a scheduler to call.

Import-light: ``tolaria.cli`` builds this parser for every command; the session (torch and
the registry with it) is imported only when it runs.  Progress goes to stderr -- a line per
step in a pipe or a CI log, a spinner on the running step in a terminal --; the gates against
their thresholds and the decision go to stdout.

Exit codes: 0 the session ended as it should (``deployed``, ``rejected`` -- a gate failed and
the champion stays --, or ``skipped``: nothing to learn); 1 it failed (a sandbox crash, a
timeout, the memory cap, an error on the way; the champion stays); 2 a usage error (a bad
config or override, another session running on the academy).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

#: The session's status → the command's exit code.
EXIT_CODES = {"deployed": 0, "rejected": 0, "skipped": 0, "failed": 1}


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "nightly", help="train, gate and deploy (or keep) the next policy version"
    )
    parser.add_argument(
        "--academy", type=Path,
        help="the academy directory (default: the config's academy.dir, $TOLARIA_ACADEMY, "
             "else runs/academy)",
    )
    parser.add_argument("--config", type=Path,
                        help="YAML config whose academy.nightly section is used "
                             "(default: built-in)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set academy.nightly.steps=100 (repeatable)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from tolaria.config import load_config

    config = load_config(args.config, args.overrides)
    from tolaria.academy.nightly import run_session  # torch, once the config is valid

    academy = args.academy or config.academy_dir()
    record = run_session(academy, config, listener=display(console))
    print_outcome(record, Console(soft_wrap=True))
    return EXIT_CODES[record["status"]]


def display(console: Console) -> Any:
    """Plain step lines, or a spinner on the running step in an interactive terminal."""
    from tolaria.academy.nightly import SessionListener

    class Lines(SessionListener):
        def note(self, text: str) -> None:
            console.print(text, highlight=False, soft_wrap=True)

        def on_cleaned(self, record: dict) -> None:
            self.note(f"cleaned up after session {record['session']}: {record['status']} "
                      f"({record['cause']}, during {record.get('killed_during') or 'its end'})")

        def on_start(self, record: dict) -> None:
            self.note(f"nightly session {record['session']}: champion {record['champion']}")

        def on_step_start(self, record: dict, step: dict) -> None:
            if not record["steps"][:-1]:  # the first step: the data was just chosen
                replay = record["replay"]
                self.note(f"replay: {replay['recent_points']} recent decision points to learn "
                          f"from, {replay['held_out_points']} held out, "
                          f"{replay['history_points']} history ({replay['runs']} recent runs)")
            self.note(f"{step['name']} ...")

        def on_step_end(self, record: dict, step: dict) -> None:
            self.note(f"{step['name']}: {step['status']}{_step_facts(step)}")

        def on_registered(self, record: dict, version: str) -> None:
            self.note(f"registered {version}")

    class Spinner(Lines):
        def __init__(self) -> None:
            self.status = None

        def on_step_start(self, record: dict, step: dict) -> None:
            super().on_step_start(record, step)
            self.status = console.status(f"[bold]{step['name']}[/] ...")
            self.status.start()

        def on_step_end(self, record: dict, step: dict) -> None:
            if self.status is not None:
                self.status.stop()
            super().on_step_end(record, step)

    return Spinner() if console.is_interactive else Lines()


def _step_facts(step: dict) -> str:
    detail = step["detail"]
    facts = []
    if "cause" in detail:
        facts.append(detail["cause"])
    if "snapshots" in detail:
        facts.append(f"{len(detail['snapshots'])} snapshot(s)")
        facts += [f"skipped {s['task']}: {s['why']}" for s in detail["skipped"]]
    if "wall_s" in detail:
        facts.append(f"{detail['wall_s']:.1f} s")
    if "loss_first" in detail and "loss_last" in detail:
        facts.append(f"loss {detail['loss_first']:.4g} -> {detail['loss_last']:.4g}")
    if "registered" in detail:
        facts.append(f"{detail['registered']}" + (" promoted" if detail["promoted"] else ""))
    return f" ({', '.join(facts)})" if facts else ""


def print_outcome(record: dict, out: Console) -> None:
    """The gates against their thresholds, then the decision in one line."""
    if record["gates"]:
        table = Table(title=f"gates of {record['candidate'] or 'the candidate'}",
                      title_justify="left")
        for column in ("gate", "value", "threshold", "passed"):
            table.add_column(column, justify="left" if column == "gate" else "right")
        for name, gate in record["gates"].items():
            table.add_row(name, f"{gate['value']:.4f}", f"> {gate['threshold']:g}",
                          "yes" if gate["passed"] else "[bold red]no[/]")
        out.print(table)
        if record["validation_divergence"] is not None:
            out.print(f"validation divergence (candidate vs champion): "
                      f"{record['validation_divergence']:.4f}", highlight=False)
    out.print(decision(record), highlight=False)


def decision(record: dict) -> str:
    status, champion, candidate = record["status"], record["champion"], record["candidate"]
    if status == "deployed":
        return f"deployed: {candidate} is the champion (was {champion})"
    if status == "rejected":
        return (f"rejected: {candidate} failed gate {record['failed_gate']}; "
                f"{champion} stays champion")
    if status == "skipped":
        return f"skipped: {record['cause']}; {champion} stays champion"
    kept = f" ({candidate} registered, never promoted)" if candidate else ""
    return f"failed: {record['cause']}; {champion} stays champion{kept}"
