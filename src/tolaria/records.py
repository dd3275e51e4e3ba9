"""Event records: one frozen contract per :class:`~tolaria.events.Event`, and their JSON.

Callbacks receive these; the run directory writes the ``logged`` ones to ``events.jsonl``
and :class:`EpochEnd` to ``metrics.jsonl`` (schema: ``docs/events.md``).  Every line is
strict JSON: ``{"schema": SCHEMA_VERSION, "event": <kind>, ...fields}``.  JSON has no NaN
or infinity, so a non-finite number is written as ``null`` and its dotted path listed in
``"nonfinite"`` with its value (``"nan"``, ``"inf"``, ``"-inf"``); :func:`decode` puts it
back.  ``attempt`` counts the runs of one epoch: a rollback re-runs epochs, and for each
epoch the line with the highest attempt is the one the run kept.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from tolaria.contracts import AdaptationSignal, EvalMetrics, SeedState, SystemStatePacket
from tolaria.errors import TolariaError
from tolaria.events import Event

SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class EventRecord:
    kind: ClassVar[Event]
    #: Written to ``events.jsonl``; the others live only in the process (or in metrics).
    logged: ClassVar[bool] = True

    epoch: int
    attempt: int = 1

    def to_dict(self) -> dict[str, Any]:
        body = {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
        return {"schema": SCHEMA_VERSION, "event": self.kind.value, **body}


# -- run -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RunStart(EventRecord):
    kind = Event.RUN_START
    epochs: int
    params: int
    device: str


@dataclass(frozen=True, kw_only=True)
class RunEnd(EventRecord):
    kind = Event.RUN_END
    status: str  # completed | failed | interrupted
    error: str | None
    summary: Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class Resume(EventRecord):
    kind = Event.RESUME
    checkpoint_epoch: int


# -- one epoch -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EpochStart(EventRecord):
    kind = Event.EPOCH_START
    logged = False
    batches: int


@dataclass(frozen=True, kw_only=True)
class BatchEnd(EventRecord):
    """``loss`` stays a device tensor: reading it would be a host sync per batch."""

    kind = Event.BATCH_END
    logged = False
    batch: int
    global_step: int
    loss: Any


@dataclass(frozen=True, kw_only=True)
class TrainEnd(EventRecord):
    kind = Event.TRAIN_END
    logged = False
    training_loss: float


@dataclass(frozen=True, kw_only=True)
class ValidationEnd(EventRecord):
    kind = Event.VALIDATION_END
    logged = False
    validation: EvalMetrics
    counterfactual: Mapping[str, EvalMetrics]


@dataclass(frozen=True, kw_only=True)
class PacketAssembled(EventRecord):
    kind = Event.PACKET_ASSEMBLED
    logged = False
    packet: SystemStatePacket


@dataclass(frozen=True, kw_only=True)
class SignalReceived(EventRecord):
    kind = Event.SIGNAL_RECEIVED
    logged = False
    signal: AdaptationSignal


@dataclass(frozen=True, kw_only=True)
class EpochEnd(EventRecord):
    """One line of ``metrics.jsonl``: the epoch as it ended (``rollback``: it was undone)."""

    kind = Event.EPOCH_END
    logged = False
    global_step: int
    train_loss: float
    val_loss: float
    #: The task's score (``EvalMetrics.accuracy``: the monitor, higher is better).
    val_accuracy: float
    lr: float
    params: int
    #: After this epoch's decisions: what the next epoch trains with.
    seed_states: Mapping[str, SeedState]
    adaptations: int
    rollback: bool
    #: Every configured metric by its label (``tolaria.task``).
    val_metrics: Mapping[str, float] = field(default_factory=dict)


# -- Tamiyo's decision log and incident memory ---------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DecisionLogged(EventRecord):
    kind = Event.DECISION
    decision_id: str
    seed_id: str
    action: str
    blueprint: str | None
    reason: str
    validation_loss: float
    validation_accuracy: float
    param_cost: int
    #: What the decision saw: packet features, the seed's telemetry, the policy's evidence.
    features: Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class Outcome(EventRecord):
    kind = Event.OUTCOME
    decision_id: str
    seed_id: str
    action: str
    blueprint: str | None
    epochs_later: int
    delta_validation_accuracy: float
    delta_validation_loss: float
    param_cost: int
    #: The incident that closed the decision early, if one did.
    incident: str | None


@dataclass(frozen=True, kw_only=True)
class Incident(EventRecord):
    kind = Event.INCIDENT
    emergency: str
    key: str
    reason: str
    count: int
    suspect_decisions: list[str]
    forbidden: list[list[str]]
    #: The decision points whose open graft this incident implicates (``point_id``,
    #: ``seed_id``, ``blueprint``): what auto-revert blames a policy version for.
    implicated_points: list[Mapping[str, str]]


@dataclass(frozen=True, kw_only=True)
class GerminationFailed(EventRecord):
    kind = Event.GERMINATION_FAILED
    seed_id: str
    blueprint: str
    error: str


@dataclass(frozen=True, kw_only=True)
class DecisionPoint(EventRecord):
    """An epoch end where growth was possible, and what the policy chose (waits included):
    the replay buffer's row (:mod:`tolaria.tamiyo.growth`).  Not in ``events.jsonl``: the
    raw observation is kilobytes, and ``replay.sqlite`` keeps it."""

    kind = Event.DECISION_POINT
    logged = False
    #: ``p<n>``, unique for the run: ids survive a rollback, so none is used twice.
    point_id: str
    slot: int
    policy: str
    policy_version: str | None
    #: The ``Observation`` the policy decided on: it becomes JSON (``to_dict``) only when a
    #: listener writes the record, so a run nobody records pays nothing for it.
    observation: Any
    #: ``{seed_id, blueprint, param_cost, penalty, forbidden, kind, receptive_field}``.
    candidates: tuple[Mapping[str, Any], ...]
    #: 0: wait; i: ``candidates[i - 1]``.
    chosen: int
    propensity: float | None


@dataclass(frozen=True, kw_only=True)
class GrowthOutcome(EventRecord):
    """What came of a decision point's graft, once settled."""

    kind = Event.GROWTH_OUTCOME
    point_id: str
    seed_id: str
    blueprint: str
    #: ``fossilized``, ``culled``, ``germination_failed``, or ``rolled_back`` (a rollback
    #: went back to before the graft).
    result: str
    #: The counterfactual gain at judgement (None: settled before it was measured).
    gain_accuracy: float | None
    gain_loss: float | None
    param_cost: int
    epochs_occupied: int
    incidents: int


