"""Decision points: what was feasible, what was chosen, and what came of it."""

from __future__ import annotations

import math

from plugins_for_seams import EventRecorder
from test_tamiyo_policy import OPTIONS, config, decide, dormant, observe, on_trial, telemetry
from tolaria.build import build_trainer
from tolaria.contracts import SeedState
from tolaria.events import Event
from tolaria.tamiyo import HeuristicPolicy, Observation
from tolaria.tamiyo.growth import growth_points


def test_a_wait_is_a_decision_point_with_every_feasible_graft_as_candidate():
    cfg = config()
    policy = HeuristicPolicy(cfg)
    obs = observe([dormant("a.0", telemetry("a.0")), dormant("a.1", telemetry("a.1"))])
    decisions = decide(policy, obs.seeds, plateau=0)  # no plateau: the heuristic waits
    (point,) = growth_points(obs, cfg, decisions, policy)
    assert point.chosen == 0 and point.propensity == 1.0
    assert [c.key for c in point.candidates] == [
        ("a.0", "residual_mlp"), ("a.0", "low_rank"), ("a.1", "residual_mlp"), ("a.1", "low_rank")
    ]


def test_a_graft_points_at_its_candidate_and_budget_and_slots_bound_the_candidates():
    cfg = config(max_germinations_per_epoch=2, max_active_seeds=3)
    policy = HeuristicPolicy(cfg)
    seeds = [dormant("a.0", telemetry("a.0", dead=1.0)), dormant("a.1", telemetry("a.1")),
             on_trial("b.0", SeedState.TRAINING)]
    obs = observe(seeds, budget=120)  # room for residual_mlp (100) + low_rank (20), not more
    decisions = decide(policy, obs.seeds, budget=120)
    first, second = growth_points(obs, cfg, decisions, policy)
    assert first.candidates[first.chosen - 1].key == ("a.0", "residual_mlp")
    # The second slot chooses among what the first left: not a.0, and only what fits in 20.
    assert [c.key for c in second.candidates] == [("a.1", "low_rank")]
    assert second.candidates[second.chosen - 1].key == ("a.1", "low_rank")


def test_no_point_where_growth_is_impossible():
    cfg = config(max_active_seeds=1)
    policy = HeuristicPolicy(cfg)
    full = observe([dormant("a.0", telemetry("a.0")), on_trial("b.0", SeedState.TRAINING)])
    assert growth_points(full, cfg, decide(policy, full.seeds), policy) == ()
    too_dear = observe([dormant("a.0", telemetry("a.0"))], budget=10)
    assert growth_points(too_dear, config(), [], policy) == ()
    forbidden = dormant("a.0", None, tuple(o.__class__(o.blueprint, o.param_cost, forbidden=True)
                                          for o in OPTIONS))
    assert growth_points(observe([forbidden]), config(), [], policy) == ()


def test_an_observation_round_trips_through_json(tiny_config, tiny_data):
    trainer = build_trainer(tiny_config, data=tiny_data)
    trainer.run_epoch(0)
    obs = trainer.tamiyo.observe(trainer._assemble_system_state(0.5, *trainer.evaluate(
        trainer.val_loader)))
    again = Observation.from_dict(obs.to_dict())
    assert again.to_dict() == obs.to_dict()
    assert again.seeds[0].chunk_shape == obs.seeds[0].chunk_shape is not None
    assert [s.depth for s in obs.seeds][::4] == [0.0, 1.0]  # hidden.0 then hidden.1
    assert obs.host_params == trainer.params_initial and obs.epochs_total == 4


def test_every_epoch_with_room_to_grow_is_one_point_and_grafts_get_one_outcome(
    tiny_config, tiny_data
):
    tiny_config.run.epochs = 12
    # The blobs' loss falls geometrically, by a steady fraction an epoch, so no relative
    # threshold finds a plateau in 12 epochs: every epoch is one here.
    tiny_config.tamiyo.plateau_min_improvement = 10.0
    recorder = EventRecorder()
    trainer = build_trainer(tiny_config, data=tiny_data, callbacks=[recorder])
    trainer.train()
    points = [r for r in recorder.records if r.kind is Event.DECISION_POINT]
    outcomes = [r for r in recorder.records if r.kind is Event.GROWTH_OUTCOME]
    ids = [p.point_id for p in points]
    assert ids == [f"p{i}" for i in range(len(ids))] and len(ids) >= 12
    grafted = {p.point_id: p for p in points if p.chosen}
    assert grafted, "the tiny job grows"
    for outcome in outcomes:
        point = grafted[outcome.point_id]
        graft = point.candidates[point.chosen - 1]
        assert (outcome.seed_id, outcome.blueprint) == (graft["seed_id"], graft["blueprint"])
        assert outcome.result in ("fossilized", "culled")
        assert outcome.epochs_occupied == outcome.epoch - point.epoch > 0
        judged = outcome.gain_accuracy is not None
        assert not judged or math.isfinite(outcome.gain_accuracy)
    assert len({o.point_id for o in outcomes}) == len(outcomes)
    # What the controller still holds open are exactly the grafts not yet settled.
    assert set(trainer.tamiyo.growth.open) == set(grafted) - {o.point_id for o in outcomes}


def test_a_restore_keeps_point_ids_and_closes_the_grafts_it_went_back_before():
    from tolaria.tamiyo.decisions import GrowthLedger
    from tolaria.tamiyo.growth import Candidate, GrowthPoint

    events = []
    ledger = GrowthLedger(lambda kind, **fields: events.append((kind, fields)))
    seed = dormant("a.0", telemetry("a.0"))
    graft = GrowthPoint(0, (Candidate(seed, OPTIONS[0]),), chosen=1, propensity=0.5)
    ledger.record(graft, epoch=2, observation={}, policy="x", policy_version=None)
    before = ledger.state_dict()  # a snapshot holding p0 open
    later = GrowthPoint(0, (Candidate(dormant("a.1"), OPTIONS[1]),), chosen=1, propensity=0.5)
    ledger.record(later, epoch=4, observation={}, policy="x", policy_version=None)
    implicated = ledger.implicate({"a.0", "a.1"})  # an incident at epoch 5: both grafts
    assert [(p["point_id"], p["seed_id"]) for p in implicated] == [("p0", "a.0"), ("p1", "a.1")]
    assert ledger.implicate({"b.0"}) == []  # a seed no open point grafted implicates none

    restored = ledger.restored(before)
    assert set(restored.open) == {"p0"} and restored.open["p0"].incidents == 1
    assert set(restored.undone) == {"p1"} and restored.next_id == 2
    restored.close_undone(3)
    kind, outcome = events[-1]
    assert kind == "growth_outcome" and outcome["point_id"] == "p1"
    assert outcome["result"] == "rolled_back" and outcome["incidents"] == 1
    restored.settle("a.0", "culled", epoch=6)
    assert events[-1][1]["point_id"] == "p0" and events[-1][1]["epochs_occupied"] == 4
    # Restoring the old state again cannot reopen what was settled, nor reuse an id.
    again = restored.restored(before)
    assert again.open == {} and again.undone == {} and again.next_id == 2
