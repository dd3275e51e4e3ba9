"""The messages that cross component boundaries, and nothing else.

Every contract is a frozen dataclass that round-trips through JSON, so a packet, a
signal or a telemetry record can be logged, replayed into a controller, or sent to
another rank unchanged.  Components never share mutable state: they exchange these.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


class SeedState(enum.StrEnum):
    """The lifecycle of a Kasmina seed (design §2.1, §4)."""

    DORMANT = "dormant"
    GERMINATED = "germinated"
    TRAINING = "training"
    BLENDING = "blending"
    PROBATIONARY = "probationary"
    FOSSILIZED = "fossilized"
    CULLED = "culled"

    @property
    def is_active(self) -> bool:
        """Holds a blueprint that is still on trial (may be culled)."""
        return self in _ACTIVE

    @property
    def holds_blueprint(self) -> bool:
        return self in _ACTIVE or self is SeedState.FOSSILIZED


_ACTIVE = frozenset(
    {SeedState.GERMINATED, SeedState.TRAINING, SeedState.BLENDING, SeedState.PROBATIONARY}
)

#: The only legal moves.  CULLED is reachable from every active state and returns to
#: DORMANT once its embargo has passed; FOSSILIZED is terminal.
LEGAL_TRANSITIONS: Mapping[SeedState, frozenset[SeedState]] = {
    SeedState.DORMANT: frozenset({SeedState.GERMINATED}),
    SeedState.GERMINATED: frozenset({SeedState.TRAINING, SeedState.CULLED}),
    SeedState.TRAINING: frozenset({SeedState.BLENDING, SeedState.CULLED}),
    SeedState.BLENDING: frozenset({SeedState.PROBATIONARY, SeedState.CULLED}),
    SeedState.PROBATIONARY: frozenset({SeedState.FOSSILIZED, SeedState.CULLED}),
    SeedState.FOSSILIZED: frozenset(),
    SeedState.CULLED: frozenset({SeedState.DORMANT}),
}


class _JsonMixin:
    """``to_dict``/``from_dict`` and ``to_json``/``from_json`` for a frozen dataclass."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Flat records rebuild from their fields; nested ones override this."""
        return cls(**data)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class HardwareContext(_JsonMixin):
    """Where the run is executing and how much memory it uses (design §6.2's hardware_env)."""

    device_type: str
    device_name: str
    cpu_count: int
    process_rss_bytes: int
    system_memory_total_bytes: int
    system_memory_available_bytes: int
    cuda_memory_allocated_bytes: int | None = None
    cuda_memory_reserved_bytes: int | None = None
    cuda_memory_total_bytes: int | None = None


@dataclass(frozen=True)
class SeedTelemetry(_JsonMixin):
    """One epoch of monitoring for one seed's chunk, read off the device once per epoch.

    Statistics are over every element of the chunk in the sampled training batches
    (every ``KasminaConfig.telemetry_interval``-th batch; ``samples`` counts those):
    ``dead_fraction`` counts exact zeros, ``saturated_fraction`` counts magnitudes at or
    above the layer's saturation threshold, ``grad_norm`` is the root-mean-square over
    batches of the L2 norm of the loss gradient reaching the chunk.
    """

    seed_id: str
    epoch: int
    samples: int
    activation_mean: float
    activation_var: float
    dead_fraction: float
    saturated_fraction: float
    grad_norm: float
    #: RMS of a TRAINING seed's delta over the RMS of its layer's output this epoch
    #: (None when the seed did not train).
    delta_ratio: float | None = None


@dataclass(frozen=True)
class EvalMetrics(_JsonMixin):
    """One evaluation pass: the loss, the score and every configured metric by name.

    ``accuracy`` is the design's name for the score: the task's monitor, oriented so that
    higher is better -- classification accuracy by default, ``r2`` for regression, the
    negation of a monitor where lower is better (``-mse``).  See ``tolaria.task``.
    """

    loss: float
    accuracy: float
    #: Every configured metric by its label, as measured (``{"mse": 0.12, "r2": 0.87}``).
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SystemStatePacket(_JsonMixin):
    """Everything Tamiyo sees at an epoch boundary (design §2, Figure 1).

    ``validation_accuracy`` is the score of :class:`EvalMetrics` (the task's monitor, higher
    is better); ``validation_metrics`` carries every configured metric beside it.
    ``counterfactual`` maps a seed id to the validation metrics measured with that
    seed's alpha forced to 0: the seed's contribution is the difference to the
    packet's own validation metrics.  Tolaria measures it for the seeds the controller
    asks about (``TamiyoController.seeds_to_evaluate``).
    """

    current_epoch: int
    global_step: int
    training_loss: float
    validation_loss: float
    validation_accuracy: float
    hardware_context: HardwareContext
    health_map: Mapping[str, SeedTelemetry] = field(default_factory=dict)
    seed_states: Mapping[str, SeedState] = field(default_factory=dict)
    counterfactual: Mapping[str, EvalMetrics] = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)
    validation_metrics: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["seed_states"] = {k: v.value for k, v in self.seed_states.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SystemStatePacket:
        return cls(
            current_epoch=data["current_epoch"],
            global_step=data["global_step"],
            training_loss=data["training_loss"],
            validation_loss=data["validation_loss"],
            validation_accuracy=data["validation_accuracy"],
            hardware_context=HardwareContext.from_dict(data["hardware_context"]),
            health_map={k: SeedTelemetry.from_dict(v) for k, v in data["health_map"].items()},
            seed_states={k: SeedState(v) for k, v in data["seed_states"].items()},
            counterfactual={k: EvalMetrics.from_dict(v) for k, v in data["counterfactual"].items()},
            timestamp=data["timestamp"],
            # Packets logged before the named metrics existed have none.
            validation_metrics=dict(data.get("validation_metrics", {})),
        )


@dataclass(frozen=True)
class _StateChange(_JsonMixin):
    """A ``from_state`` -> ``to_state`` move, why, and the blueprint involved; JSON for it.

    Each record puts its own first field (who or when) before these.  Dataclasses collect
    fields from the bases in reverse MRO order, so a record lists ``_StateChange`` first and
    its first field's base last: ``class Record(_StateChange, _FirstField)``.
    """

    from_state: SeedState
    to_state: SeedState
    reason: str
    blueprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["from_state"] = self.from_state.value
        data["to_state"] = self.to_state.value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        moves = {key: SeedState(data[key]) for key in ("from_state", "to_state")}
        return cls(**{**data, **moves})


@dataclass(frozen=True)
class _OfSeed:
    seed_id: str


@dataclass(frozen=True)
class _AtEpoch:
    epoch: int


@dataclass(frozen=True)
class Adaptation(_StateChange, _OfSeed):
    """One command Tamiyo issued to one seed this epoch, and why."""


@dataclass(frozen=True)
class TransitionRecord(_StateChange, _AtEpoch):
    """One move in a seed's own history; ``blueprint`` is the one held when it happened."""


@dataclass(frozen=True)
class AdaptationSignal(_JsonMixin):
    """What ``tamiyo.step`` returns to Tolaria (design §2 step 3-4)."""

    optimizer_rebuild_required: bool = False
    emergency_rollback_required: bool = False
    reason: str = ""
    adaptations: tuple[Adaptation, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["adaptations"] = [a.to_dict() for a in self.adaptations]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdaptationSignal:
        return cls(
            optimizer_rebuild_required=data["optimizer_rebuild_required"],
            emergency_rollback_required=data["emergency_rollback_required"],
            reason=data["reason"],
            adaptations=tuple(Adaptation.from_dict(a) for a in data["adaptations"]),
        )
