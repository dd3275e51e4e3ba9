"""Runs as the monitor sees them: run directories read incrementally, while they are written.

A :class:`RunView` follows one run directory (``docs/events.md``).  Each :meth:`RunView.poll`
reads only what was appended to ``metrics.jsonl`` and ``events.jsonl`` since the last one
(:class:`JsonlTail` keeps a byte offset per file), so a 10,000-event run is parsed once, not
on every poll of a dashboard.  A resume rewrites those files (``RunDirectory.rewind``): a
file that shrank, was replaced (a new inode) or no longer holds the bytes the offset ended
on is read again from the start.  ``status.json``, ``summary.json`` and ``config.yaml`` are
small and rewritten whole: they are read again when their stat changes.

From these a view derives what a dashboard shows: the run's summary row, its curves (the
kept attempt of each epoch: a rollback re-runs an epoch, the highest attempt wins), the
seeds' lifecycle segments, the decision log, rollbacks, incidents and run-level
:class:`~tolaria.monitor.alerts.Alert` s.  :class:`RunIndex` finds the runs under a root.

Nothing here imports torch: a dashboard that reads runs stays small.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tolaria import records
from tolaria.config import MonitorConfig
from tolaria.errors import TolariaError
from tolaria.monitor.alerts import Alert

#: The phases of a run that is still being written (``status.json``).
LIVE_PHASES = ("starting", "training", "validating", "deciding")
#: How many bytes before a tail's offset must be unchanged for an append to be trusted.
_ANCHOR_BYTES = 64


class JsonlTail:
    """The complete lines appended to one JSONL file since the last :meth:`read`.

    ``offset`` is where the next read starts: just after the last complete line.  A last
    line without its newline is being written (or was cut short by a crash) and waits for
    the next read.  ``bytes_read`` counts what was read from disk, for whoever checks that
    an append costs only its own bytes.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self.bytes_read = 0
        self._inode: int | None = None
        #: The bytes just before ``offset``: if they change, the file was rewritten in place.
        self._anchor = b""

    def read(self) -> tuple[bool, list[dict[str, Any]]]:
        """``(restarted, records)``: ``restarted`` when the file was truncated or replaced
        since the last read, and ``records`` then holds it all again."""
        try:
            with open(self.path, "rb") as stream:
                stat = os.fstat(stream.fileno())
                restarted = self._moved(stream, stat)
                if restarted:
                    self.offset, self._anchor = 0, b""
                self._inode = stat.st_ino
                if stat.st_size <= self.offset:
                    return restarted, []
                stream.seek(self.offset)
                chunk = stream.read(stat.st_size - self.offset)
        except FileNotFoundError:
            restarted = self.offset > 0
            self.offset, self._inode, self._anchor = 0, None, b""
            return restarted, []
        self.bytes_read += len(chunk)
        end = chunk.rfind(b"\n") + 1  # 0: not one complete line yet
        if end == 0:
            return restarted, []
        complete = chunk[:end]
        self.offset += end
        self._anchor = (self._anchor + complete)[-_ANCHOR_BYTES:]
        found = []
        for line in complete.splitlines():
            if line.strip():
                try:
                    found.append(records.decode(line.decode()))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue  # a torn line a crash left in the middle: the record never was
        return restarted, found

    def _moved(self, stream: Any, stat: os.stat_result) -> bool:
        if self._inode is None:
            return False
        if stat.st_ino != self._inode or stat.st_size < self.offset:
            return True
        if not self._anchor:
            return False
        stream.seek(self.offset - len(self._anchor))
        anchor = stream.read(len(self._anchor))
        self.bytes_read += len(anchor)
        return anchor != self._anchor


