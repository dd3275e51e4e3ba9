"""What a nightly session learns from (ACADEMY.md §4): the replay buffer cut into *recent*,
*held-out* and *history* decision points.

* **The replay range** of a session is ``(from, until]`` in the replay's recording time:
  ``until`` is the moment this session read the buffer, ``from`` the ``until`` of the newest
  session that deployed or rejected a candidate (its attempt row's ``detail.replay``; the
  candidate's card has it too, as ``trained_on``).  A session that failed or had nothing to
  learn consumed nothing: its points stay recent for the next.  The first session has no
  ``from``: every point is recent except the v0 campaign's (runs whose policy is the
  campaign's exploring policy; v0's card names that campaign in its ``trained_on``).
* **Held-out**: the ``held_out`` share of the recent *runs* (at least one), chosen by the
  SHA-256 of their run ids -- deterministic, and never a run split between training and the
  gates.  The rest of the recent points are what the adapter trains on.
* **History**: every other point (earlier ranges, the campaign): the EWC penalty's Fisher.

A recent point whose outcome is not known yet (its run was still going) is written like the
others, with ``reward`` None: the adapter cannot learn from it, the gates still can.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tolaria import records
from tolaria.atomic import write_atomic

#: The behaviour policy of the v0 campaign: its runs are history, never recent.
CAMPAIGN_POLICY = "tolaria.academy.campaign:ExploringPolicy"
#: The outcomes of the sessions whose replay range is learned: later ones start after it.
CONSUMED = ("deployed", "rejected")
#: The files a session writes into ``data/`` before the sandbox starts.
DATA_FILES = ("recent", "history", "held_out")


@dataclass
class Selection:
    """The session's cut of the replay (see the module docstring)."""

    since: float | None  #: the replay range's ``from`` (None: the first session)
    until: float
    recent: list[dict] = field(default_factory=list)
    held_out: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    #: The recent runs' rows (those learned from and the held-out ones), oldest first.
    runs: list[dict] = field(default_factory=list)
    held_out_runs: list[str] = field(default_factory=list)

    def settled_recent(self) -> int:
        """Recent points with a reward: what the adapter can learn from."""
        return sum(point["reward"] is not None for point in self.recent)

    def summary(self) -> dict[str, Any]:
        """The session record's ``replay`` (and the candidate card's ``trained_on``)."""
        return {"from": self.since, "until": self.until, "recent_points": len(self.recent),
                "settled_recent_points": self.settled_recent(),
                "held_out_points": len(self.held_out), "history_points": len(self.history),
                "runs": len(self.runs), "held_out_runs": self.held_out_runs}

    def profiles_seen(self) -> list[dict]:
        """The distinct hardware profiles of the recent runs, newest run's first."""
        return distinct(run["hardware"] for run in reversed(self.runs))

    def write(self, directory: Path) -> dict[str, Path]:
        """``data/recent.json`` etc.: each a JSON list of points as ``ReplayBuffer.points()``
        gives them (non-finite numbers as in ``tolaria.records``); returns their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name in DATA_FILES:
            paths[name] = directory / f"{name}.json"
            points = getattr(self, name)
            write_atomic(paths[name], "[" + ",\n".join(records.encode(p) for p in points) + "]\n")
        return paths


def choose(points: Sequence[dict], runs: Sequence[dict], *, since: float | None, until: float,
           held_out: float) -> Selection:
    """Cut ``points`` (``ReplayBuffer.points()``) of ``runs`` (``ReplayBuffer.runs()``)."""
    campaign = {run["run_id"] for run in runs if run["policy"] == CAMPAIGN_POLICY}
    selection = Selection(since=since, until=until)
    fresh = []
    for point in points:
        recent = (point["run_id"] not in campaign and point["time"] <= until
                  and (since is None or point["time"] > since))
        if recent:
            fresh.append(point)
        elif point["time"] <= until:
            selection.history.append(point)
    recent_ids = {point["run_id"] for point in fresh}
    selection.runs = [run for run in runs if run["run_id"] in recent_ids]
    if len(recent_ids) >= 2:  # one run at least to learn from, and one to judge on
        ranked = sorted(recent_ids, key=lambda r: hashlib.sha256(r.encode()).hexdigest())
        count = min(len(ranked) - 1, max(1, round(held_out * len(ranked))))
        selection.held_out_runs = sorted(ranked[:count])
    kept = set(selection.held_out_runs)
    for point in fresh:
        (selection.held_out if point["run_id"] in kept else selection.recent).append(point)
    return selection


def last_until(attempts: Iterable[Mapping[str, Any]]) -> float | None:
    """The ``until`` of the newest nightly session that deployed or rejected a candidate,
    from the replay's ``attempts`` (newest first)."""
    for attempt in attempts:
        if attempt["kind"] == "nightly" and attempt["outcome"] in CONSUMED:
            until = (attempt["detail"].get("replay") or {}).get("until")
            if isinstance(until, int | float):
                return float(until)
    return None


def distinct(profiles: Iterable[Mapping[str, Any]]) -> list[dict]:
    """``profiles`` without repeats, in order (a profile is a small flat dict)."""
    seen, kept = set(), []
    for profile in profiles:
        key = json.dumps(profile, sort_keys=True)
        if key not in seen:
            seen.add(key)
            kept.append(dict(profile))
    return kept
