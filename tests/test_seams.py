"""Decide, then apply; a policy from user code; a graft that really helps is kept."""

from __future__ import annotations

import json

import pytest

from packets import make_packet, observe_a_plateau
from tolaria.build import build_trainer
from tolaria.config import KasminaConfig, TamiyoConfig, load_config
from tolaria.contracts import SeedState
from tolaria.errors import ConfigError
from tolaria.kasmina import export_structure, find_seeds, inject_seeds
from tolaria.tamiyo import TamiyoController, make_policy


def test_decide_changes_nothing_and_is_deterministic(tiny_config, tiny_data):
    trainer, observation = observe_a_plateau(tiny_config, tiny_data)
    tamiyo = trainer.tamiyo
    before = (export_structure(trainer.model), json.dumps(tamiyo.state_dict(), sort_keys=True))
    first, second = tamiyo.decide(observation), tamiyo.decide(observation)
    assert first == second and first.decisions  # it would graft...
    after = (export_structure(trainer.model), json.dumps(tamiyo.state_dict(), sort_keys=True))
    assert after == before  # ...but nothing has changed until apply
    signal = tamiyo.apply(first)
    assert signal.optimizer_rebuild_required
    assert any(s is not SeedState.DORMANT for s in tamiyo.seed_states.values())


def test_a_policy_named_module_class_decides_and_its_state_survives_a_checkpoint(
    tiny_config, tiny_data, tmp_path
):
    tiny_config.tamiyo.policy = "plugins_for_seams:PatientPolicy"
    tiny_config.run.epochs = 4
    tiny_config.checkpoint.every_epochs = 1
    trainer = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run")
    trainer.run_epoch(0)  # one epoch seen: too early for this policy
    assert set(trainer.tamiyo.seed_states.values()) == {SeedState.DORMANT}
    trainer.run_epoch(1)  # the second: it grafts
    assert trainer.tamiyo.policy.epochs_seen == 2
    assert SeedState.TRAINING in trainer.tamiyo.seed_states.values()

    fresh = build_trainer(tiny_config, data=tiny_data, run_dir=trainer.run_dir)
    assert fresh.tamiyo.policy.epochs_seen == 0
    fresh.resume()  # the checkpoint of epoch 1
    assert fresh.tamiyo.policy.epochs_seen == 2
    assert fresh.tamiyo.state_dict() == trainer.tamiyo.state_dict()


def test_a_failing_policy_constructor_is_reported_as_such_not_as_unknown():
    with pytest.raises(ConfigError, match=r"BrokenPolicy\(\.\.\.\) raised KeyError"):
        make_policy(TamiyoConfig(policy="plugins_for_seams:BrokenPolicy"))
    with pytest.raises(ConfigError, match="unknown policy"):
        make_policy(TamiyoConfig(policy="oracle"))


def test_a_controller_built_without_a_trainer_keeps_its_own_sink():
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    inject_seeds(model, KasminaConfig(layers=["1"], chunks=1))
    seen = []
    tamiyo = TamiyoController(TamiyoConfig(), KasminaConfig(), num_classes=2, host_parameters=50,
                              event_sink=lambda kind, **fields: seen.append(kind))
    for seed in find_seeds(model):
        tamiyo.register_seed(seed)
    tamiyo.step(make_packet(0, float("nan"), 0.5))
    assert seen == ["incident"]


@pytest.mark.slow
def test_a_genuinely_helpful_graft_fossilizes_on_its_measured_contribution(tmp_path):
    """The default job grows signal_conv1d on MNIST-1D and keeps it because the validation
    pass with the seed's alpha at 0 is clearly worse: if that counterfactual were a plain
    validation pass, the gain would be 0 and the seed culled."""
    config = load_config(overrides=[
        "run.epochs=12", "run.device=cpu", "run.progress=false", "run.tensorboard=false",
        f"data.cache_dir={tmp_path / 'cache'}",
    ])
    summary = build_trainer(config, run_dir=tmp_path / "run").train()
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").open()]
    fossilized = [e for e in events if e["event"] == "decision" and e["action"] == "fossilized"]
    assert fossilized, "the graft should have been kept"
    evidence = fossilized[0]["features"]["evidence"]
    assert evidence["gain_accuracy"] > 0.02 and evidence["gain_loss"] > 0.05
    assert summary["seeds"].get("fossilized") == 1
    assert summary["params_final"] > summary["params_initial"]
