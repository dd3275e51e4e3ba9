"""The academy's monitor (design §7, ACADEMY.md §5): the nightly sessions' metrics, their
alerts, and TensorBoard.

Everything is computed from the replay buffer's ``attempts`` rows (the nightly contract: one
row ``kind="nightly"`` per session, its record in ``detail``; reverts ``kind="revert"``) and
the policy registry, both only read: a monitor never creates an academy, a replay buffer or a
version.  Each call reads the rows again, so a long-lived monitor (the dashboard's) sees the
sessions that ended since.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tolaria.config import MonitorConfig
from tolaria.monitor.alerts import Alert

#: The outcomes of a nightly attempt (the contract); a row with another outcome (a session
#: that found nothing to learn) is listed by :meth:`TrainingMonitor.sessions` but is no attempt.
ATTEMPT_OUTCOMES = ("deployed", "rejected", "failed")
#: How an automatic revert's reason starts (a revert by hand is no alert).
AUTO_REVERT = "auto-revert"
#: A session id that names a folder of ``<academy>/nightly`` (``YYYYMMDDTHHMMSSZ``).
_SESSION_NAME = re.compile(r"[\w-]+")
#: What a metric's window says before the first nightly attempt.
NO_SESSION = "no nightly session yet"
#: Where :func:`publish_to_tensorboard` writes, under the academy directory.
TENSORBOARD_DIR = "tensorboard"


# -- what is shown ------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricRow:
    """One line of the §7 table, as ``academy status`` and the dashboard print it."""

    #: The key of :meth:`TrainingMonitor.track_metrics`.
    name: str
    #: For a human: ``"Policy update success"``.
    label: str
    #: None: nothing to measure yet.
    value: float | None
    #: ``value`` as text (``"75%"``, ``"12 min"``), ``"no data"`` when None.
    shown: str
    #: Design §7's target, as text (``"≥ 95%"``).
    target: str
    #: The alert, as text (``"< 90%"``); ``"—"`` for a metric without one.
    alert: str
    #: The alert's threshold (``academy.monitor``), None for a metric without one.
    threshold: float | None
    #: What ``value`` is: ``"ratio"`` (0..1, shown as a percentage), ``"distance"``, ``"seconds"``.
    unit: str
    #: ``"ok"``, ``"alert"`` (past its threshold) or ``"no data"``.
    state: str
    #: Which attempts it was computed over: ``"4 nightly attempts"``, ``"session 2026...Z"``.
    window: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class NightlySession:
    """A nightly attempt as the dashboard's academy page lists it."""

    #: The session's id (``YYYYMMDDTHHMMSSZ``), its directory under ``<academy>/nightly``.
    session: str
    #: The candidate registered, None when none was.
    version: str | None
    #: The champion when the session started.
    parent: str | None
    #: ``deployed``, ``rejected`` (a gate failed), ``failed`` (crash, timeout, memory cap, kill).
    outcome: str
    cause: str | None
    #: Unix seconds.
    started: float
    finished: float
    #: ``{gate: {"value", "threshold", "passed"}}``.
    gates: dict[str, dict[str, Any]]
    failed_gate: str | None
    validation_divergence: float | None
    adapter_training_s: float | None
    session_training_s: float | None
    allotted_s: float | None
    profiles_seen: list[dict[str, Any]]
    profiles_tested: list[dict[str, Any]]
    #: The session record's steps (name, status, started, finished) when its
    #: ``session.json`` is still there; empty otherwise.
    steps: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VersionRow:
    """A policy version as the monitor lists it."""

    name: str
    #: The version it was trained from (None: a base policy, or a version that does not load).
    parent: str | None
    created: str | None
    #: The version runs use now (after the registry's fallback from a damaged CHAMPION).
    champion: bool
    gates: dict[str, dict[str, Any]]
    failed_gate: str | None
    training_s: float | None
    #: Why it does not load; None when it does.
    problem: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the metrics --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Measure:
    """A metric's value, when it was measured and over which attempts."""

    value: float
    time: float
    window: str
    #: What an alert adds to explain itself (the profiles left untested).
    note: str = ""


