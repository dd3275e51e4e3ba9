"""The dashboard's HTML: pages from the templates in ``templates/``, and their live sections.

Each page is rendered whole on the server.  A page that follows something live also has
named *sections* (``data-section`` in its template): the same functions render them again
for the page's poll, and ``static/dashboard.js`` swaps them in, so the first view and every
update come from one renderer.  Every value is escaped here; the templates hold no logic.
"""

from __future__ import annotations

import functools
import html
import json
import math
import time
from collections.abc import Iterable, Mapping
from importlib import resources
from string import Template
from typing import Any

from tolaria.monitor.alerts import Alert
from tolaria.monitor.runs import RunView

#: Rows of the decision log a page shows (the newest; the JSON endpoint has them all).
DECISION_ROWS = 200
#: The lifecycle's states, in order: the seed timeline's colours and its legend.
SEED_STATES = ("dormant", "germinated", "training", "blending", "probationary", "fossilized",
               "culled")


@functools.cache
def _template(name: str) -> Template:
    return Template((resources.files(__package__) / "templates" / name).read_text())


def page(title: str, kind: str, body: str, *, where: str = "", live: str = "",
         cursor: str = "", scripts: Iterable[str] = ()) -> str:
    """A whole page: ``body`` in the frame (``live``: the URL its sections are polled from)."""
    tags = "\n".join(f'<script src="{html.escape(src)}"></script>' for src in scripts)
    return _template("base.html").substitute(
        title=_esc(title), page=kind, body=body, where=_esc(where), live=_esc(live),
        cursor=_esc(cursor), scripts=tags)


# -- runs index ------------------------------------------------------------------------------


def index_body(root: str, views: list[RunView], now: float) -> str:
    return _template("index.html").substitute(root=_esc(root), **index_sections(views, now))


def index_sections(views: list[RunView], now: float) -> dict[str, str]:
    if not views:
        return {"runs": '<p class="empty">No runs yet: <code>tolaria train</code> writes one '
                        "here.</p>"}
    head = ("run", "status", "epoch", "best val", "parameters", "seeds", "rollbacks",
            "policy", "last heartbeat")
    rows = []
    for view in views:
        s = view.summary(now)
        cells = [
            f'<a href="/runs/{_esc(s["id"])}">{_esc(s["id"])}</a>',
            _status(s["status"]),
            f'{s["epochs_done"]} / {_int(s["epochs"])}',
            _num(s["best_val_score"]),
            _params(s),
            _counts(s["seeds"]),
            _int(s["rollbacks"]),
            _esc(s["policy"]),
            _heartbeat(s, now),
        ]
        fields = ("id", "status", "epoch", "best", "params", "seeds", "rollbacks", "policy",
                  "heartbeat")
        rows.append(f'<tr data-run="{_esc(s["id"])}">' + "".join(
            f'<td data-field="{f}">{c}</td>' for f, c in zip(fields, cells, strict=True))
            + "</tr>")
    return {"runs": _table(head, rows, "runs")}


# -- one run ---------------------------------------------------------------------------------


def run_body(view: RunView, now: float) -> str:
    data = json.dumps(run_charts(view)).replace("<", "\\u003c")  # never closes the script
    return _template("run.html").substitute(run_id=_esc(view.run_id), data=data,
                                            **run_sections(view, now))


def run_sections(view: RunView, now: float) -> dict[str, str]:
    return {
        "summary": _run_summary(view.summary(now), now),
        "alerts": alerts_html(view.alerts(now)),
        "seeds": _seed_timeline(view),
        "decisions": _decision_log(view),
        "events": _rollbacks_and_incidents(view),
    }


def run_charts(view: RunView) -> dict[str, Any]:
    """What ``dashboard.js`` draws: the curves, and where rollbacks and incidents were."""
    return {
        "curves": view.curves(),
        "rollbacks": [{"epoch": r["epoch"], "text": f"rollback: {r['reason']}"}
                      for r in view.rollbacks()],
        "incidents": [{"epoch": i["epoch"], "text": f"{i['emergency']}: {i['reason']}"}
                      for i in view.incidents()],
        "monitor": view.monitor,
    }


def _run_summary(s: Mapping[str, Any], now: float) -> str:
    items = [
        ("status", "status", _status(s["status"]) + (f' <span class="note">({_esc(s["phase"])})'
                                                     "</span>" if s["status"] == "running"
                                                     else "")),
        ("epoch", "epoch", f'{s["epochs_done"]} / {_int(s["epochs"])}'),
        ("best", f"best val {s['monitor']}", _num(s["best_val_score"])),
        ("params", "parameters", _params(s)),
        ("seeds", "seeds", _counts(s["seeds"])),
        ("rollbacks", "rollbacks", _int(s["rollbacks"])),
        ("incidents", "incidents", _int(s["incidents"])),
        ("policy", "policy", _esc(s["policy"])),
        ("heartbeat", "last heartbeat", _heartbeat(s, now)),
    ]
    if s.get("error"):
        items.append(("error", "error", _esc(s["error"])))
    return '<dl class="summary">' + "".join(
        f'<div><dt>{_esc(label)}</dt><dd data-field="{key}">{value}</dd></div>'
        for key, label, value in items) + "</dl>"


