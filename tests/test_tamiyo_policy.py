"""HeuristicPolicy as a pure function of an Observation (no seeds, no model)."""

from __future__ import annotations

import pytest

from packets import make_packet
from tolaria.config import TamiyoConfig
from tolaria.contracts import (
    EvalMetrics,
    SeedState,
    SeedTelemetry,
    SystemStatePacket,
)
from tolaria.errors import ConfigError
from tolaria.tamiyo import GraftOption, HeuristicPolicy, Observation, SeedView, make_policy

OPTIONS = (GraftOption("residual_mlp", 100), GraftOption("low_rank", 20))


def config(**overrides) -> TamiyoConfig:
    """The settings these tests rely on, spelled out (the tuned defaults may move)."""
    settings = dict(
        plateau_patience=2,
        max_active_seeds=2,
        max_germinations_per_epoch=1,
        min_training_epochs=3,
        probation_epochs=1,
        min_epochs_before_growth=0,
        fossilize_min_gain=0.0,
        fossilize_min_loss_gain=1e-3,
    )
    return TamiyoConfig(**{**settings, **overrides})


def telemetry(seed_id: str, dead=0.0, saturated=0.0, grad=1.0) -> SeedTelemetry:
    return SeedTelemetry(seed_id, 0, 10, 0.5, 0.1, dead, saturated, grad)


def packet(epoch=5, acc=0.7, loss=0.9, counterfactual=None) -> SystemStatePacket:
    return make_packet(epoch, loss, acc, counterfactual=counterfactual or {})


def dormant(seed_id, tel=None, options=OPTIONS) -> SeedView:
    return SeedView(seed_id, SeedState.DORMANT, 4, 0.0, None, 0, tel, options)


def on_trial(seed_id, state, epochs=1, alpha=0.0, implicated=False) -> SeedView:
    return SeedView(seed_id, state, epochs, alpha, "low_rank", 20, None, (), implicated)


def observe(seeds, budget=1000, **packet_kwargs) -> Observation:
    return Observation(packet(**packet_kwargs), tuple(seeds), budget)


def decide(policy: HeuristicPolicy, seeds, plateau=2, **kwargs):
    """``policy.decide`` once ``plateau`` epochs passed without improvement (its memory)."""
    if plateau:  # the packet's loss (0.9) does not beat 0.0: one more flat epoch
        policy.load_state_dict(
            {"best_validation_loss": 0.0, "epochs_since_improvement": plateau - 1}
        )
    return policy.decide(observe(seeds, **kwargs))


def test_plateau_germinates_least_healthy_location_then_trains_it():
    policy = HeuristicPolicy(config())
    seeds = [
        dormant("a.0", telemetry("a.0", dead=0.1, grad=1.0)),
        dormant("a.1", telemetry("a.1", dead=0.8, grad=0.5)),
        dormant("a.2", telemetry("a.2", dead=0.0, saturated=0.2, grad=0.9)),
    ]
    decisions = decide(policy, seeds)
    assert [(d.seed_id, d.to_state, d.blueprint) for d in decisions] == [
        ("a.1", SeedState.GERMINATED, "residual_mlp"),
        ("a.1", SeedState.TRAINING, "residual_mlp"),
    ]
    # unhealthiness = dead + saturated + grad / max grad = 0.8 + 0 + 0.5
    assert decisions[0].evidence["score"] == pytest.approx(1.3)


def test_no_growth_without_plateau_or_before_min_epoch():
    seeds = [dormant("a.0", telemetry("a.0"))]
    assert decide(HeuristicPolicy(config(plateau_patience=3)), seeds) == []
    late = config(min_epochs_before_growth=6)
    assert decide(HeuristicPolicy(late), seeds, epoch=5) == []
    assert decide(HeuristicPolicy(late), seeds, epoch=6) != []


def test_ties_go_to_registration_order_and_blueprint_preference():
    same = [dormant(f"a.{i}", telemetry(f"a.{i}")) for i in (3, 1, 2)]
    decisions = decide(HeuristicPolicy(config()), same)
    assert (decisions[0].seed_id, decisions[0].blueprint) == ("a.3", "residual_mlp")


def test_budget_active_limit_and_forbidden_graft_are_respected():
    policy = HeuristicPolicy(config(max_active_seeds=2))
    sick = dormant("a.0", telemetry("a.0", dead=0.9))
    # The preferred blueprint does not fit the budget: the cheaper one is grafted.
    decisions = decide(policy, [sick], budget=50)
    assert decisions[0].blueprint == "low_rank"
    assert decide(policy, [sick], budget=10) == []
    # Two seeds already on trial fill the slots.
    busy = [on_trial("b.0", SeedState.TRAINING), on_trial("b.1", SeedState.TRAINING)]
    assert decide(policy, [sick, *busy]) == []
    # A forbidden pair is never grafted, the other blueprint still is.
    forbidden = dormant(
        "a.0", telemetry("a.0"), (GraftOption("residual_mlp", 100, forbidden=True), OPTIONS[1])
    )
    assert decide(policy, [forbidden])[0].blueprint == "low_rank"


def test_cull_penalty_moves_growth_elsewhere():
    policy = HeuristicPolicy(config())
    penalised = tuple(GraftOption(o.blueprint, o.param_cost, penalty=1.0) for o in OPTIONS)
    seeds = [
        dormant("a.0", telemetry("a.0", dead=0.5), penalised),
        dormant("a.1", telemetry("a.1", dead=0.2)),
    ]
    assert decide(policy, seeds)[0].seed_id == "a.1"


