"""The manager against real Kasmina seeds: graft, train, fossilize, cull, restore."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from test_optim_state import through_json
from tolaria.config import KasminaConfig, OptimizerConfig
from tolaria.contracts import SeedState
from tolaria.errors import OptimizerManifestError
from tolaria.kasmina import (
    export_structure,
    find_seeds,
    inject_seeds,
    replay_structure,
    seed_parameter_names,
)
from tolaria.optim import HOST_ROLE, SEED_ROLE, DynamicOptimizerManager

KASMINA = KasminaConfig(layers=["body"], chunks=2, embargo_epochs=0)
OPTIMIZER = OptimizerConfig(name="Adam", lr=0.01)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def injected() -> Net:
    torch.manual_seed(0)
    model = Net()
    inject_seeds(model, KASMINA)
    model(torch.zeros(2, 6))  # seeds learn their chunk shape
    return model


def train(model: Net, manager: DynamicOptimizerManager, steps: range) -> None:
    optimizer = manager.get_optimizer()
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        manager.after_optimizer_step()


def walk(seed, *states: SeedState) -> None:
    for state in states:
        seed.transition(state, epoch=0, reason="test")


def test_lifecycle_of_real_seeds_keeps_the_optimizer_exact() -> None:
    model = injected()
    manager = DynamicOptimizerManager(model, OPTIMIZER)  # default: kasmina's seed names
    optimizer = manager.get_optimizer()
    train(model, manager, range(2))
    host_state = {p: dict(s) for p, s in optimizer.state.items()}
    first, second = find_seeds(model)

    first.germinate("residual_mlp", epoch=0)
    walk(first, SeedState.TRAINING)
    with pytest.raises(OptimizerManifestError, match=r"not in the optimizer: body\.kasmina"):
        manager.check_manifest()
    manager.rebuild_optimizer()
    grafted = seed_parameter_names(model)
    assert grafted and {manager.manifest()[n] for n in grafted} == {SEED_ROLE}
    train(model, manager, range(2, 4))
    named = dict(model.named_parameters())
    # The graft learns through the straight-through path, so Adam has state for it...
    assert all(named[n] in optimizer.state for n in grafted)
    # ...and the host's moments are the very tensors they were before the graft.
    assert all(optimizer.state[p][k] is v for p, s in host_state.items() for k, v in s.items())

    walk(first, SeedState.BLENDING, SeedState.PROBATIONARY, SeedState.FOSSILIZED)
    moments = {n: dict(optimizer.state[named[n]]) for n in grafted}
    manager.rebuild_optimizer()
    assert {manager.manifest()[n] for n in grafted} == {HOST_ROLE}
    assert all(optimizer.state[named[n]][k] is v for n, s in moments.items() for k, v in s.items())

    second.germinate("low_rank", epoch=1)
    walk(second, SeedState.TRAINING)
    manager.rebuild_optimizer()
    doomed = [p for n, p in model.named_parameters() if n in seed_parameter_names(model)]
    train(model, manager, range(4, 6))
    assert all(p in optimizer.state for p in doomed)
    walk(second, SeedState.CULLED)
    manager.rebuild_optimizer()
    assert all(p not in optimizer.state for p in doomed)
    assert SEED_ROLE not in manager.manifest().values()
    manager.check_manifest()


def test_optimizer_state_restores_onto_a_replayed_host() -> None:
    model = injected()
    manager = DynamicOptimizerManager(model, OPTIMIZER)
    seed = find_seeds(model)[1]
    seed.germinate("residual_mlp", epoch=0)
    walk(seed, SeedState.TRAINING)
    manager.rebuild_optimizer()
    train(model, manager, range(3))
    structure, weights = export_structure(model), model.state_dict()
    saved = through_json(manager.state_dict())

    fresh = injected()
    replay_structure(fresh, structure)
    fresh.load_state_dict(weights)
    restored = DynamicOptimizerManager(fresh, OPTIMIZER)
    restored.load_state_dict(saved)
    assert restored.manifest() == manager.manifest()
    train(model, manager, range(3, 6))
    train(fresh, restored, range(3, 6))
    for (name, a), b in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b), name
