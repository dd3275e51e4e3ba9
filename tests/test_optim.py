"""DynamicOptimizerManager: rebuilds keep state bit for bit, across every torch.optim class."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tolaria.config import OptimizerConfig
from tolaria.errors import ConfigError, OptimizerManifestError
from tolaria.optim import HOST_ROLE, SEED_ROLE, DynamicOptimizerManager

#: torch.optim classes the manager cannot drive, with the reason.
UNSUPPORTED = {
    # step() needs a closure, and torch refuses more than one param group for it.
    "LBFGS": "closure-only step, single param group",
}
OPTIMIZERS = sorted(
    name
    for name in dir(torch.optim)
    if isinstance(getattr(torch.optim, name), type)
    and issubclass(getattr(torch.optim, name), torch.optim.Optimizer)
    and name != "Optimizer"
)
SUPPORTED = [name for name in OPTIMIZERS if name not in UNSUPPORTED]
#: Per-class kwargs that exercise the state (plain SGD keeps none without momentum).
KWARGS = {"SGD": {"momentum": 0.9}, "RMSprop": {"momentum": 0.5}}


class Host(nn.Module):
    """A tiny host whose parameters suit the optimizer: Muon wants 2-D parameters only,
    SparseAdam wants sparse gradients."""

    def __init__(self, optimizer: str) -> None:
        super().__init__()
        self.sparse = optimizer == "SparseAdam"
        if self.sparse:
            self.embed = nn.Embedding(12, 4, sparse=True)
            self.head = nn.Embedding(12, 4, sparse=True)
        else:
            bias = optimizer != "Muon"
            self.embed = nn.Linear(5, 6, bias=bias)
            self.head = nn.Linear(6, 3, bias=bias)

    def loss(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(step)
        if self.sparse:
            idx = torch.randint(0, 12, (8,), generator=gen)
            return (self.embed(idx) * self.head(idx.flip(0))).sum().pow(2)
        x = torch.randn(8, 5, generator=gen)
        target = torch.randn(8, 3, generator=gen)
        return (self.head(torch.tanh(self.embed(x))) - target).pow(2).mean()


class Trial:
    """A settable trial-parameter source standing in for tolaria.kasmina."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __call__(self, model: nn.Module) -> set[str]:
        return set(self.names)


def build(optimizer: str, trial: Trial | None = None) -> tuple[Host, DynamicOptimizerManager]:
    torch.manual_seed(0)
    model = Host(optimizer)
    config = OptimizerConfig(name=optimizer, lr=0.01, kwargs=KWARGS.get(optimizer, {}))
    return model, DynamicOptimizerManager(model, config, trial_parameters=trial or Trial())


def train(model: Host, manager: DynamicOptimizerManager, steps: range) -> None:
    optimizer = manager.get_optimizer()
    for step in steps:
        optimizer.zero_grad()
        model.loss(step).backward()
        optimizer.step()
        manager.after_optimizer_step()


def state_of(manager: DynamicOptimizerManager, param: nn.Parameter) -> dict:
    return manager.get_optimizer().state.get(param, {})


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def assert_same_trajectory(a: Host, ma, b: Host, mb, names) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for name in names:
        assert torch.equal(pa[name], pb[name]), name
        assert_state_equal(state_of(ma, pa[name]), state_of(mb, pb[name]))


def new_parameter(optimizer: str) -> nn.Parameter:
    # 2-D so Muon accepts it; a sparse optimizer simply never sees a gradient for it.
    return nn.Parameter(torch.full((2, 2), 0.5))


