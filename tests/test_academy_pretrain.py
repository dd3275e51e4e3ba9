"""Base policy v0: a replay campaign, an importance-weighted scorer, rebuilt bit for bit."""

from __future__ import annotations

import pytest
import torch

from test_tamiyo_policy import config, dormant, observe, telemetry
from tolaria import cli
from tolaria.academy.campaign import SIZES, ExploringPolicy
from tolaria.academy.pretrain import examples, tensors_digest, train_scorer, weighted_loss
from tolaria.academy.registry import BUILTIN_V0, PolicyRegistry, read_version
from tolaria.tamiyo.growth import candidates


def test_the_behaviour_policy_logs_its_true_propensities():
    policy = ExploringPolicy(config(), seed=3)
    obs = observe([dormant("a.0", telemetry("a.0")), dormant("a.1", telemetry("a.1"))])
    options = candidates(obs, budget=obs.param_budget_left)
    probs = policy.action_probabilities(obs, options)
    eps = ExploringPolicy.EPSILON
    assert float(probs.sum()) == pytest.approx(1.0)
    assert sorted(probs.tolist())[0] == pytest.approx(eps / (1 + len(options)))
    # Over many draws every action is tried, at about its logged frequency.
    seen = []
    for _ in range(400):
        grafts = [d for d in policy.decide(obs) if d.to_state.value == "germinated"]
        seen.append(0 if not grafts else 1 + [c.key for c in options].index(
            (grafts[0].seed_id, grafts[0].blueprint)))
        policy.draws += 1  # the next draw; the heuristic's plateau memory stays as it was
    frequency = torch.bincount(torch.tensor(seen), minlength=len(probs)).double() / len(seen)
    assert (frequency > 0).all()
    assert torch.allclose(frequency, probs, atol=0.08)


def _points(reward_of_graft: float) -> list[dict]:
    """Decision points on one observation: waits (reward 0) and grafts of the first option."""
    obs = observe([dormant("a.0", telemetry("a.0"))])
    logged = [c.to_dict() for c in candidates(obs, budget=obs.param_budget_left)]
    point = {"observation": obs.to_dict(), "candidates": logged, "propensity": 0.5}
    return [
        {**point, "chosen": 0, "reward": 0.0},
        {**point, "chosen": 1, "reward": reward_of_graft},
        {**point, "chosen": 2, "reward": None},  # an open graft: not trained on
    ]


def test_the_scorer_learns_the_sign_of_a_grafts_reward_and_ignores_open_points():
    for reward in (0.2, -0.2):
        data = examples(_points(reward))
        assert len(data) == 2
        scorer = train_scorer(data, steps=300)
        with torch.no_grad():
            assert float(weighted_loss(scorer, data)) < 1e-3
            wait, rows = scorer.score_batch(data.global_features, data.candidates, data.point)
        assert (float(rows[0]) > float(wait[0])) == (reward > 0)


@pytest.mark.slow
def test_pretrain_is_deterministic_and_its_version_runs_as_the_learned_policy(tmp_path):
    from tolaria.academy.pretrain import pretrain

    cards = [pretrain(tmp_path / f"v0-{i}", SIZES["tiny"], workdir=tmp_path / f"campaign-{i}")
             for i in range(2)]
    assert cards[0]["tensors_digest"] == cards[1]["tensors_digest"]
    assert cards[0]["sha256"] == cards[1]["sha256"]  # the safetensors file, byte for byte
    version = read_version(tmp_path / "v0-0", "v0")
    assert tensors_digest(version.tensors) == cards[0]["tensors_digest"]
    # Rebuilt into an academy, it stands in for the built-in v0 and a run can pin it.
    academy = tmp_path / "academy"
    assert cli.main(["academy", "pretrain", "--size", "tiny", "--academy", str(academy)]) == 0
    assert PolicyRegistry(academy).path_of("v0") == academy / "policies" / "v0"
    assert cli.main(["train", "--run-dir", str(tmp_path / "run"), "--set", "run.epochs=2",
                     "--set", "tamiyo.policy=learned", "--set", "tamiyo.policy_version=v0",
                     "--set", f"academy.dir={academy}", "--set", "run.progress=false",
                     "--set", f"data.cache_dir={tmp_path / 'campaign-0' / 'cache'}"]) == 0


def test_the_shipped_v0_loads_and_records_how_it_was_made():
    version = read_version(BUILTIN_V0, "v0")
    assert tensors_digest(version.tensors) == version.card["tensors_digest"]
    assert version.card["trained_on"]["campaign"] == {
        "tasks": SIZES["full"].tasks, "seeds": SIZES["full"].seeds, "epochs": SIZES["full"].epochs
    }


def test_a_run_the_controller_stops_does_not_end_the_campaign(monkeypatch, tmp_path):
    from tolaria.academy import campaign
    from tolaria.errors import RepeatedFailureError

    trained = []

    class Trainer:
        def __init__(self, config, run_dir):
            self.name = config.run.name

        def train(self):
            trained.append(self.name)
            if len(trained) == 1:
                raise RepeatedFailureError("divergence happened 3 times", kind="divergence")

    monkeypatch.setattr("tolaria.build.build_trainer", Trainer)
    campaign.run_campaign(tmp_path, campaign.CampaignSize(tasks=2, seeds=1, epochs=1))
    assert len(trained) == 2  # the second run still ran