@dataclass(frozen=True)
class _Metric:
    name: str
    label: str
    target: str
    unit: str
    #: The ``MonitorConfig`` field of its alert; ``*_below`` alerts below it, others above.
    threshold_field: str | None

    def threshold(self, thresholds: MonitorConfig) -> float | None:
        return None if self.threshold_field is None else getattr(thresholds, self.threshold_field)

    def past(self, value: float, thresholds: MonitorConfig) -> bool:
        """Past the threshold, not at it: 90% success is no alert under ``< 90%``."""
        threshold = self.threshold(thresholds)
        if threshold is None:
            return False
        return value < threshold if self.threshold_field.endswith("_below") else value > threshold

    def alert_text(self, thresholds: MonitorConfig) -> str:
        threshold = self.threshold(thresholds)
        if threshold is None:
            return "—"
        side = "<" if self.threshold_field.endswith("_below") else ">"
        return f"{side} {format_value(threshold, self.unit)}"


#: Design §7's table plus ACADEMY.md §5's resource utilisation, in the order shown.
METRICS = (
    _Metric("policy_success_rate", "Policy update success", "≥ 95%", "ratio",
            "policy_success_rate_below"),
    _Metric("validation_divergence", "Validation divergence", "≤ 0.05", "distance",
            "validation_divergence_above"),
    _Metric("adapter_training_s", "Adapter training time", "< 30 min", "seconds",
            "adapter_training_s_above"),
    _Metric("hardware_coverage", "Hardware coverage", "100%", "ratio", "hardware_coverage_below"),
    _Metric("resource_utilization", "Resource utilization", "—", "ratio", None),
)


def format_value(value: float, unit: str) -> str:
    if unit == "ratio":
        return f"{value * 100:.3g}%"
    if unit == "seconds":
        return f"{value:.3g} s" if value < 120 else f"{value / 60:.3g} min"
    return f"{value:.3g}"


