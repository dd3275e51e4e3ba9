"""Emergency detection, incident memory and the decision log, on their own."""

from __future__ import annotations

import math

import pytest

from packets import make_packet
from tolaria.contracts import SystemStatePacket
from tolaria.tamiyo import ChanceLevel, DecisionLog, Emergency, EmergencyDetector, IncidentMemory


def packet(epoch, loss, acc=0.5, training_loss=None) -> SystemStatePacket:
    return make_packet(epoch, loss, acc, training_loss=training_loss)


def detector(**overrides) -> EmergencyDetector:
    settings = dict(
        chance=ChanceLevel.of_classes(10),
        collapse_margin=0.02,
        chance_loss_factor=3.0,
        divergence_factor=3.0,
        divergence_epochs=1,
        divergence_window=5,
        divergence_loss_floor=0.05,
    )
    settings.update(overrides)
    return EmergencyDetector(**settings)


@pytest.mark.parametrize("field", ["training_loss", "loss"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_loss_is_an_emergency(field, bad):
    d = detector()
    assert d.check(packet(0, 1.0)) is None
    kwargs = {"loss": 1.0, field: bad}
    emergency = d.check(packet(1, **kwargs))
    assert emergency is not None
    assert emergency.kind == "nonfinite_loss" and emergency.key == "nonfinite_loss@1"


def test_divergence_must_be_sustained_for_the_configured_epochs():
    d = detector(divergence_epochs=2)
    for epoch, loss in enumerate([2.0, 1.0, 1.1]):
        assert d.check(packet(epoch, loss)) is None
    assert d.check(packet(3, 3.5)) is None  # one spike: tolerated
    assert d.check(packet(4, 1.2)) is None  # recovered: the count restarts
    assert d.check(packet(5, 3.5)) is None
    emergency = d.check(packet(6, 4.0))
    assert emergency is not None and emergency.kind == "divergence"
    assert "3.0 x recent best 1" in emergency.reason


def test_divergence_reference_is_the_recent_window_only():
    d = detector(divergence_window=2)
    for epoch, loss in enumerate([0.4, 1.0, 1.0]):
        assert d.check(packet(epoch, loss)) is None
    # 0.4 has left the window: 2.5 is < 3 x 1.0 (but > 3 x 0.4).
    assert d.check(packet(3, 2.5)) is None


def test_a_fitted_model_does_not_diverge_below_the_loss_floor():
    d = detector()
    for epoch, loss in enumerate([1e-3, 2e-5, 1e-5]):
        assert d.check(packet(epoch, loss, acc=1.0)) is None
    assert d.check(packet(3, 4e-4, acc=1.0)) is None  # 40 x best, but < 3 x floor
    emergency = d.check(packet(4, 0.2, acc=0.9))  # > 3 x floor 0.05
    assert emergency is not None and "recent best 0.05" in emergency.reason


def test_collapse_to_chance_only_after_learning():
    d = detector()
    assert d.check(packet(0, 2.3, acc=0.1)) is None  # never learned yet: not a collapse
    assert d.check(packet(1, 1.0, acc=0.6)) is None
    emergency = d.check(packet(2, 1.1, acc=0.11))
    assert emergency is not None and emergency.kind == "collapse"
    assert d.check(packet(2, 1.1, acc=0.13)) is None  # above chance + margin


def test_detector_state_round_trip():
    d = detector(divergence_epochs=2)
    for epoch, loss in enumerate([1.0, 0.9, 3.0]):  # one spike already counted
        assert d.check(packet(epoch, loss, acc=0.6)) is None
    clone = detector(divergence_epochs=2)
    clone.load_state_dict(d.state_dict())
    assert clone.state_dict() == d.state_dict()
    # The clone remembers the pending spike: one more makes a divergence, for both.
    assert clone.check(packet(3, 3.0)) == d.check(packet(3, 3.0))
    assert clone.check(packet(4, 3.0)) is not None


def test_incident_memory_counts_and_merges_without_forgetting():
    memory = IncidentMemory()
    nan = Emergency("nonfinite_loss", 7, "loss is nan")
    assert memory.record(nan, [("h.0", "residual_mlp")]) == 1
    older = IncidentMemory().state_dict()  # a snapshot taken before the incident
    memory.merge_state_dict(older)
    assert memory.record(nan, []) == 2
    assert memory.is_forbidden("h.0", "residual_mlp")
    assert not memory.is_forbidden("h.0", "low_rank")
    assert not memory.is_forbidden("h.0", None)
    restored = IncidentMemory()
    restored.merge_state_dict(memory.state_dict())
    assert restored.state_dict() == memory.state_dict()


class Sink:
    def __init__(self):
        self.events = []

    def __call__(self, kind, **fields):
        self.events.append((kind, fields))

    def of(self, kind):
        return [f for k, f in self.events if k == kind]


def record(log, epoch, seed_id="h.0", acc=0.5, loss=1.0):
    return log.record(
        epoch=epoch, seed_id=seed_id, action="germinated", blueprint="low_rank",
        reason="plateau", validation_loss=loss, validation_accuracy=acc, param_cost=40,
        features={"training_loss": loss},
    )


def test_decision_outcome_written_once_after_the_horizon():
    sink = Sink()
    log = DecisionLog(sink, outcome_horizon=3)
    first = record(log, epoch=2)
    assert sink.of("decision")[0]["decision_id"] == first.decision_id == "d0"
    assert sink.of("decision")[0]["features"] == {"training_loss": 1.0}
    log.resolve_due(4, 0.9, 0.55)
    assert sink.of("outcome") == []
    log.resolve_due(5, 0.8, 0.6)
    log.resolve_due(6, 0.7, 0.65)
    (outcome,) = sink.of("outcome")
    assert outcome["decision_id"] == "d0" and outcome["epochs_later"] == 3
    assert outcome["delta_validation_accuracy"] == pytest.approx(0.1)
    assert outcome["delta_validation_loss"] == pytest.approx(-0.2)
    assert outcome["param_cost"] == 40 and outcome["incident"] is None


def test_rollback_merge_never_reuses_ids_or_repeats_outcomes():
    sink = Sink()
    log = DecisionLog(sink, outcome_horizon=5)
    record(log, epoch=1)
    snapshot = log.state_dict()  # d0 pending
    record(log, epoch=3, seed_id="h.1")
    suspects = log.implicate(4, lookback=1, incident="divergence@4", validation_loss=9.0,
                             validation_accuracy=0.1)
    assert [s.decision_id for s in suspects] == ["d1"]
    assert sink.of("outcome")[0]["incident"] == "divergence@4"
    log.merge_state_dict(snapshot)
    assert [r.decision_id for r in log.pending] == ["d0"]
    assert record(log, epoch=4).decision_id == "d2"
    # A snapshot that still had the implicated decision pending does not resurrect it.
    log.merge_state_dict({**snapshot, "pending": [*snapshot["pending"], suspects[0].__dict__]})
    assert [r.decision_id for r in log.pending] == ["d0"]