def test_several_germinations_per_epoch_when_allowed():
    policy = HeuristicPolicy(config(max_germinations_per_epoch=3, max_active_seeds=2))
    seeds = [dormant(f"a.{i}", telemetry(f"a.{i}", dead=i / 10)) for i in range(4)]
    grafted = [d.seed_id for d in decide(policy, seeds) if d.blueprint and
               d.to_state is SeedState.GERMINATED]
    assert grafted == ["a.3", "a.2"]


def test_lifecycle_advances_on_evidence():
    policy = HeuristicPolicy(config(min_training_epochs=3, probation_epochs=1))
    seeds = [
        on_trial("s.0", SeedState.GERMINATED, epochs=0),
        on_trial("s.1", SeedState.TRAINING, epochs=2),
        on_trial("s.2", SeedState.TRAINING, epochs=3),
        on_trial("s.3", SeedState.BLENDING, epochs=1, alpha=0.67),
        on_trial("s.4", SeedState.BLENDING, epochs=2, alpha=1.0),
    ]
    moves = {d.seed_id: d.to_state for d in decide(policy, seeds, plateau=0)}
    assert moves == {
        "s.0": SeedState.TRAINING,
        "s.2": SeedState.BLENDING,
        "s.4": SeedState.PROBATIONARY,
    }


@pytest.mark.parametrize(
    ("ablated", "expected"),
    [
        (EvalMetrics(loss=1.0, accuracy=0.6), SeedState.FOSSILIZED),  # seed helps
        (EvalMetrics(loss=0.8, accuracy=0.75), SeedState.CULLED),  # seed hurts
        (EvalMetrics(loss=0.9, accuracy=0.7), SeedState.CULLED),  # seed does nothing
    ],
)
def test_probation_judged_on_counterfactual(ablated, expected):
    policy = HeuristicPolicy(config())
    seeds = [on_trial("s.0", SeedState.PROBATIONARY, epochs=1, alpha=1.0)]
    obs = observe(seeds, acc=0.7, loss=0.9, counterfactual={"s.0": ablated})
    (decision,) = policy.decide(obs)
    assert decision.to_state is expected
    assert decision.evidence["gain_accuracy"] == pytest.approx(0.7 - ablated.accuracy)
    assert decision.evidence["gain_loss"] == pytest.approx(ablated.loss - 0.9)


def test_probation_waits_for_evidence_and_implicated_seed_is_culled():
    policy = HeuristicPolicy(config())
    waiting = [on_trial("s.0", SeedState.PROBATIONARY, epochs=3, alpha=1.0)]
    assert decide(policy, waiting, plateau=0) == []
    implicated = [on_trial("s.0", SeedState.TRAINING, epochs=0, implicated=True)]
    (decision,) = decide(policy, implicated, plateau=0)
    assert decision.to_state is SeedState.CULLED and "incident" in decision.reason


def test_culling_frees_a_slot_for_growth_in_the_same_epoch():
    policy = HeuristicPolicy(config(max_active_seeds=1))
    seeds = [
        on_trial("s.0", SeedState.PROBATIONARY, epochs=1, alpha=1.0),
        dormant("s.1", telemetry("s.1")),
    ]
    cf = {"s.0": EvalMetrics(loss=0.5, accuracy=0.9)}
    decisions = decide(policy, seeds, counterfactual=cf)
    assert [(d.seed_id, d.to_state) for d in decisions] == [
        ("s.0", SeedState.CULLED),
        ("s.1", SeedState.GERMINATED),
        ("s.1", SeedState.TRAINING),
    ]


def test_unknown_policy_is_a_config_error():
    with pytest.raises(ConfigError, match=r"tamiyo\.policy"):
        make_policy(TamiyoConfig(policy="oracle"))


def test_a_seed_whose_delta_outgrew_its_chunk_is_culled_not_blended():
    policy = HeuristicPolicy(config(max_delta_ratio=2.0))

    def training(seed_id, ratio):
        tel = SeedTelemetry(seed_id, 0, 10, 0.5, 0.1, 0.0, 0.0, 1.0, delta_ratio=ratio)
        return SeedView(seed_id, SeedState.TRAINING, 3, 0.0, "low_rank", 20, tel, ())

    decisions = policy.decide(
        observe([training("a.0", 0.5), training("a.1", 8.0)])
    )
    moves = {d.seed_id: d.to_state for d in decisions}
    assert moves == {"a.0": SeedState.BLENDING, "a.1": SeedState.CULLED}
    culled = next(d for d in decisions if d.seed_id == "a.1")
    assert "8.00x" in culled.reason and culled.evidence["delta_ratio"] == 8.0


@pytest.mark.parametrize(("best", "loss", "plateau"), [
    (0.30, 0.28, False),  # 6.7% better: progress on a task whose loss is small
    (2.00, 1.98, True),   # 1% better: a plateau, though the same 0.02 in absolute loss
    (-1.00, -1.02, True),  # a loss below zero: the fraction is of its size
    (-1.00, -1.10, False),
])
def test_the_plateau_is_relative_to_the_runs_own_loss(best, loss, plateau):
    policy = HeuristicPolicy(config(plateau_patience=1, plateau_min_improvement=0.05))
    policy.load_state_dict({"best_validation_loss": best, "epochs_since_improvement": 0})
    grows = bool(policy.decide(observe([dormant("a", telemetry("a"))], loss=loss)))
    assert grows is plateau


def test_the_first_epoch_is_progress_not_a_plateau():
    policy = HeuristicPolicy(config(plateau_patience=1, plateau_min_improvement=10.0))
    first = observe([dormant("a", telemetry("a"))], loss=5.0)
    assert policy.decide(first) == []
    policy.update(first, [])
    assert policy.state_dict() == {"best_validation_loss": 5.0, "epochs_since_improvement": 0}