def _seed_timeline(view: RunView) -> str:
    rows = view.seed_segments()
    if not rows:
        return '<p class="empty">No seeds yet.</p>'
    total = max([view.total_epochs() or 0,
                 *(seg["end"] + 1 for row in rows for seg in row["segments"])])
    lines = []
    for row in rows:
        segments = []
        for seg in row["segments"]:
            left, width = 100 * seg["start"] / total, 100 * (seg["end"] - seg["start"] + 1) / total
            span = (f"epoch {seg['start']}" if seg["start"] == seg["end"]
                    else f"epochs {seg['start']}–{seg['end']}")
            blueprint = seg["blueprint"] or ""
            title = f"{seg['state']}, {span}" + (f", {blueprint}" if blueprint else "")
            state = _esc(seg["state"])
            segments.append(
                f'<span class="segment state-{state}" data-state="{state}"'
                f' data-start="{seg["start"]}" data-end="{seg["end"]}"'
                f' style="left:{left:.3f}%;width:{width:.3f}%" title="{_esc(title)}">'
                f"{_esc(blueprint)}</span>")
        lines.append(f'<div class="seed-row" data-seed="{_esc(row["seed"])}">'
                     f'<span class="seed-id">{_esc(row["seed"])}</span>'
                     f'<div class="track">{"".join(segments)}</div></div>')
    legend = "".join(f'<span class="segment-key state-{s}">{s}</span>' for s in SEED_STATES)
    return (f'<div class="timeline">{"".join(lines)}</div>'
            f'<p class="legend">epochs 0–{total - 1} · {legend}</p>')


def _decision_log(view: RunView) -> str:
    decisions = view.decisions(DECISION_ROWS)
    if not decisions:
        return '<p class="empty">No decisions yet.</p>'
    live = view.state() == "running"
    rows = []
    for d in reversed(decisions):  # newest first: a live run's latest decision on top
        epoch = f"{d['epoch']}" + (f" (attempt {d['attempt']})" if d["attempt"] > 1 else "")
        cls = ' class="undone" title="undone by a rollback"' if d["undone"] else ""
        rows.append(
            f'<tr data-decision="{_esc(d["decision_id"])}"{cls}><td>{epoch}</td>'
            f'<td>{_esc(d["seed_id"])}</td><td data-field="action">{_esc(d["action"])}</td>'
            f'<td>{_esc(d["blueprint"] or "")}</td><td>{_esc(d["reason"])}</td>'
            f'<td data-field="outcome">{_outcome(d, live)}</td></tr>')
    shown = len(decisions)
    note = (f'<p class="note">The newest {shown} of {view.decision_count} decisions.</p>'
            if shown < view.decision_count else "")
    head = ("epoch", "seed", "decision", "blueprint", "reason", "outcome")
    return note + _table(head, rows, "decisions")


def _outcome(decision: Mapping[str, Any], live: bool) -> str:
    if decision["undone"]:
        return "undone by a rollback"
    outcome = decision["outcome"]
    if outcome is None:
        return f'<span class="note">{"pending" if live else "none: the run ended first"}</span>'
    text = (f"{_signed(outcome['delta_validation_accuracy'])} val score, "
            f"{_signed(outcome['delta_validation_loss'])} val loss "
            f"after {outcome['epochs_later']} epochs")
    if outcome.get("incident"):
        text += f"; closed by incident {outcome['incident']}"
    return _esc(text)


def _rollbacks_and_incidents(view: RunView) -> str:
    items = ([(r["time"] or 0, r["epoch"], "rollback",
               f"restored the end of epoch {r['restored_epoch']}: {r['reason']}")
              for r in view.rollbacks()]
             + [(i["time"] or 0, i["epoch"], f"incident ({i['emergency']})",
                 f"{i['key']}: {i['reason']} (seen {i['count']}×)") for i in view.incidents()])
    if not items:
        return '<p class="empty">None.</p>'
    rows = [f'<tr data-kind="{_esc(kind.split()[0])}"><td>{epoch}</td><td>{_esc(kind)}</td>'
            f"<td>{_esc(text)}</td><td>{_when(t)}</td></tr>"
            for t, epoch, kind, text in sorted(items, key=lambda item: item[0])]
    return _table(("epoch", "what", "detail", "time"), rows, "events")


