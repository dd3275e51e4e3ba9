"""AutoRevert: design §6.4's ``Policy_vN+1 --> Emergency_Rollback --> Policy_vN``.

A callback on every run of ``tamiyo.policy: learned`` with a run directory (attached beside
the :class:`~tolaria.academy.recorder.ReplayRecorder`).  While the version the run uses is
the champion and has a parent -- the version it was trained from, which a nightly session
always names; v0 has none, so the base policy is never reverted -- it reverts ``CHAMPION``
(:meth:`PolicyRegistry.revert`) when

* an **incident implicates a graft that version chose**: the incident record names the
  decision points whose open graft it implicates, and the decision point of this run names
  the version that chose it; or
* at run end, the version's **incident rate** (emergency rollbacks per ended run in the
  replay buffer, this run included) exceeds its parent's by more than
  ``academy.auto_revert.incident_margin``, each side having at least ``min_runs`` runs.

The revert is the registry's attempt row (``kind=revert``, ``detail.reason`` starting with
:data:`REASON_PREFIX` and naming the run, the epoch, the point and the seed) and one
warning line.  It happens once: the registry moves ``CHAMPION`` only while it still names
the blamed version (checked under its lock), so a second run blaming it finds the champion
moved and does nothing.  A run that pins its version (``tamiyo.policy_version``) never
reverts; it says so instead.  The run itself goes on -- its own rollback has handled the
incident -- and the next run gets the reverted-to champion.  A revert that cannot be made
(the registry locked past :data:`LOCK_TIMEOUT_S`, a read-only academy) is one warning line,
never the run's end.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tolaria import records
from tolaria.academy.registry import PolicyRegistry
from tolaria.academy.replay import REPLAY_FILE, ReplayBuffer
from tolaria.config import TolariaConfig
from tolaria.errors import TolariaError
from tolaria.events import Callback

#: How every auto-revert's ``detail.reason`` begins: what tells it from a revert by hand.
REASON_PREFIX = "auto-revert: "
#: How long a revert waits for another registry writer: each write is a few small files, so
#: a wait this long means a stuck process, and the run should not wait on it.
LOCK_TIMEOUT_S = 30.0


def _say_on_stderr(message: str) -> None:
    print(f"tolaria: {message}", file=sys.stderr, flush=True)


class AutoRevert(Callback):
    """Blames the run's policy version for its failures (see the module docstring)."""

    def __init__(self, config: TolariaConfig, run_dir: Path,
                 say: Callable[[str], None] = _say_on_stderr) -> None:
        self.settings = config.academy.auto_revert
        self.pinned = config.tamiyo.policy_version is not None
        self.academy_dir = config.academy_dir()
        self.run_id = str(Path(run_dir).resolve())  # the replay buffer's id of the run
        self.say = say
        self.version: str | None = None
        self.parent: str | None = None
        #: Decision point -> the version that chose it (this process's points).
        self.chosen_by: dict[str, str | None] = {}
        #: Once blamed (reverted, refused or failed), the run says nothing more.
        self.done = False

    def _registry(self) -> PolicyRegistry:
        return PolicyRegistry(self.academy_dir, lock_timeout_s=LOCK_TIMEOUT_S)

    def on_run_start(self, trainer: Any, record: records.RunStart) -> None:
        self.version = getattr(trainer.tamiyo.policy, "version", None)
        if self.version is None:  # a policy of no registry's: no version to blame
            self.done = True
            return
        try:
            self.parent = self._registry().load(self.version).card["parent"]
        except TolariaError as exc:  # damaged since it loaded: nothing is blamed on it
            self.done = True
            self.say(f"warning: auto-revert is off for this run: {exc}")

    def on_decision_point(self, trainer: Any, record: records.DecisionPoint) -> None:
        self.chosen_by[record.point_id] = record.policy_version

    def on_incident(self, trainer: Any, record: records.Incident) -> None:
        # A point made before a resume is not in ``chosen_by``: a run keeps its version.
        ours = [p for p in record.implicated_points
                if self.chosen_by.get(p["point_id"], self.version) == self.version]
        if ours and self._blamable():
            point = ours[0]
            layer = point["seed_id"].rpartition(".")[0] or point["seed_id"]
            self._revert(
                f"rollback at epoch {record.epoch} implicated {point['point_id']} "
                f"({self.version}'s graft of seed {point['seed_id']} on layer {layer}, "
                f"blueprint {point['blueprint']})"
            )

    def on_run_end(self, trainer: Any, record: records.RunEnd) -> None:
        if not self._blamable():
            return
        try:
            counts = self._incident_counts(record.summary.get("rollbacks", 0))
        except TolariaError as exc:
            self.say(f"warning: auto-revert could not read the incident rates: {exc}")
            return
        (runs, incidents), (parent_runs, parent_incidents) = (
            counts.get(self.version, (0, 0)), counts.get(self.parent, (0, 0)))
        if min(runs, parent_runs) < self.settings.min_runs:
            return
        rate, parent_rate = incidents / runs, parent_incidents / parent_runs
        if rate - parent_rate > self.settings.incident_margin:
            self._revert(
                f"{self.version}'s incident rate {rate:.2f} per run ({runs} runs) exceeds "
                f"{self.parent}'s {parent_rate:.2f} ({parent_runs} runs) by more than "
                f"{self.settings.incident_margin:g}"
            )

    # -- internals ----------------------------------------------------------------------

    def _blamable(self) -> bool:
        """Whether a failure now could revert this run's version: it has a parent, nothing
        was blamed yet, and it is the champion."""
        if self.done or self.version is None or self.parent is None:
            return False
        try:
            return self._registry().champion(warn=lambda _: None).name == self.version
        except TolariaError:
            return False  # no champion that loads: not this run's version, which did

    def _revert(self, blame: str) -> None:
        self.done = True
        if self.pinned:
            self.say(f"note: auto-revert: {blame}; nothing reverted: this run pins "
                     f"{self.version} (tamiyo.policy_version)")
            return
        reason = f"{REASON_PREFIX}run {self.run_id}: {blame}"
        skipped: list[str] = []
        try:
            target = self._registry().revert(reason=reason, warn=skipped.append,
                                             only_from=self.version)
        except TolariaError as exc:
            self.say(f"warning: auto-revert of {self.version} failed ({exc}); {blame}; "
                     "the champion is unchanged, the run goes on")
            return
        if target is not None:  # None: another run reverted it first
            passed = f" (passed over: {'; '.join(skipped)})" if skipped else ""
            self.say(f"warning: auto-revert: champion {self.version} -> {target}{passed}: "
                     f"{blame}; this run goes on with {self.version}, the next runs {target}")

    def _incident_counts(self, own_rollbacks: int) -> dict[str | None, tuple[int, int]]:
        """``{version: (ended runs, incidents)}`` for this version and its parent, from the
        replay buffer's runs with this run's own summary in place of its row (which a
        recorder that stopped, or ``academy.replay: false``, did not bring up to date)."""
        by_run: dict[str, tuple[str | None, int]] = {}
        if (self.academy_dir / REPLAY_FILE).exists():  # reading creates no buffer
            with ReplayBuffer.in_academy(self.academy_dir) as replay:
                for row in replay.runs():
                    if row["status"] != "running" and isinstance(row["metrics"], Mapping):
                        by_run[row["run_id"]] = (row["policy_version"],
                                                 int(row["metrics"].get("rollbacks") or 0))
        by_run[self.run_id] = (self.version, int(own_rollbacks or 0))
        counts: dict[str | None, tuple[int, int]] = {}
        for version, incidents in by_run.values():
            if version in (self.version, self.parent):
                runs, total = counts.get(version, (0, 0))
                counts[version] = (runs + 1, total + incidents)
        return counts
