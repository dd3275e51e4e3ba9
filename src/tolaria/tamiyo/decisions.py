"""The decision log: every decision with what it saw and, later, what came of it.

Each applied decision is written once to the run's event log as a ``decision`` event
(epoch, the packet features it saw, the action and the reason).  ``outcome_horizon``
epochs later the log writes an ``outcome`` event for it: the change in validation
accuracy and loss since the decision and the parameters it grafted.  A decision that
an incident implicates gets its outcome at once, naming the incident.  These pairs are
the replay buffer a learned policy will train on (design §6).

Decision ids are ``d<n>`` with ``n`` increasing for the whole run: a rollback restores
an older log, but ``merge`` keeps the id counter and the set of resolved ids, so an id
is never reused and no outcome is written twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

EventSink = Callable[..., None]


@dataclass(frozen=True)
class DecisionRecord:
    decision_id: str
    epoch: int
    seed_id: str
    action: str
    blueprint: str | None
    reason: str
    validation_loss: float
    validation_accuracy: float
    param_cost: int


class DecisionLog:
    def __init__(self, event_sink: EventSink, outcome_horizon: int) -> None:
        self._emit = event_sink
        self.outcome_horizon = outcome_horizon
        self.pending: list[DecisionRecord] = []
        self.resolved: set[str] = set()
        self.next_id = 0

    def record(
        self,
        *,
        epoch: int,
        seed_id: str,
        action: str,
        blueprint: str | None,
        reason: str,
        validation_loss: float,
        validation_accuracy: float,
        param_cost: int,
        features: dict[str, Any],
    ) -> DecisionRecord:
        record = DecisionRecord(
            decision_id=f"d{self.next_id}",
            epoch=epoch,
            seed_id=seed_id,
            action=action,
            blueprint=blueprint,
            reason=reason,
            validation_loss=validation_loss,
            validation_accuracy=validation_accuracy,
            param_cost=param_cost,
        )
        self.next_id += 1
        self.pending.append(record)
        self._emit("decision", **asdict(record), features=features)
        return record

    def resolve_due(self, epoch: int, validation_loss: float, validation_accuracy: float) -> None:
        """Write the outcome of every decision taken ``outcome_horizon`` or more epochs ago."""
        due = [r for r in self.pending if epoch - r.epoch >= self.outcome_horizon]
        for record in due:
            self._resolve(record, epoch, validation_loss, validation_accuracy, incident=None)

    def implicate(
        self,
        epoch: int,
        lookback: int,
        incident: str,
        validation_loss: float,
        validation_accuracy: float,
    ) -> list[DecisionRecord]:
        """Close the decisions of the last ``lookback`` epochs with ``incident`` as outcome."""
        suspects = [r for r in self.pending if epoch - r.epoch <= lookback]
        for record in suspects:
            self._resolve(record, epoch, validation_loss, validation_accuracy, incident=incident)
        return suspects

    def _resolve(
        self,
        record: DecisionRecord,
        epoch: int,
        validation_loss: float,
        validation_accuracy: float,
        incident: str | None,
    ) -> None:
        self.pending.remove(record)
        self.resolved.add(record.decision_id)
        self._emit(
            "outcome",
            decision_id=record.decision_id,
            seed_id=record.seed_id,
            action=record.action,
            blueprint=record.blueprint,
            epoch=epoch,
            epochs_later=epoch - record.epoch,
            delta_validation_accuracy=validation_accuracy - record.validation_accuracy,
            delta_validation_loss=validation_loss - record.validation_loss,
            param_cost=record.param_cost,
            incident=incident,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "pending": [asdict(r) for r in self.pending],
            "resolved": sorted(self.resolved, key=lambda d: int(d[1:])),
            "next_id": self.next_id,
        }

    def merge_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the pending decisions; ids and resolutions already seen survive."""
        self.resolved |= set(state["resolved"])
        self.next_id = max(self.next_id, state["next_id"])
        self.pending = [
            DecisionRecord(**r) for r in state["pending"] if r["decision_id"] not in self.resolved
        ]


@dataclass
class _OpenPoint:
    seed_id: str
    blueprint: str
    epoch: int
    param_cost: int
    incidents: int = 0


