"""Scripted scenarios: a real host with real Kasmina seeds, packets written by the test."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from packets import make_packet
from tolaria.config import KasminaConfig, TamiyoConfig
from tolaria.contracts import EvalMetrics, SeedState
from tolaria.errors import ConfigError, RepeatedFailureError
from tolaria.kasmina import (
    Blueprint,
    export_structure,
    find_seeds,
    inject_seeds,
    register_blueprint,
    replay_structure,
    seed_parameter_names,
    unregister_blueprint,
)
from tolaria.tamiyo import TamiyoController

KASMINA = KasminaConfig(layers=["hidden.*"], chunks=4, blend_epochs=2, embargo_epochs=1)
DEAD_CHUNK = "hidden.0.2"


class Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.ModuleList([nn.Sequential(nn.Linear(6, 16), nn.ReLU())])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden[0](x))


def tamiyo_config(**overrides) -> TamiyoConfig:
    """The settings these scenarios rely on, spelled out (the tuned defaults may move)."""
    settings = dict(
        plateau_patience=2,
        plateau_min_improvement=1e-3,
        max_active_seeds=2,
        max_germinations_per_epoch=1,
        min_training_epochs=3,
        probation_epochs=1,
        blueprints=["residual_mlp", "low_rank"],
        param_budget_fraction=1.0,
    )
    return TamiyoConfig(**{**settings, **overrides})


class Rig:
    """A host, its seeds, a controller and an event recorder, driven epoch by epoch."""

    def __init__(self, tamiyo: TamiyoConfig | None = None) -> None:
        torch.manual_seed(0)
        self.model = Host()
        with torch.no_grad():  # chunk 2 (units 8..11) never fires: the least healthy place
            self.model.hidden[0][0].bias[8:12] = -100.0
        host_parameters = sum(p.numel() for p in self.model.parameters())
        inject_seeds(self.model, KASMINA)
        self.events: list[tuple[str, dict]] = []
        self.controller = TamiyoController(
            tamiyo or tamiyo_config(),
            KASMINA,
            num_classes=3,
            host_parameters=host_parameters,
            event_sink=lambda kind, **fields: self.events.append((kind, fields)),
        )
        for seed in find_seeds(self.model):
            self.controller.register_seed(seed)
        self.data = torch.Generator().manual_seed(1)

    def seed(self, seed_id: str):
        return next(s for s in find_seeds(self.model) if s.seed_id == seed_id)

    def epoch(self, epoch, loss=1.0, acc=0.6, training_loss=None, ablated=None):
        """One epoch: a training batch (telemetry), the boundary, a packet, a step.

        ``ablated(seed_id) -> EvalMetrics`` scripts each counterfactual Tamiyo asks for.
        """
        self.model.train()
        x = torch.randn(32, 6, generator=self.data)
        y = torch.randint(0, 3, (32,), generator=self.data)
        nn.functional.cross_entropy(self.model(x), y).backward()
        self.model.zero_grad()
        self.controller.on_epoch_boundary(epoch)
        asked = self.controller.seeds_to_evaluate() if ablated else []
        counterfactual = {seed_id: ablated(seed_id) for seed_id in asked}
        packet = make_packet(
            epoch,
            loss,
            acc,
            training_loss=training_loss,
            health_map=self.controller.health_map,
            seed_states=self.controller.seed_states,
            counterfactual=counterfactual,
        )
        return self.controller.step(packet)

    def of(self, kind):
        return [fields for k, fields in self.events if k == kind]


HELPS = lambda seed_id: EvalMetrics(loss=1.2, accuracy=0.5)  # noqa: E731  alpha=0 is worse
HURTS = lambda seed_id: EvalMetrics(loss=0.8, accuracy=0.7)  # noqa: E731  alpha=0 is better


def test_plateau_leads_to_germination_at_the_least_healthy_location():
    rig = Rig(tamiyo_config(plateau_patience=2))
    assert rig.epoch(0).adaptations == ()
    assert rig.controller.health_map[DEAD_CHUNK].dead_fraction == 1.0
    assert rig.controller.health_map["hidden.0.0"].dead_fraction < 1.0
    assert rig.epoch(1).adaptations == ()  # one flat epoch: not yet a plateau
    signal = rig.epoch(2)
    assert [(a.seed_id, a.to_state, a.blueprint) for a in signal.adaptations] == [
        (DEAD_CHUNK, SeedState.GERMINATED, "residual_mlp"),
        (DEAD_CHUNK, SeedState.TRAINING, "residual_mlp"),
    ]
    assert signal.optimizer_rebuild_required
    assert rig.seed(DEAD_CHUNK).state is SeedState.TRAINING
    (decision, _) = rig.of("decision")
    assert decision["features"]["telemetry"]["dead_fraction"] == 1.0
    assert decision["features"]["evidence"]["epochs_since_improvement"] == 2
    assert "plateau" in decision["reason"]


def grow_to_probation(rig: Rig) -> int:
    """Germinate (plateau), train, blend; returns the epoch the seed became PROBATIONARY."""
    for epoch in range(20):
        rig.epoch(epoch)
        if rig.seed(DEAD_CHUNK).state is SeedState.PROBATIONARY:
            return epoch
    raise AssertionError("the seed never reached probation")


def test_seed_that_helps_is_fossilized_after_its_full_trial():
    rig = Rig(tamiyo_config(plateau_patience=2, min_training_epochs=3, max_active_seeds=1))
    probation_epoch = grow_to_probation(rig)
    seed = rig.seed(DEAD_CHUNK)
    # germinated at 2, trained 3..5, blended 6 (alpha 1/2), probation (alpha 1) from 7
    assert [(r.epoch, r.to_state) for r in seed.history] == [
        (2, SeedState.GERMINATED),
        (2, SeedState.TRAINING),
        (5, SeedState.BLENDING),
        (6, SeedState.PROBATIONARY),
    ]
    assert rig.controller.seeds_to_evaluate() == [DEAD_CHUNK]
    signal = rig.epoch(probation_epoch + 1, loss=0.9, acc=0.65, ablated=HELPS)
    assert seed.state is SeedState.FOSSILIZED
    assert signal.optimizer_rebuild_required  # its parameters now belong to the host
    assert "helps" in signal.adaptations[0].reason
    assert rig.of("decision")[-1]["features"]["evidence"] == pytest.approx(
        {"gain_accuracy": 0.15, "gain_loss": 0.3}
    )


def test_seed_that_hurts_is_culled_and_its_graft_penalised():
    rig = Rig(tamiyo_config(plateau_patience=2, max_active_seeds=1, cull_penalty=5.0))
    probation_epoch = grow_to_probation(rig)
    signal = rig.epoch(probation_epoch + 1, ablated=HURTS)
    seed = rig.seed(DEAD_CHUNK)
    assert seed.state is SeedState.CULLED and seed.param_count() == 0
    assert signal.optimizer_rebuild_required
    assert rig.controller.penalties == {(DEAD_CHUNK, "residual_mlp"): 5.0}
    # The freed slot is refilled elsewhere, and the penalised pair is not replayed
    # once the culled seed's embargo is over.
    grafts = [
        (a.seed_id, a.blueprint)
        for a in signal.adaptations
        if a.to_state is SeedState.GERMINATED
    ]
    for epoch in range(probation_epoch + 2, probation_epoch + 20):
        verdict = HURTS if epoch % 2 else HELPS
        grafts += [
            (a.seed_id, a.blueprint)
            for a in rig.epoch(epoch, ablated=verdict).adaptations
            if a.to_state is SeedState.GERMINATED
        ]
    assert grafts[0][0] != DEAD_CHUNK
    # The sick location is grown again, with the other blueprint.
    assert (DEAD_CHUNK, "low_rank") in grafts and (DEAD_CHUNK, "residual_mlp") not in grafts


def test_optimizer_rebuild_flag_is_exactly_a_change_of_trainable_parameters():
    rig = Rig(tamiyo_config(plateau_patience=1, max_active_seeds=2, min_training_epochs=1))

    def trainable():
        names = {n for n, p in rig.model.named_parameters() if p.requires_grad}
        return names, seed_parameter_names(rig.model)

    flags = []
    for epoch in range(16):
        before = trainable()
        verdict = HELPS if epoch % 2 else HURTS  # a mix of fossilizations and culls
        signal = rig.epoch(epoch, ablated=verdict)
        assert signal.optimizer_rebuild_required == (trainable() != before), epoch
        flags.append(signal.optimizer_rebuild_required)
    actions = {a["action"] for a in rig.of("decision")}
    assert {"germinated", "blending", "fossilized", "culled"} <= actions
    assert True in flags and False in flags


def test_nan_loss_requests_a_rollback_and_touches_no_seed():
    rig = Rig()
    rig.epoch(0)
    states = rig.controller.seed_states
    signal = rig.epoch(1, training_loss=math.nan)
    assert signal.emergency_rollback_required and not signal.optimizer_rebuild_required
    assert signal.reason.startswith("nonfinite_loss at epoch 1")
    assert signal.adaptations == ()
    assert rig.controller.seed_states == states
    (incident,) = rig.of("incident")
    assert incident["key"] == "nonfinite_loss@1" and incident["count"] == 1


def snapshot(rig: Rig) -> dict:
    """What a checkpoint holds of the model and the controller, through JSON."""
    return {
        "structure": json.loads(json.dumps(export_structure(rig.model))),
        "tensors": {k: v.clone() for k, v in rig.model.state_dict().items()},
        "tamiyo": json.loads(json.dumps(rig.controller.save_state_dict())),
    }


def restore(rig: Rig, snap: dict) -> None:
    replay_structure(rig.model, snap["structure"])
    rig.model.load_state_dict(snap["tensors"])
    rig.controller.load_state_dict(snap["tamiyo"])


def test_repeated_failure_stops_the_run_with_a_clear_error():
    rig = Rig(tamiyo_config(max_repeated_failures=3))
    rig.epoch(0)
    saved = snapshot(rig)
    for _ in range(2):  # roll back, replay, fail again at the same epoch
        assert rig.epoch(1, loss=math.inf).emergency_rollback_required
        restore(rig, saved)
    with pytest.raises(RepeatedFailureError) as failure:
        rig.epoch(1, loss=math.inf)
    message = str(failure.value)
    assert "nonfinite_loss at epoch 1 happened 3 times" in message
    assert "max_repeated_failures=3" in message and "training loss is inf" in message
    assert [i["count"] for i in rig.of("incident")] == [1, 2, 3]


def test_incident_memory_survives_rollback_and_the_suspect_graft_is_not_replayed():
    rig = Rig(tamiyo_config(plateau_patience=2, min_training_epochs=5, incident_lookback_epochs=3))
    for epoch in range(4):
        rig.epoch(epoch)  # grafts residual_mlp at the dead chunk at epoch 2
    assert rig.seed(DEAD_CHUNK).state is SeedState.TRAINING
    saved = snapshot(rig)  # end of epoch 3, the graft in place
    signal = rig.epoch(4, loss=10.0)  # divergence: > 3 x recent best
    assert signal.emergency_rollback_required and "divergence" in signal.reason
    incident = rig.of("incident")[0]
    assert [DEAD_CHUNK, "residual_mlp"] in incident["forbidden"]
    suspects = {o["decision_id"] for o in rig.of("outcome") if o["incident"] == "divergence@4"}
    assert suspects == set(incident["suspect_decisions"]) and suspects

    restore(rig, saved)  # the older state knows nothing of the incident...
    signal = rig.epoch(4)
    culled = [a for a in signal.adaptations if a.to_state is SeedState.CULLED]
    assert [(a.seed_id, a.blueprint) for a in culled] == [(DEAD_CHUNK, "residual_mlp")]
    assert "incident" in culled[0].reason  # ...but the merged memory does
    for epoch in range(5, 15):
        for a in rig.epoch(epoch).adaptations:
            assert (a.seed_id, a.blueprint) != (DEAD_CHUNK, "residual_mlp"), epoch


def test_save_load_round_trip_gives_identical_subsequent_decisions():
    config = tamiyo_config(plateau_patience=1, min_training_epochs=2, max_active_seeds=2)
    original = Rig(config)
    script = [
        dict(loss=1.0 - 0.01 * (e % 3), acc=0.6, ablated=HELPS if e % 3 else HURTS)
        for e in range(18)
    ]
    for epoch in range(6):
        original.epoch(epoch, **script[epoch])
    saved = snapshot(original)

    resumed = Rig(config)
    restore(resumed, saved)
    assert resumed.controller.save_state_dict() == original.controller.save_state_dict()
    resumed.data.set_state(original.data.get_state())  # same batches -> same telemetry
    mark = len(original.events)
    for epoch in range(6, 18):
        a = original.epoch(epoch, **script[epoch])
        b = resumed.epoch(epoch, **script[epoch])
        assert a == b, epoch
    assert original.events[mark:] == resumed.events
    assert any(kind == "outcome" for kind, _ in resumed.events)
    assert resumed.controller.save_state_dict() == original.controller.save_state_dict()


class WrongShape(Blueprint):
    """Grows the chunk by one channel: germination must refuse it."""

    name = "wrong_shape"

    def build(self, chunk_shape, **kwargs):
        return nn.Linear(chunk_shape[0], chunk_shape[0] + 1)

    def param_cost(self, chunk_shape, **kwargs):
        return 1


def test_failed_germination_is_logged_penalised_and_the_seed_stays_dormant():
    register_blueprint(WrongShape(), replace=True)
    try:
        rig = Rig(tamiyo_config(plateau_patience=2, blueprints=["wrong_shape", "low_rank"]))
        for epoch in range(3):
            signal = rig.epoch(epoch)
        assert signal.adaptations == () and not signal.optimizer_rebuild_required
        assert rig.seed(DEAD_CHUNK).state is SeedState.DORMANT
        (failure,) = rig.of("germination_failed")
        assert failure["seed_id"] == DEAD_CHUNK and "shape" in failure["error"]
        assert rig.controller.penalties == {(DEAD_CHUNK, "wrong_shape"): 1.0}
        signal = rig.epoch(3)  # still a plateau: the next best graft is tried
        assert signal.adaptations[0].blueprint == "low_rank"
    finally:
        unregister_blueprint("wrong_shape")


def test_configuration_mistakes_are_named():
    with pytest.raises(ConfigError, match="unknown blueprint"):
        Rig(tamiyo_config(blueprints=["no_such_blueprint"]))
    rig = Rig(tamiyo_config(plateau_patience=1, blueprint_kwargs={"residual_mlp": {"bogus": 1}}))
    with pytest.raises(ConfigError, match=r"tamiyo\.blueprint_kwargs\.residual_mlp"):
        rig.epoch(0)