def alerts_html(alerts: list[Alert]) -> str:
    if not alerts:
        return '<p class="ok">No alerts.</p>'
    rows = [f'<tr data-metric="{_esc(a.metric)}"><td>{_when(a.time)}</td><td>{_esc(a.metric)}</td>'
            f"<td>{_num(a.value)}</td><td>{_num(a.threshold)}</td><td>{_esc(a.message)}</td></tr>"
            for a in alerts]
    return '<div class="alerts">' + _table(("time", "metric", "value", "threshold", "alert"),
                                           rows, "alerts") + "</div>"


# -- the academy -----------------------------------------------------------------------------


def academy_body(academy_dir: str, monitor: Any, now: float) -> str:
    """The academy page from a :class:`~tolaria.monitor.academy.TrainingMonitor`."""
    versions = [
        f'<tr data-version="{_esc(v.name)}"{" class=champion" if v.champion else ""}>'
        f'<td>{_esc(v.name)}{" <strong>champion</strong>" if v.champion else ""}</td>'
        f"<td>{_esc(v.parent or '')}</td><td>{_esc(v.created or '')}</td>"
        f"<td>{_gates(v.gates)}</td><td>{_esc(v.problem or '')}</td></tr>"
        for v in monitor.versions()]
    sessions = [
        f'<tr data-session="{_esc(s.session)}"><td>{_esc(s.session)}</td>'
        f"<td>{_status(s.outcome)}</td><td>{_esc(s.version or '')}</td>"
        f"<td>{_esc(s.parent or '')}</td><td>{_gates(s.gates)}</td>"
        f"<td>{_esc(s.cause or '')}</td><td>{_when(s.finished)}</td></tr>"
        for s in monitor.sessions()]
    metrics = [
        f'<tr data-metric="{_esc(m.name)}"><td>{_esc(m.label)}</td>'
        f'<td data-field="value">{_esc(m.shown)}</td><td>{_esc(m.target)}</td>'
        f"<td>{_esc(m.alert)}</td><td>{_status(m.state)}</td><td>{_esc(m.window)}</td></tr>"
        for m in monitor.metrics_table()]
    replay = [f'<tr data-task="{_esc(task)}"><td>{_esc(task)}</td><td>{_int(size)}</td></tr>'
              for task, size in sorted(monitor.replay_by_task().items())]
    from tolaria.monitor.academy import NO_SESSION

    return _template("academy.html").substitute(
        academy=_esc(academy_dir),
        alerts=alerts_html(monitor.alerts(now)),
        versions=_table(("version", "parent", "created", "gates", "problem"), versions,
                        "versions", empty="No policy versions yet."),
        sessions=_table(("session", "outcome", "candidate", "parent", "gates (value vs "
                         "threshold)", "cause", "finished"), sessions, "sessions",
                        empty=NO_SESSION[0].upper() + NO_SESSION[1:] + "."),
        metrics=_table(("metric", "value", "target", "alert", "state", "window"), metrics,
                       "metrics"),
        replay=_table(("task", "decision points"), replay, "replay",
                      empty="The replay buffer is empty."),
    )


def _gates(gates: Mapping[str, Mapping[str, Any]]) -> str:
    if not gates:
        return ""
    return "<ul class=gates>" + "".join(
        f'<li data-gate="{_esc(name)}" class="{"passed" if g.get("passed") else "failed"}">'
        f'{_esc(name)}: {_num(g.get("value"))} vs {_num(g.get("threshold"))} '
        f'{"✓" if g.get("passed") else "✗"}</li>' for name, g in gates.items()) + "</ul>"


# -- cells -----------------------------------------------------------------------------------


def _table(head: Iterable[str], rows: list[str], name: str, empty: str = "") -> str:
    if not rows and empty:
        return f'<p class="empty" data-empty="{name}">{_esc(empty)}</p>'
    header = "".join(f"<th>{_esc(h)}</th>" for h in head)
    return (f'<table data-table="{name}"><thead><tr>{header}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any, digits: int = 4) -> str:
    """A measurement: 4 decimals (a ratio like 0.9479), ``–`` for nothing."""
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _signed(value: Any) -> str:
    return "–" if value is None else f"{value:+.4f}"


def _int(value: Any) -> str:
    return "–" if value is None else f"{value:,}"


def _params(s: Mapping[str, Any]) -> str:
    return f'{_int(s["params_initial"])} → {_int(s["params_final"])}'


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{_esc(k)} {v}" for k, v in counts.items()) or "–"


def _status(status: str) -> str:
    return f'<span class="status status-{_esc(status).replace(" ", "-")}">{_esc(status)}</span>'


def _when(stamp: float | None) -> str:
    if not stamp:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _heartbeat(s: Mapping[str, Any], now: float) -> str:
    if s.get("heartbeat") is None:
        return "–"
    age = max(0.0, now - s["heartbeat"])
    return f'{_when(s["heartbeat"])} <span class="note">({age:.0f} s ago)</span>'
