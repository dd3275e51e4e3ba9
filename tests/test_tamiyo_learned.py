"""The learned policy: a pure, seeded choice over the feasible grafts and wait."""

from __future__ import annotations

import json

import pytest
import torch

from plugins_for_academy import SeededLearnedPolicy, graft_happy_scorer
from test_tamiyo_policy import config, dormant, observe, on_trial, telemetry
from tolaria.build import build_trainer
from tolaria.contracts import SeedState
from tolaria.events import Callback
from tolaria.tamiyo.features import CANDIDATE_FEATURES, GLOBAL_FEATURES, encode
from tolaria.tamiyo.growth import candidates
from tolaria.tamiyo.learned import LearnedPolicy

SEEDS = [dormant("a.0", telemetry("a.0", dead=0.5)), dormant("a.1", telemetry("a.1", grad=3.0)),
         on_trial("b.0", SeedState.TRAINING)]


def policy(temperature=0.05, seed=0) -> LearnedPolicy:
    return LearnedPolicy(config(temperature=temperature), seed=seed, scorer=graft_happy_scorer(),
                         version="test")


def test_features_are_finite_and_sized_as_declared():
    obs = observe(SEEDS)
    g, c = encode(obs, candidates(obs, budget=obs.param_budget_left))
    assert g.shape == (len(GLOBAL_FEATURES),) and c.shape == (4, len(CANDIDATE_FEATURES))
    assert torch.isfinite(g).all() and torch.isfinite(c).all()


def test_scores_do_not_depend_on_the_order_of_the_candidates():
    obs = observe(SEEDS)
    feasible = candidates(obs, budget=obs.param_budget_left)
    learned = policy()
    forward = learned.action_probabilities(obs, feasible)
    backward = learned.action_probabilities(obs, feasible[::-1])
    assert torch.allclose(forward[1:], backward[1:].flip(0))
    assert torch.allclose(forward[0], backward[0])
    assert float(forward.sum()) == pytest.approx(1.0)


def test_same_observation_and_state_same_decision_and_the_draw_moves_with_the_state():
    obs = observe(SEEDS)
    a, b = policy(temperature=1.0), policy(temperature=1.0)
    choices = []
    for _ in range(12):
        da, db = a.decide(obs), b.decide(obs)
        assert da == db and a.decide(obs) == da  # pure: deciding again changes nothing
        choices.append(tuple((d.seed_id, d.blueprint) for d in da))
        for p in (a, b):
            p.update(obs, [])
    assert len(set(choices)) > 1, "at temperature 1 the choices vary from draw to draw"
    restored = policy(temperature=1.0)
    restored.load_state_dict(a.state_dict())
    assert restored.decide(obs) == a.decide(obs)


def test_greedy_takes_the_best_score_and_grafts_at_most_one_seed():
    obs = observe(SEEDS)
    greedy = policy(temperature=0.0)
    feasible = candidates(obs, budget=obs.param_budget_left)
    probs = greedy.action_probabilities(obs, feasible)
    best = int(torch.argmax(probs))
    decisions = greedy.decide(obs)
    grafts = [d for d in decisions if d.to_state is SeedState.GERMINATED]
    assert probs[best] == 1.0
    assert [(d.seed_id, d.blueprint) for d in grafts] == (
        [feasible[best - 1].key] if best else []
    )


def test_the_lifecycle_gates_are_the_heuristics():
    from tolaria.tamiyo import HeuristicPolicy

    trial = [on_trial("b.0", SeedState.TRAINING, epochs=5), on_trial("b.1", SeedState.BLENDING,
                                                                     alpha=1.0)]
    obs = observe(trial)
    gates = [d for d in HeuristicPolicy(config()).decide(obs)]
    assert policy(temperature=0.0).decide(obs) == gates


class _StopAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, trainer, record) -> None:
        if record.epoch == self.epoch and not record.rollback:
            raise KeyboardInterrupt


def _learned_config(tiny_config, tmp_path):
    tiny_config.run.epochs = 8
    tiny_config.checkpoint.every_epochs = 1
    tiny_config.tamiyo.policy = "plugins_for_academy:SeededLearnedPolicy"
    tiny_config.tamiyo.temperature = 0.2
    tiny_config.run.runs_root = str(tmp_path / "runs")
    return tiny_config


def test_a_resumed_learned_policy_run_reproduces_the_uninterrupted_one(
    tiny_config, tiny_data, tmp_path
):
    config = _learned_config(tiny_config, tmp_path)
    reference = build_trainer(config, data=tiny_data, run_dir=tmp_path / "reference")
    reference.train()
    interrupted = build_trainer(config, data=tiny_data, run_dir=tmp_path / "killed",
                                callbacks=[_StopAt(3)])
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    from tolaria.rundir import RunDirectory

    run_dir, _ = RunDirectory.open_existing(tmp_path / "killed")
    resumed = build_trainer(config, data=tiny_data, run_dir=run_dir)
    assert resumed.resume() == 3  # the interrupted epoch runs again
    resumed.train()

    def lines(run):
        return [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    expected = lines("reference")
    assert lines("killed") == expected
    assert expected[-1]["params"] > expected[0]["params"], "the learned policy grew the host"
    for a, b in zip(reference.model.state_dict().values(), resumed.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert resumed.tamiyo.policy.draws == reference.tamiyo.policy.draws > 0


def test_the_policy_is_named_in_config_and_its_seed_is_the_runs(tiny_config, tiny_data, tmp_path):
    config = _learned_config(tiny_config, tmp_path)
    config.run.seed = 5
    trainer = build_trainer(config, data=tiny_data)
    assert isinstance(trainer.tamiyo.policy, SeededLearnedPolicy)
    assert trainer.tamiyo.policy.seed == 5


def test_a_pinned_version_runs_and_the_champion_runs_otherwise(tiny_config, tiny_data, tmp_path):
    from tolaria.academy.registry import PolicyRegistry

    registry = PolicyRegistry(tmp_path / "academy")
    v1 = registry.register(
        {k: t + 1.0 for k, t in registry.load("v0").tensors.items()},
        {**registry.load("v0").card, "parent": "v0", "trained_on": "test", "training_s": 0.0},
    )
    registry.promote(v1.name, reason="test")
    tiny_config.tamiyo.policy = "learned"
    tiny_config.academy.dir = str(tmp_path / "academy")
    champion = build_trainer(tiny_config, data=tiny_data).tamiyo.policy
    tiny_config.tamiyo.policy_version = "v0"
    pinned = build_trainer(tiny_config, data=tiny_data).tamiyo.policy
    assert (champion.version, pinned.version) == ("v1", "v0")
    weights = [dict(p.scorer.state_dict()) for p in (champion, pinned)]
    assert not torch.equal(weights[0]["wait.0.weight"], weights[1]["wait.0.weight"])