def _number(value: Any) -> float | None:
    """A measured number from a record, None when it is missing or not a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _profile_key(profile: Any) -> str:
    return json.dumps(profile, sort_keys=True)


def _profile_name(profile: Any) -> str:
    if not isinstance(profile, dict):
        return str(profile)
    return " ".join(str(profile[key]) for key in ("device_type", "device_name") if key in profile)


def _coverage(detail: dict[str, Any]) -> tuple[float, str] | None:
    """Profiles tested / profiles seen in daytime runs, when the session ran its gates: a
    tested profile no run had counts nothing, a seen one the sandbox could not mirror
    counts against it."""
    seen, tested = detail.get("profiles_seen"), detail.get("profiles_tested")
    if not isinstance(seen, list) or not seen or not isinstance(tested, list):
        return None
    if not tested and not detail.get("gates"):
        return None  # the session ended before its gates: it tested nothing, by no choice
    tested_keys = {_profile_key(p) for p in tested}
    seen_by_key = {_profile_key(p): p for p in seen}
    untested = [p for key, p in seen_by_key.items() if key not in tested_keys]
    note = f"not tested: {', '.join(map(_profile_name, untested))}" if untested else ""
    return (len(seen_by_key) - len(untested)) / len(seen_by_key), note


def _utilization(detail: dict[str, Any]) -> tuple[float, str] | None:
    used, allotted = _number(detail.get("session_training_s")), _number(detail.get("allotted_s"))
    if used is None or allotted is None or allotted <= 0:
        return None
    return used / allotted, ""


def _field(name: str) -> Callable[[dict[str, Any]], tuple[float, str] | None]:
    def read(detail: dict[str, Any]) -> tuple[float, str] | None:
        value = _number(detail.get(name))
        return None if value is None else (value, "")

    return read


#: The metrics of one session, each read from its attempt's ``detail``.
_SESSION_METRICS = {
    "validation_divergence": _field("validation_divergence"),
    "adapter_training_s": _field("adapter_training_s"),
    "hardware_coverage": _coverage,
    "resource_utilization": _utilization,
}


def _measure(attempts: list[dict[str, Any]]) -> dict[str, _Measure | None]:
    """Every metric from ``attempts`` (newest first): the success rate over all nightly
    attempts; the others from the newest attempt that measured them (a session that crashed
    before its gates measured no divergence: the one before it stands, and names itself)."""
    nightly = _nightly_attempts(attempts)
    measured: dict[str, _Measure | None] = {metric.name: None for metric in METRICS}
    if nightly:
        deploys = sum(attempt["outcome"] == "deployed" for attempt in nightly)
        measured["policy_success_rate"] = _Measure(
            deploys / len(nightly), nightly[0]["finished"],
            f"{len(nightly)} nightly attempt{'s' * (len(nightly) != 1)}",
            f"{deploys} deployed",
        )
    for name, read in _SESSION_METRICS.items():
        for attempt in nightly:
            found = read(_detail(attempt))
            if found is not None:
                measured[name] = _Measure(found[0], attempt["finished"],
                                          f"session {_session_id(attempt)}", found[1])
                break
    return measured


def _nightly_attempts(attempts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [a for a in attempts if a["kind"] == "nightly" and a["outcome"] in ATTEMPT_OUTCOMES]


def _detail(attempt: dict[str, Any]) -> dict[str, Any]:
    detail = attempt.get("detail")
    return detail if isinstance(detail, dict) else {}


def _session_id(attempt: dict[str, Any]) -> str:
    return str(_detail(attempt).get("session") or f"#{attempt['id']}")


def _gates(gates: Any) -> tuple[dict[str, dict[str, Any]], str | None]:
    """A record's gates as ``{name: {"value", "threshold", "passed"}}`` and the failed one
    (a card keeps ``failed_gate`` among its gates; a session record beside them)."""
    if not isinstance(gates, dict):
        return {}, None
    failed = gates.get("failed_gate")
    return {name: gate for name, gate in gates.items() if isinstance(gate, dict)}, (
        failed if isinstance(failed, str) else None
    )


# -- the monitor --------------------------------------------------------------------------


class TrainingMonitor:
    """Design §7's ``TrainingMonitor`` over one academy directory (docs/monitor.md).

    Windows: ``policy_success_rate`` is deploys / every nightly attempt on record (a gate
    failure or a sandbox crash is a failed attempt); ``validation_divergence``,
    ``adapter_training_s``, ``hardware_coverage`` and ``resource_utilization`` are the
    newest session's — precisely, of the newest nightly attempt that measured each (a session
    that crashed in training measured no divergence; its crash is an alert of its own).
    """

    def __init__(self, academy_dir: Path, thresholds: MonitorConfig | None = None) -> None:
        self.academy_dir = Path(academy_dir)
        self.thresholds = MonitorConfig() if thresholds is None else thresholds

    # --- the metrics -----------------------------------------------------------------

    def track_metrics(self) -> dict[str, float | None]:
        """``{metric: value}`` for design §7's keys plus ``validation_divergence`` and
        ``adapter_training_s``; None where nothing was measured (no nightly session yet)."""
        return {name: None if found is None else found.value
                for name, found in _measure(self._attempts()).items()}

    def metrics_table(self) -> list[MetricRow]:
        attempts = self._attempts()
        measured = _measure(attempts)
        nothing = "no session measured it" if _nightly_attempts(attempts) else NO_SESSION
        rows = []
        for metric in METRICS:
            found = measured[metric.name]
            if found is None:
                state, shown, window = "no data", "no data", nothing
            else:
                state = "alert" if metric.past(found.value, self.thresholds) else "ok"
                shown, window = format_value(found.value, metric.unit), found.window
            rows.append(MetricRow(
                name=metric.name, label=metric.label, value=None if found is None else found.value,
                shown=shown, target=metric.target, alert=metric.alert_text(self.thresholds),
                threshold=metric.threshold(self.thresholds), unit=metric.unit, state=state,
                window=window,
            ))
        return rows

    def alerts(self, now: float | None = None) -> list[Alert]:
        """The alerts, newest first: one per metric past its threshold (at the time it was
        measured), and one per failed nightly attempt and per auto-revert that finished in
        the ``event_alert_s`` before ``now`` (default: the clock)."""
        now = time.time() if now is None else now
        attempts = self._attempts()
        found: list[Alert] = []
        measured = _measure(attempts)
        for metric in METRICS:
            measure = measured[metric.name]
            if measure is None or not metric.past(measure.value, self.thresholds):
                continue
            threshold = metric.threshold(self.thresholds)
            side = "below" if metric.threshold_field.endswith("_below") else "above"
            note = f"; {measure.note}" if measure.note else ""
            found.append(Alert(
                time=measure.time, metric=metric.name, value=measure.value, threshold=threshold,
                scope="academy",
                message=f"{metric.label} {format_value(measure.value, metric.unit)} "
                f"({measure.window}{note}) is {side} {format_value(threshold, metric.unit)}",
            ))
        since = now - self.thresholds.event_alert_s
        for attempt in attempts:
            if attempt["finished"] >= since:
                event = _event_alert(attempt)
                if event is not None:
                    found.append(event)
        return sorted(found, key=lambda alert: alert.time, reverse=True)

    # --- what the dashboard lists ----------------------------------------------------

    def sessions(self, limit: int | None = None) -> list[NightlySession]:
        """The nightly attempts, newest first (``limit``: the newest that many)."""
        nightly = [a for a in self._attempts() if a["kind"] == "nightly"]
        return [self._session(attempt) for attempt in nightly[:limit]]

    def replay_by_task(self) -> dict[str, int]:
        """Decision points per task (``ReplayBuffer.size_by_task``); none without a buffer."""
        from tolaria.academy.replay import REPLAY_FILE, ReplayBuffer

        if not (self.academy_dir / REPLAY_FILE).exists():
            return {}
        with ReplayBuffer.in_academy(self.academy_dir) as replay:
            return replay.size_by_task()

    def versions(self) -> list[VersionRow]:
        """The registry's versions by number, each read (a broken one names its problem),
        the one runs use now marked ``champion``."""
        from tolaria.academy.registry import PolicyRegistry, PolicyVersion
        from tolaria.errors import PolicyVersionError

        registry = PolicyRegistry(self.academy_dir)
        try:  # a damaged CHAMPION's fallback is what runs; the survey shows the damage
            champion = registry.champion(warn=lambda line: None).name
        except PolicyVersionError:
            champion = None
        rows = []
        for name, version in registry.survey():
            if isinstance(version, PolicyVersion):
                card = version.card
                gates, failed = _gates(card.get("gates"))
                rows.append(VersionRow(
                    name=name, parent=card.get("parent"), created=card.get("created"),
                    champion=name == champion, gates=gates, failed_gate=failed,
                    training_s=_number(card.get("training_s")), problem=None,
                ))
            else:
                rows.append(VersionRow(name=name, parent=None, created=None, champion=False,
                                       gates={}, failed_gate=None, training_s=None,
                                       problem=str(version)))
        return rows

    def report(self, now: float | None = None) -> dict[str, Any]:
        """Everything above as one plain-JSON object (``academy status --json``)."""
        return {
            "academy": str(self.academy_dir),
            "metrics": [row.to_dict() for row in self.metrics_table()],
            "alerts": [alert.to_dict() for alert in self.alerts(now)],
            "sessions": [session.to_dict() for session in self.sessions()],
            "versions": [version.to_dict() for version in self.versions()],
            "replay_by_task": self.replay_by_task(),
        }

    def nightly_attempts(self) -> int:
        """How many nightly attempts there are: the step of the TensorBoard scalars."""
        return len(_nightly_attempts(self._attempts()))

    # --- internals -------------------------------------------------------------------

    def _attempts(self) -> list[dict[str, Any]]:
        """The attempts, newest first; none, and nothing created, without a replay buffer."""
        from tolaria.academy.replay import REPLAY_FILE, ReplayBuffer

        if not (self.academy_dir / REPLAY_FILE).exists():
            return []
        with ReplayBuffer.in_academy(self.academy_dir) as replay:
            return replay.attempts()

    def _session(self, attempt: dict[str, Any]) -> NightlySession:
        detail = _detail(attempt)
        gates, failed_on_card = _gates(detail.get("gates"))
        failed = detail.get("failed_gate") or failed_on_card
        session = _session_id(attempt)
        return NightlySession(
            session=session, version=attempt["version"] or None, parent=attempt["parent"],
            outcome=attempt["outcome"], cause=detail.get("cause"),
            started=attempt["started"], finished=attempt["finished"], gates=gates,
            failed_gate=failed if isinstance(failed, str) else None,
            validation_divergence=_number(detail.get("validation_divergence")),
            adapter_training_s=_number(detail.get("adapter_training_s")),
            session_training_s=_number(detail.get("session_training_s")),
            allotted_s=_number(detail.get("allotted_s")),
            profiles_seen=_list(detail.get("profiles_seen")),
            profiles_tested=_list(detail.get("profiles_tested")),
            steps=self._steps(session),
        )

    def _steps(self, session: str) -> list[dict[str, Any]]:
        """The steps of ``nightly/<session>/session.json``, if it is there and readable."""
        if not _SESSION_NAME.fullmatch(session):  # a recorded id is no path to wander off by
            return []
        path = self.academy_dir / "nightly" / session / "session.json"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # removed, or not (yet) JSON: the attempt row suffices
            return []
        steps = record.get("steps") if isinstance(record, dict) else None
        keys = ("name", "status", "started", "finished")
        return [{key: step.get(key) for key in keys}
                for step in _list(steps) if isinstance(step, dict)]


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _event_alert(attempt: dict[str, Any]) -> Alert | None:
    """A failed nightly attempt or an auto-revert as an alert (value 1: one event; threshold
    0: none is expected)."""
    detail = _detail(attempt)
    if attempt["kind"] == "nightly" and attempt["outcome"] == "failed":
        metric = "nightly_failed"
        message = (f"nightly session {_session_id(attempt)} failed: "
                   f"{detail.get('cause') or 'no cause recorded'}")
    elif attempt["kind"] == "revert" and str(detail.get("reason", "")).startswith(AUTO_REVERT):
        metric = "auto_revert"
        message = (f"champion {attempt['parent'] or '?'} reverted to {attempt['version']}: "
                   f"{detail['reason']}")
    else:
        return None
    return Alert(time=attempt["finished"], metric=metric, value=1.0, threshold=0.0,
                 scope="academy", message=message)


# -- TensorBoard --------------------------------------------------------------------------


def publish_to_tensorboard(academy_dir: Path, thresholds: MonitorConfig | None = None,
                           *, now: float | None = None) -> Path:
    """Write the metrics as scalars ``academy/<metric>`` (those measured) and the alerts as
    text ``academy/alerts/<metric>`` (a paragraph per alert), at step = the number of nightly
    attempts, into ``<academy_dir>/tensorboard/`` (``tensorboard --logdir``); returns that
    directory.  The nightly session calls it when it ends."""
    monitor = TrainingMonitor(academy_dir, thresholds)
    step = monitor.nightly_attempts()
    metrics, alerts = monitor.track_metrics(), monitor.alerts(now)
    from torch.utils.tensorboard import SummaryWriter  # slow import: only when publishing

    log_dir = monitor.academy_dir / TENSORBOARD_DIR
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        for name, value in metrics.items():
            if value is not None:
                writer.add_scalar(f"academy/{name}", value, step)
        lines: dict[str, list[str]] = {}
        for alert in alerts:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(alert.time))
            lines.setdefault(alert.metric, []).append(
                f"{when}: {alert.message} (value {alert.value:.4g}, "
                f"threshold {alert.threshold:.4g})"
            )
        # One entry per tag and step: two failed sessions in a week share one, a line each.
        for metric, text in lines.items():
            writer.add_text(f"academy/alerts/{metric}", "\n\n".join(text), step)
    return log_dir
