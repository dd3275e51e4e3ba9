"""Emergency rollback end to end: a graft that blows up when blended in is rolled back,
culled before the epoch is replayed, and the run goes on (invariant 6: no replay loop)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tolaria.build import build_trainer
from tolaria.kasmina import Blueprint, register_blueprint, unregister_blueprint


class Bomb(nn.Module):
    """Zero at graft (function-preserving); once trained, a huge multiple of its input."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * 1e6 * h


class BombBlueprint(Blueprint):
    name = "test_bomb"

    def build(self, chunk_shape, **kwargs) -> nn.Module:
        return Bomb()


@pytest.fixture
def bomb():
    register_blueprint(BombBlueprint())
    yield "test_bomb"
    unregister_blueprint("test_bomb")


def bomb_growth(config, bomb):
    """Grow a bomb at every plateau, as fast as the lifecycle allows, never keep one."""
    config.run.epochs = 12
    config.checkpoint.every_epochs = 0
    config.kasmina.blend_epochs = 1
    config.tamiyo.blueprints = [bomb]
    config.tamiyo.plateau_patience = 1
    config.tamiyo.plateau_min_improvement = 10.0  # every epoch is a plateau: grow at once
    config.tamiyo.min_training_epochs = 1
    config.tamiyo.max_active_seeds = 1
    config.tamiyo.max_germinations_per_epoch = 1
    config.tamiyo.fossilize_min_gain = 1.0  # nothing is ever kept: every bomb stays on trial
    return config


def test_a_graft_that_diverges_is_rolled_back_culled_and_the_run_recovers(
    tiny_config, tiny_data, tmp_path, bomb
):
    config = bomb_growth(tiny_config, bomb)
    config.tamiyo.max_delta_ratio = 1e30  # let the bombs reach BLENDING: test the rollback
    trainer = build_trainer(config, data=tiny_data, run_dir=tmp_path / "run")

    summary = trainer.train()

    assert summary["status"] == "completed"
    assert summary["rollbacks"] >= 1
    events = trainer.run_dir.events()
    culled_on_rollback = [
        e
        for e in events
        if e["event"] == "adaptation" and e["to_state"] == "culled" and "incident" in e["reason"]
    ]
    assert culled_on_rollback, "the implicated graft must be culled when rolling back"
    incidents = [e for e in events if e["event"] == "incident"]
    # The replayed epoch differs from the failed one: the same incident never repeats
    # up to the repeated-failure limit.
    assert max(e["count"] for e in incidents) < config.tamiyo.max_repeated_failures
    assert torch.isfinite(torch.tensor(summary["final_val_loss"]))


def test_the_size_check_culls_a_bomb_before_it_is_blended(tiny_config, tiny_data, tmp_path, bomb):
    config = bomb_growth(tiny_config, bomb)
    trainer = build_trainer(config, data=tiny_data, run_dir=tmp_path / "run")
    summary = trainer.train()
    assert summary["status"] == "completed"
    assert summary["rollbacks"] == 0  # never blended, so never exploded
    moves = [e for e in trainer.run_dir.events() if e["event"] == "adaptation"]
    assert not [e for e in moves if e["to_state"] == "blending"]
    size_culls = [e for e in moves if e["to_state"] == "culled" and "delta grew" in e["reason"]]
    assert size_culls and all(e["from_state"] == "training" for e in size_culls)