class WholeFile:
    """A small file rewritten whole (``status.json``, ``summary.json``, ``config.yaml``),
    parsed again only when its stat changes."""

    def __init__(self, path: Path, parse: Any = json.loads) -> None:
        self.path = Path(path)
        self.parse = parse
        self.value: Any = None
        self._stamp: tuple[int, int, int] | None = None

    def read(self) -> bool:
        """Whether the value changed."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            changed, self.value, self._stamp = self.value is not None, None, None
            return changed
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return False
        try:
            self.value = self.parse(self.path.read_text())
        except (OSError, ValueError, yaml.YAMLError):
            return False  # replaced between stat and read, or caught mid-write: next poll
        self._stamp = stamp
        return True


@dataclass
class Decision:
    """One line of the decision log: what Tamiyo decided, why, and what came of it."""

    epoch: int
    attempt: int
    decision_id: str
    seed_id: str
    action: str
    blueprint: str | None
    reason: str
    time: float
    #: ``{epochs_later, delta_validation_accuracy, delta_validation_loss, incident}``.
    outcome: dict[str, Any] | None = None


@dataclass
class _Events:
    """What ``events.jsonl`` holds, kept small: a 10,000-event run is thousands of these."""

    run_start: dict[str, Any] | None = None
    run_end: dict[str, Any] | None = None
    decisions: list[Decision] = field(default_factory=list)
    by_decision: dict[str, Decision] = field(default_factory=dict)
    germinations: list[tuple[int, int, str, str | None]] = field(default_factory=list)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    incidents: list[dict[str, Any]] = field(default_factory=list)
    count: int = 0

    def add(self, record: dict[str, Any]) -> None:
        self.count += 1
        kind = record.get("event")
        epoch, attempt = record.get("epoch", 0), record.get("attempt", 1)
        if kind == "run_start":
            self.run_start = self.run_start or record  # a resume's run_start: the first stays
        elif kind == "run_end":
            self.run_end = {k: record.get(k) for k in ("status", "error", "time")}
        elif kind == "decision":
            decision = Decision(epoch, attempt, str(record.get("decision_id")),
                                str(record.get("seed_id")), str(record.get("action")),
                                record.get("blueprint"), str(record.get("reason", "")),
                                record.get("time", 0.0))
            self.decisions.append(decision)
            self.by_decision[decision.decision_id] = decision
        elif kind == "outcome":
            decision = self.by_decision.get(str(record.get("decision_id")))
            if decision is not None:
                decision.outcome = {k: record.get(k) for k in (
                    "epochs_later", "delta_validation_accuracy", "delta_validation_loss",
                    "incident")}
        elif kind == "adaptation" and record.get("to_state") == "germinated":
            self.germinations.append((epoch, attempt, str(record.get("seed_id")),
                                      record.get("blueprint")))
        elif kind == "rollback":
            self.rollbacks.append({k: record.get(k) for k in (
                "epoch", "attempt", "restored_epoch", "reason", "time")})
        elif kind == "incident":
            self.incidents.append({k: record.get(k) for k in (
                "epoch", "attempt", "emergency", "key", "reason", "count", "time")})


class RunView:
    """One run directory, followed incrementally.  Call :meth:`poll`, then read."""

    def __init__(self, run_dir: Path, run_id: str | None = None,
                 thresholds: MonitorConfig | None = None) -> None:
        self.path = Path(run_dir)
        self.run_id = run_id or self.path.name
        self.thresholds = thresholds or MonitorConfig()
        self.metrics_tail = JsonlTail(self.path / "metrics.jsonl")
        self.events_tail = JsonlTail(self.path / "events.jsonl")
        self.status_file = WholeFile(self.path / "status.json")
        self.summary_file = WholeFile(self.path / "summary.json")
        self.config_file = WholeFile(self.path / "config.yaml", yaml.safe_load)
        #: Grows by one whenever a poll found anything new: a client's ``since`` cursor.
        self.version = 0
        #: A file this Tolaria cannot read (a newer record schema), in one line.
        self.error: str | None = None
        #: Epoch -> the metrics.jsonl record of its latest attempt.
        self._epochs: dict[int, dict[str, Any]] = {}
        self._events = _Events()

    # -- reading -------------------------------------------------------------------------
    def poll(self) -> int:
        """Read what changed on disk; the new :attr:`version`."""
        changed = False
        try:
            changed |= self._poll_metrics()
            changed |= self._poll_events()
        except TolariaError as exc:
            message = f"{self.run_id}: {exc}"
            changed, self.error = message != self.error, message
        for file in (self.status_file, self.summary_file, self.config_file):
            changed |= file.read()
        self.version += changed
        return self.version

    def _poll_metrics(self) -> bool:
        restarted, found = self.metrics_tail.read()
        if restarted:
            self._epochs = {}
        for record in found:
            epoch = record.get("epoch", 0)
            kept = self._epochs.get(epoch)
            if kept is None or record.get("attempt", 1) >= kept.get("attempt", 1):
                self._epochs[epoch] = record
        return restarted or bool(found)

    def _poll_events(self) -> bool:
        restarted, found = self.events_tail.read()
        if restarted:
            self._events = _Events()
        for record in found:
            self._events.add(record)
        return restarted or bool(found)

    # -- what it shows -------------------------------------------------------------------
    @property
    def status(self) -> dict[str, Any]:
        return self.status_file.value or {}

    @property
    def summary_json(self) -> dict[str, Any] | None:
        return self.summary_file.value

    def epochs(self) -> list[dict[str, Any]]:
        """The kept attempt of every epoch run so far, in epoch order (an epoch whose latest
        attempt was undone, and is being run again, is not among them yet)."""
        return [record for _, record in sorted(self._epochs.items())
                if not record.get("rollback")]

    def _kept_attempt(self, epoch: int, attempt: int) -> bool:
        """Whether records of ``attempt`` of ``epoch`` still stand (no rollback undid it)."""
        latest = self._epochs.get(epoch)
        if latest is None:
            return True  # the epoch is still running
        if attempt != latest.get("attempt", 1):
            return attempt > latest.get("attempt", 1)
        return not latest.get("rollback")

    def state(self, now: float | None = None) -> str:
        """``running``, ``completed``, ``failed``, ``interrupted``, ``stalled`` or ``new``.

        A live phase whose writer is gone (its pid, on this host) was ``interrupted``
        (killed: nobody wrote the end); one whose heartbeat is older than
        ``heartbeat_stall_s`` is ``stalled``."""
        summary = self.summary_json
        if summary is not None and summary.get("status"):
            return str(summary["status"])
        phase = self.status.get("phase")
        if phase is None:
            return "new"
        if phase not in LIVE_PHASES:
            return str(phase)
        if not _writer_alive(self.status):
            return "interrupted"
        if self.heartbeat_age(now) > self.thresholds.heartbeat_stall_s:
            return "stalled"
        return "running"

    def heartbeat_age(self, now: float | None = None) -> float:
        beat = self.status.get("heartbeat")
        return (now or time.time()) - beat if isinstance(beat, int | float) else 0.0

    def policy(self) -> str:
        """Which policy grew the run: ``heuristic``, or ``learned`` and its version."""
        tamiyo = (self.config_file.value or {}).get("tamiyo") or {}
        name = tamiyo.get("policy") or "heuristic"
        if name == "learned":
            return f"learned {tamiyo.get('policy_version') or '(champion)'}"
        return str(name)

    def total_epochs(self) -> int | None:
        """The epochs the run is to run: its status, its start record, or its config."""
        return (self.status.get("epochs") or (self._events.run_start or {}).get("epochs")
                or ((self.config_file.value or {}).get("run") or {}).get("epochs"))

    @property
    def monitor(self) -> str:
        """The name of the task's score (``accuracy`` for the default task)."""
        return str((self.summary_json or {}).get("monitor", "accuracy"))

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """The run's row in the index."""
        epochs = self.epochs()
        last = epochs[-1] if epochs else {}
        scores = [e["val_accuracy"] for e in epochs if _finite(e.get("val_accuracy"))]
        start = self._events.run_start or {}
        seeds = Counter(str(s) for s in (last.get("seed_states") or {}).values())
        return {
            "id": self.run_id,
            "status": self.state(now),
            "phase": self.status.get("phase"),
            "epochs_done": len(epochs),
            "epochs": self.total_epochs(),
            "best_val_score": max(scores) if scores else None,
            "monitor": self.monitor,
            "params_initial": start.get("params", epochs[0].get("params") if epochs else None),
            "params_final": last.get("params"),
            "seeds": dict(sorted(seeds.items())),
            "rollbacks": len(self._events.rollbacks),
            "incidents": len(self._events.incidents),
            "policy": self.policy(),
            "heartbeat": self.status.get("heartbeat"),
            "heartbeat_age_s": self.heartbeat_age(now) if self.status else None,
            "started": self.status.get("started"),
            "error": self.error or (self.summary_json or {}).get("error"),
            "version": self.version,
        }

    def curves(self) -> dict[str, list]:
        """Per kept epoch: the validation score and loss, training loss, lr and parameters."""
        epochs = self.epochs()
        keys = ("val_accuracy", "val_loss", "train_loss", "lr", "params")
        return {"epoch": [e.get("epoch") for e in epochs],
                **{key: [_json_number(e.get(key)) for e in epochs] for key in keys}}

    def seed_segments(self) -> list[dict[str, Any]]:
        """One row per seed: its states as segments ``[start, end]`` (epochs, inclusive),
        each with the blueprint it held (from the germination that began its trial)."""
        germinations: dict[str, list[tuple[int, str | None]]] = {}
        for epoch, attempt, seed, blueprint in self._events.germinations:
            if self._kept_attempt(epoch, attempt):
                germinations.setdefault(seed, []).append((epoch, blueprint))
        rows: dict[str, list[dict[str, Any]]] = {}
        for record in self.epochs():
            epoch = record.get("epoch", 0)
            for seed, state in (record.get("seed_states") or {}).items():
                segments = rows.setdefault(seed, [])
                if segments and segments[-1]["state"] == state and segments[-1]["end"] == epoch - 1:
                    segments[-1]["end"] = epoch
                    continue
                blueprint = None
                if state != "dormant":
                    held = [b for e, b in germinations.get(seed, []) if e <= epoch]
                    blueprint = held[-1] if held else None
                segments.append({"state": state, "start": epoch, "end": epoch,
                                 "blueprint": blueprint})
        return [{"seed": seed, "segments": rows[seed]} for seed in sorted(rows)]

    def decisions(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The decision log, oldest first (the last ``limit`` if given)."""
        chosen = self._events.decisions[-limit:] if limit else self._events.decisions
        return [{**vars(d), "undone": not self._kept_attempt(d.epoch, d.attempt)}
                for d in chosen]

    @property
    def decision_count(self) -> int:
        return len(self._events.decisions)

    @property
    def event_count(self) -> int:
        return self._events.count

    def rollbacks(self) -> list[dict[str, Any]]:
        return list(self._events.rollbacks)

    def incidents(self) -> list[dict[str, Any]]:
        return list(self._events.incidents)

    def alerts(self, now: float | None = None) -> list[Alert]:
        """Rollbacks above ``rollbacks_above``, each incident, a run stopped by divergence,
        a stalled heartbeat."""
        limits, found = self.thresholds, []
        rollbacks = self._events.rollbacks
        if len(rollbacks) > limits.rollbacks_above:
            found.append(Alert(rollbacks[-1].get("time") or 0.0, "rollbacks", len(rollbacks),
                               limits.rollbacks_above, self.run_id,
                               f"{len(rollbacks)} rollback(s), more than "
                               f"{limits.rollbacks_above}; last: {rollbacks[-1].get('reason')}"))
        for incident in self._events.incidents:
            found.append(Alert(incident.get("time") or 0.0, str(incident.get("emergency")),
                               incident.get("count") or 1, 0, self.run_id,
                               f"incident {incident.get('key')}: {incident.get('reason')}"))
        summary = self.summary_json or {}
        if summary.get("diverged"):
            found.append(Alert((self._events.run_end or {}).get("time") or 0.0, "diverged", 1,
                               0, self.run_id, "stopped: the loss diverged again after every "
                               "rollback"))
        if self.state(now) == "stalled":
            age = self.heartbeat_age(now)
            found.append(Alert(now or time.time(), "heartbeat_age_s", age,
                               limits.heartbeat_stall_s, self.run_id,
                               f"no heartbeat for {age:.0f} s (stalled after "
                               f"{limits.heartbeat_stall_s:.0f} s)"))
        return found

    def detail(self, now: float | None = None, decision_limit: int | None = None) -> dict:
        """Everything the run page shows, as JSON-able data."""
        return {
            "summary": self.summary(now),
            "curves": self.curves(),
            "seeds": self.seed_segments(),
            "decisions": self.decisions(decision_limit),
            "decision_count": self.decision_count,
            "rollbacks": self.rollbacks(),
            "incidents": self.incidents(),
            "alerts": [a.to_dict() for a in self.alerts(now)],
        }


class RunIndex:
    """The runs directly under ``runs_root`` (folders with ``config.yaml`` or
    ``status.json``), a :class:`RunView` cached for each."""

    def __init__(self, runs_root: Path, thresholds: MonitorConfig | None = None) -> None:
        self.root = Path(runs_root)
        self.thresholds = thresholds or MonitorConfig()
        self._views: dict[str, RunView] = {}

    def run_ids(self) -> list[str]:
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return []
        found = []
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            folder = Path(entry.path)
            if (folder / "config.yaml").exists() or (folder / "status.json").exists():
                found.append(entry.name)
        return sorted(found)

    def view(self, run_id: str) -> RunView:
        """The polled view of ``run_id`` (an id :meth:`run_ids` lists: callers check)."""
        view = self._views.get(run_id)
        if view is None:
            view = self._views[run_id] = RunView(self.root / run_id, run_id, self.thresholds)
        view.poll()
        return view

    def views(self) -> list[RunView]:
        """Every run, polled, newest first."""
        ids = self.run_ids()
        for gone in set(self._views) - set(ids):
            del self._views[gone]
        views = [self.view(run_id) for run_id in ids]
        return sorted(views, key=lambda v: v.status.get("started") or 0.0, reverse=True)


def _writer_alive(status: dict[str, Any]) -> bool:
    """Whether the process named in ``status.json`` still runs (unknown elsewhere: yes)."""
    pid = status.get("pid")
    if not isinstance(pid, int) or status.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and value == value and abs(value) != float("inf")


def _json_number(value: Any) -> Any:
    """A number as JSON can carry it: NaN and infinity (a diverged epoch) become None."""
    return value if value is None or not isinstance(value, float) or _finite(value) else None