class GrowthLedger:
    """Decision points (:mod:`tolaria.tamiyo.growth`) and the grafts they still await.

    Each point is written once as a ``decision_point`` event with id ``p<n>``; a point that
    grafted stays open until its seed is fossilized or culled, then a ``growth_outcome``
    event closes it with the counterfactual gain, the incidents it was implicated in and
    the epochs it occupied.  Like :class:`DecisionLog`, a restore merges: ids and closed
    points survive it, incident counts only grow, and a point the restored state predates
    (the rollback went back before its graft) is closed as ``rolled_back``.
    """

    def __init__(self, event_sink: EventSink) -> None:
        self._emit = event_sink
        self.open: dict[str, _OpenPoint] = {}
        self.closed: set[str] = set()
        self.next_id = 0
        self.undone: dict[str, _OpenPoint] = {}

    def record(
        self, point: Any, *, epoch: int, observation: Any, **about: Any
    ) -> None:
        """Log ``point`` (a ``GrowthPoint``) taken on ``observation``; ``about``: policy and
        policy_version."""
        point_id = f"p{self.next_id}"
        self.next_id += 1
        self._emit(
            "decision_point",
            epoch=epoch,
            point_id=point_id,
            slot=point.slot,
            observation=observation,
            candidates=tuple(c.to_dict() for c in point.candidates),
            chosen=point.chosen,
            propensity=point.propensity,
            **about,
        )
        if point.chosen:
            graft = point.candidates[point.chosen - 1]
            self.open[point_id] = _OpenPoint(
                graft.seed.seed_id, graft.option.blueprint, epoch, graft.option.param_cost
            )

    def implicate(self, seed_ids: set[str]) -> list[dict[str, str]]:
        """Count an incident against every open graft on ``seed_ids``; return those points
        (``point_id``, ``seed_id``, ``blueprint``): what the incident record names."""
        implicated = []
        for point_id, point in self.open.items():
            if point.seed_id in seed_ids:
                point.incidents += 1
                implicated.append(
                    {"point_id": point_id, "seed_id": point.seed_id, "blueprint": point.blueprint}
                )
        return implicated

    def settle(
        self, seed_id: str, result: str, *, epoch: int, evidence: Mapping[str, float] | None = None
    ) -> None:
        """Close the open point whose graft on ``seed_id`` just ended with ``result``."""
        for point_id, point in list(self.open.items()):
            if point.seed_id == seed_id:
                self._close(point_id, result, epoch, evidence or {})

    def _close(
        self, point_id: str, result: str, epoch: int, evidence: Mapping[str, float]
    ) -> None:
        point = self.open.pop(point_id)
        self.closed.add(point_id)
        self._emit(
            "growth_outcome",
            epoch=epoch,
            point_id=point_id,
            seed_id=point.seed_id,
            blueprint=point.blueprint,
            result=result,
            gain_accuracy=evidence.get("gain_accuracy"),
            gain_loss=evidence.get("gain_loss"),
            param_cost=point.param_cost,
            epochs_occupied=epoch - point.epoch,
            incidents=point.incidents,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "open": {pid: asdict(p) for pid, p in self.open.items()},
            "closed": sorted(self.closed, key=lambda p: int(p[1:])),
            "next_id": self.next_id,
        }

    def restored(self, state: Mapping[str, Any]) -> GrowthLedger:
        """The ledger once ``state`` is restored over this one.  Its ``undone`` points -- open
        here, unknown to ``state``: the rollback went back before their graft -- are closed
        by :meth:`close_undone` when the controller applies the rollback."""
        ledger = GrowthLedger(self._emit)
        ledger.next_id = max(self.next_id, int(state["next_id"]))
        ledger.closed = self.closed | set(state["closed"])
        for point_id, fields in state["open"].items():
            if point_id not in self.closed:
                point = _OpenPoint(**fields)
                live = self.open.get(point_id)
                point.incidents = max(point.incidents, live.incidents if live else 0)
                ledger.open[point_id] = point
        ledger.undone = {
            pid: p for pid, p in self.open.items()
            if pid not in ledger.open and pid not in ledger.closed
        }
        return ledger

    def close_undone(self, epoch: int) -> None:
        for point_id, point in self.undone.items():
            self.open[point_id] = point
            self._close(point_id, "rolled_back", epoch, {})
        self.undone = {}