# -- acting on the signal ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AdaptationApplied(EventRecord):
    """One seed command (from ``tamiyo.step``, or from ``on_rollback``'s culls)."""

    kind = Event.ADAPTATION
    seed_id: str
    from_state: SeedState
    to_state: SeedState
    reason: str
    blueprint: str | None


@dataclass(frozen=True, kw_only=True)
class Rollback(EventRecord):
    kind = Event.ROLLBACK
    restored_epoch: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class OptimizerRebuild(EventRecord):
    kind = Event.OPTIMIZER_REBUILD
    parameters_trained: int


@dataclass(frozen=True, kw_only=True)
class CheckpointSaved(EventRecord):
    kind = Event.CHECKPOINT_SAVED
    path: str


#: The records Tamiyo's event sink produces, by the kind it names.
CONTROLLER_RECORDS: Mapping[str, type[EventRecord]] = {
    r.kind.value: r
    for r in (DecisionLogged, Outcome, Incident, GerminationFailed, DecisionPoint, GrowthOutcome)
}


# -- JSON ------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Contracts, enums and containers as JSON-able Python values (floats untouched)."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def encode(data: Mapping[str, Any], *, indent: int | None = None) -> str:
    """Strict JSON (one line unless ``indent``); non-finite floats become ``null``, listed
    with their value in ``"nonfinite"``."""
    nonfinite: dict[str, str] = {}

    def finite(value: Any, path: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            nonfinite[path] = str(value)
            return None
        if isinstance(value, Mapping):
            return {str(k): finite(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [finite(v, f"{path}.{i}") for i, v in enumerate(value)]
        return value

    body = finite(_plain(data), "")
    if nonfinite:
        body["nonfinite"] = nonfinite
    return json.dumps(body, sort_keys=True, allow_nan=False, indent=indent)


def decode(line: str) -> dict[str, Any]:
    """Inverse of :func:`encode`; a record of a newer schema is refused in one line."""
    data = json.loads(line)
    schema = data.get("schema", SCHEMA_VERSION)
    if not isinstance(schema, int) or schema > SCHEMA_VERSION:
        raise TolariaError(
            f"record schema {schema!r} is newer than this Tolaria reads ({SCHEMA_VERSION})"
        )
    for path, value in data.pop("nonfinite", {}).items():
        *parents, leaf = path.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(leaf)] = float(value)
        else:
            node[leaf] = float(value)
    return data

