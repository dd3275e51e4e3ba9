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

from collections.abc import Callable
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