def test_every_torch_optimizer_is_covered() -> None:
    assert {"Adam", "Adagrad", "SGD", "LBFGS"} <= set(OPTIMIZERS)
    assert set(UNSUPPORTED) <= set(OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_optimizer_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        build(name)


@pytest.mark.parametrize("name", SUPPORTED)
def test_rebuild_with_nothing_changed_is_bitwise_invisible(name: str) -> None:
    a, ma = build(name)
    b, mb = build(name)
    train(a, ma, range(3))
    train(b, mb, range(3))
    before = {p: {k: v for k, v in s.items()} for p, s in mb.get_optimizer().state.items()}
    assert mb.rebuild_optimizer() is mb.get_optimizer()
    after = mb.get_optimizer().state
    assert before.keys() == after.keys()
    for p, values in before.items():
        # The very same tensors: nothing was copied, so nothing could drift.
        assert all(after[p][k] is v for k, v in values.items())
    train(a, ma, range(3, 6))
    train(b, mb, range(3, 6))
    assert_same_trajectory(a, ma, b, mb, dict(a.named_parameters()))


@pytest.mark.parametrize("name", SUPPORTED)
def test_adding_parameters_leaves_old_trajectory_bitwise_identical(name: str) -> None:
    a, ma = build(name)
    trial = Trial()
    b, mb = build(name, trial)
    train(a, ma, range(3))
    train(b, mb, range(3))
    # A seed parameter and a host parameter that do not affect the loss.
    b.head.register_parameter("graft", new_parameter(name))
    b.embed.register_parameter("extra", new_parameter(name))
    trial.names = {"head.graft"}
    mb.rebuild_optimizer()
    assert mb.manifest()["head.graft"] == SEED_ROLE
    assert mb.manifest()["embed.extra"] == HOST_ROLE
    mb.check_manifest()
    # The new parameters hold exactly the state a fresh optimizer gives them.
    cls = getattr(torch.optim, name)
    for param in (b.head.graft, b.embed.extra):
        fresh = cls([copy.deepcopy(param)], **KWARGS.get(name, {})).state
        assert_state_equal(state_of(mb, param), next(iter(fresh.values()), {}))
    train(a, ma, range(3, 6))
    train(b, mb, range(3, 6))
    assert_same_trajectory(a, ma, b, mb, dict(a.named_parameters()))


@pytest.mark.parametrize("name", SUPPORTED)
def test_removed_parameter_loses_its_state(name: str) -> None:
    trial = Trial()
    model, manager = build(name, trial)
    model.head.register_parameter("graft", new_parameter(name))
    trial.names = {"head.graft"}
    manager.rebuild_optimizer()
    graft = model.head.graft
    graft.grad = torch.ones_like(graft)  # give it state in optimizers that skip gradless params
    train(model, manager, range(2))
    survivors = {p: dict(s) for p, s in manager.get_optimizer().state.items() if p is not graft}
    del model.head.graft
    trial.names = set()
    manager.rebuild_optimizer()
    optimizer = manager.get_optimizer()
    assert graft not in optimizer.state
    assert all(graft is not p for group in optimizer.param_groups for p in group["params"])
    assert "head.graft" not in manager.manifest()
    assert "head.graft" not in manager.state_dict()["state"]
    for p, values in survivors.items():
        assert all(optimizer.state[p][k] is v for k, v in values.items())
    train(model, manager, range(2, 3))


def test_fossilized_seed_moves_to_the_host_group_keeping_its_state() -> None:
    trial = Trial()
    model, manager = build("Adam", trial)
    model.head.register_parameter("graft", nn.Parameter(torch.zeros(3)))
    trial.names = {"head.graft"}
    manager.rebuild_optimizer()
    graft = model.head.graft
    graft.grad = torch.ones(3)
    manager.get_optimizer().step()
    moments = dict(state_of(manager, graft))
    trial.names = set()  # FOSSILIZED: its parameters are host parameters now
    manager.rebuild_optimizer()
    host, seed = manager.get_optimizer().param_groups
    assert any(p is graft for p in host["params"]) and not seed["params"]
    assert all(state_of(manager, graft)[k] is v for k, v in moments.items())
    assert manager.manifest()["head.graft"] == HOST_ROLE


def test_seed_group_trains_at_its_multiplier() -> None:
    trial = Trial()
    torch.manual_seed(0)
    model = Host("SGD")
    model.head.register_parameter("graft", nn.Parameter(torch.zeros(3)))
    trial.names = {"head.graft"}
    config = OptimizerConfig(name="SGD", lr=0.1, seed_lr_multiplier=0.25)
    manager = DynamicOptimizerManager(model, config, trial_parameters=trial)
    model.head.graft.grad = torch.ones(3)
    model.head.bias.grad = torch.ones(3)
    bias_before = model.head.bias.detach().clone()
    manager.get_optimizer().step()
    assert torch.equal(model.head.graft.detach(), torch.full((3,), -0.1 * 0.25))
    assert torch.equal(model.head.bias.detach(), bias_before - 0.1)


def test_check_manifest_names_untrained_stale_and_misplaced_parameters() -> None:
    trial = Trial()
    model, manager = build("Adam", trial)
    model.head.register_parameter("graft", nn.Parameter(torch.zeros(3)))
    with pytest.raises(OptimizerManifestError, match=r"not in the optimizer: head\.graft"):
        manager.check_manifest()
    trial.names = {"head.graft"}
    manager.rebuild_optimizer()
    trial.names = set()
    with pytest.raises(OptimizerManifestError, match=r"wrong group: head\.graft"):
        manager.check_manifest()
    del model.head.graft
    with pytest.raises(OptimizerManifestError, match=r"no longer trainable.*head\.graft"):
        manager.check_manifest()
    manager.rebuild_optimizer()
    manager.check_manifest()


def test_frozen_parameters_are_not_trained_but_frozen_seeds_are_errors() -> None:
    trial = Trial()
    model, manager = build("Adam", trial)
    model.embed.bias.requires_grad_(False)
    manager.rebuild_optimizer()
    assert "embed.bias" not in manager.manifest()
    trial.names = {"embed.bias"}
    with pytest.raises(OptimizerManifestError, match=r"would never train: embed\.bias"):
        manager.rebuild_optimizer()
    trial.names = {"embed.nothing"}
    with pytest.raises(OptimizerManifestError, match=r"not found in the model: embed\.nothing"):
        manager.rebuild_optimizer()


def test_a_parameter_the_optimizer_rejects_changes_nothing() -> None:
    model, manager = build("Muon")
    before = manager.manifest()
    model.head.register_parameter("graft", nn.Parameter(torch.zeros(3)))  # 1-D: Muon refuses
    with pytest.raises(OptimizerManifestError, match=r"Muon cannot train head\.graft"):
        manager.rebuild_optimizer()
    assert manager.manifest() == before
    with pytest.raises(OptimizerManifestError, match=r"not in the optimizer: head\.graft"):
        manager.check_manifest()


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"name": "Adamm"}, "'Adamm' is not a torch.optim optimizer"),
        ({"name": "Optimizer"}, "Optimizer cannot train"),
        ({"name": "Adam", "kwargs": {"lr": 0.1}}, "lr is set by the manager"),
        ({"name": "Adam", "kwargs": {"betas": 3}}, "optimizer Adam"),
        ({"name": "SGD", "kwargs": {"momentum": -1.0}}, "Invalid momentum"),
    ],
)
def test_bad_optimizer_config_is_a_config_error(config: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DynamicOptimizerManager(Host("Adam"), OptimizerConfig(**config), trial_parameters=Trial())
