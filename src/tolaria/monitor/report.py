"""The monitor's part of ``tolaria academy status``: the §7 metrics table and the alerts as
text, or the whole monitor as one JSON object (``--json``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.table import Table

from tolaria.academy.cli import _table
from tolaria.errors import ReplayError
from tolaria.monitor.academy import METRICS, NO_SESSION, TrainingMonitor, format_value

_UNITS = {metric.name: metric.unit for metric in METRICS}


def status_parts(academy_dir: Path, now: float | None = None) -> list[str | Table]:
    """What ``academy status`` prints after the versions and the replay buffer.  A replay
    buffer that cannot be read is one line (``status`` shows what it can and exits 0)."""
    monitor = TrainingMonitor(academy_dir)
    try:
        rows, alerts = monitor.metrics_table(), monitor.alerts(now)
    except ReplayError as exc:
        return [f"training monitor: {exc}"]
    parts: list[str | Table] = []
    # Before the first session the line says it once, not every row's window column.
    windows = not all(row.window == NO_SESSION for row in rows)
    if not windows:
        parts.append(f"training monitor: {NO_SESSION}")
    table = _table("training monitor (design §7; docs/monitor.md)",
                   "metric", "value", "target", "alert", "state", *["window"] * windows)
    for row in rows:
        state = f"[bold red]{row.state}[/]" if row.state == "alert" else row.state
        table.add_row(row.label, row.shown, row.target, row.alert, state,
                      *[row.window] * windows)
    parts.append(table)
    if not alerts:
        return [*parts, "no alerts"]
    table = _table("alerts, newest first", "time", "metric", "value", "threshold", "message")
    for alert in alerts:
        unit = _UNITS.get(alert.metric)
        value, threshold = (
            (f"{alert.value:g}", f"{alert.threshold:g}") if unit is None  # an event: a count
            else (format_value(alert.value, unit), format_value(alert.threshold, unit))
        )
        table.add_row(time.strftime("%Y-%m-%d %H:%M", time.localtime(alert.time)),
                      alert.metric, value, threshold, alert.message)
    return [*parts, table]


def status_json(academy_dir: Path, now: float | None = None) -> str:
    """The monitor's report (metrics, alerts, sessions, versions, replay by task) as JSON.
    Unlike the text, an unreadable replay buffer is an error here: a script must not take
    "no data" for a fact."""
    return json.dumps(TrainingMonitor(academy_dir).report(now), indent=1, allow_nan=False)
