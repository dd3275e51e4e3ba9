"""A joining parameter starts as a fresh optimizer would start it, whatever the torch kernel;
a config the optimizer or scheduler would refuse fails, in one line, while the run is built."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from test_optim import SUPPORTED, Trial, assert_state_equal
from tolaria.config import OptimizerConfig, SchedulerConfig
from tolaria.errors import ConfigError
from tolaria.optim import DynamicOptimizerManager

LR, SEED_LR_MULTIPLIER = 0.05, 0.5
#: Kwargs that give each class state worth checking (SGD keeps none without momentum).
KWARGS = {"SGD": {"momentum": 0.9}, "RMSprop": {"momentum": 0.5}}
#: (optimizer, implementation kwarg) for every class that offers a fused or foreach kernel.
KERNELS = [
    (name, kernel)
    for name in SUPPORTED
    for kernel in ("fused", "foreach")
    if kernel in inspect.signature(getattr(torch.optim, name)).parameters
]


def term(step: int, name: str, p: torch.Tensor) -> torch.Tensor:
    """Each parameter's own share of the loss: grafts never change another's gradient, and a
    parameter's gradient is the same in the model and alone under a reference optimizer."""
    gen = torch.Generator().manual_seed(1000 * step + sum(map(ord, name)))
    return (p - torch.randn(p.shape, generator=gen)).pow(2).sum()


class Model(nn.Module):
    """A host with one seed on trial from the start; ``graft`` adds a host parameter and a
    second seed, both joining groups whose members already hold optimizer state."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 3, bias=False)  # 2-D parameters only, for Muon
        self.seed_a = nn.Parameter(torch.full((3, 2), 0.5))
        self.trial = Trial()
        self.trial.names = {"seed_a"}

    def graft(self) -> dict[str, nn.Parameter]:
        self.register_parameter("host_extra", nn.Parameter(torch.full((2, 3), -0.25)))
        self.register_parameter("seed_b", nn.Parameter(torch.full((3, 3), 0.75)))
        self.trial.names.add("seed_b")
        return {"host_extra": self.host_extra, "seed_b": self.seed_b}


def manager_for(model: Model, name: str, kwargs: dict) -> DynamicOptimizerManager:
    config = OptimizerConfig(name=name, lr=LR, seed_lr_multiplier=SEED_LR_MULTIPLIER, kwargs=kwargs)
    return DynamicOptimizerManager(model, config, trial_parameters=model.trial)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad()
        sum(term(step, name, p) for name, p in model.named_parameters()).backward()
        optimizer.step()


def references(
    name: str, kwargs: dict, grafts: dict[str, nn.Parameter]
) -> Iterator[tuple[str, nn.Parameter, torch.optim.Optimizer]]:
    """For each graft, a copy trained alone by a fresh torch optimizer at the graft's LR."""
    for fqn, param in grafts.items():
        lr = LR * SEED_LR_MULTIPLIER if fqn.startswith("seed") else LR
        copy = nn.Parameter(param.detach().clone())
        yield fqn, copy, getattr(torch.optim, name)([copy], lr=lr, **kwargs)


def assert_grafts_match_references(name: str, kwargs: dict, steps: range) -> None:
    """Train, graft, train on: old parameters follow the run with no graft bit for bit,
    the grafts follow fresh torch optimizers bit for bit."""
    model, plain = Model(), Model()
    manager, plain_manager = manager_for(model, name, kwargs), manager_for(plain, name, kwargs)
    train(model, manager.get_optimizer(), range(steps.start))
    train(plain, plain_manager.get_optimizer(), range(steps.start))
    grafts = model.graft()
    manager.rebuild_optimizer()
    refs = list(references(name, kwargs, grafts))
    train(model, manager.get_optimizer(), steps)
    train(plain, plain_manager.get_optimizer(), steps)
    for fqn, copy, optimizer in refs:
        for step in steps:
            optimizer.zero_grad()
            term(step, fqn, copy).backward()
            optimizer.step()
        assert torch.equal(grafts[fqn], copy), fqn
        assert_state_equal(manager.get_optimizer().state[grafts[fqn]], optimizer.state[copy])
    for fqn, p in plain.named_parameters():
        assert torch.equal(dict(model.named_parameters())[fqn], p), fqn


# -- (a) a joining parameter's state is what its optimizer class gives it -----------------


@pytest.mark.parametrize("kernel", [{}, {"foreach": True}, {"fused": True}])
def test_grafted_adagrad_parameters_start_from_the_initial_accumulator(kernel: dict) -> None:
    kwargs = {"initial_accumulator_value": 0.1, "lr_decay": 0.01, **kernel}
    model = Model()
    manager = manager_for(model, "Adagrad", kwargs)
    train(model, manager.get_optimizer(), range(2))
    grafts = model.graft()
    manager.rebuild_optimizer()
    for fqn, copy, fresh in references("Adagrad", kwargs, grafts):
        assert torch.equal(
            manager.get_optimizer().state[grafts[fqn]]["sum"], torch.full_like(copy, 0.1)
        )
        assert_state_equal(manager.get_optimizer().state[grafts[fqn]], fresh.state[copy])
    assert_grafts_match_references("Adagrad", kwargs, range(2, 3))


# -- (b) fused and foreach kernels take parameters that join a group with state -----------


@pytest.mark.parametrize(("name", "kernel"), KERNELS)
def test_parameters_joining_groups_with_state_train_like_fresh_ones(name: str, kernel: str) -> None:
    assert_grafts_match_references(name, {**KWARGS.get(name, {}), kernel: True}, range(2, 5))


@pytest.mark.parametrize("kwargs", [{"nesterov": True}, {"weight_decay": 0.1}])
def test_fused_sgd_momentum_variants_take_joining_parameters(kwargs: dict) -> None:
    assert_grafts_match_references("SGD", {"momentum": 0.9, "fused": True, **kwargs}, range(2, 5))


def test_a_seed_without_a_momentum_buffer_can_fossilize_into_a_fused_group() -> None:
    kwargs = {"momentum": 0.9, "fused": True}
    model = Model()
    manager = manager_for(model, "SGD", kwargs)
    optimizer = manager.get_optimizer()
    for step in range(2):  # the seed is on trial but gets no gradient, so no buffer either
        optimizer.zero_grad()
        term(step, "body.weight", model.body.weight).backward()
        optimizer.step()
    assert "momentum_buffer" not in optimizer.state.get(model.seed_a, {})
    model.trial.names = set()  # FOSSILIZED: into the host group, whose members hold buffers
    manager.rebuild_optimizer()
    copy = nn.Parameter(model.seed_a.detach().clone())
    fresh = torch.optim.SGD([copy], lr=LR, **kwargs)
    train(model, optimizer, range(2, 4))
    for step in range(2, 4):
        fresh.zero_grad()
        term(step, "seed_a", copy).backward()
        fresh.step()
    assert torch.equal(model.seed_a, copy)


def test_fused_sgd_with_dampening_is_refused_because_a_join_could_not_be_exact() -> None:
    with pytest.raises(ConfigError, match=r"fused=True together with dampening=0\.1.*foreach"):
        manager_for(Model(), "SGD", {"momentum": 0.9, "dampening": 0.1, "fused": True})


# -- (c) bad kwargs fail at construction, naming the field, touching nothing --------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"betas": [0.9]}, r"^optimizer\.kwargs: betas=\[0\.9\] is refused by optimizer Adam: "),
        (
            {"fused": True, "foreach": True, "amsgrad": True},
            r"^optimizer\.kwargs: fused=True together with foreach=True is refused by optimizer",
        ),
        # torch itself checks this only inside the first step().
        ({"capturable": True}, r"^optimizer\.kwargs: capturable=True is refused .*supported dev"),
    ],
)
def test_bad_kwargs_are_one_line_config_errors_at_construction(kwargs: dict, match: str) -> None:
    model = Model()
    weights = {fqn: p.detach().clone() for fqn, p in model.named_parameters()}
    rng = torch.get_rng_state()
    with pytest.raises(ConfigError, match=match) as raised:
        manager_for(model, "Adam", kwargs)
    assert "\n" not in str(raised.value)
    assert torch.equal(torch.get_rng_state(), rng)
    for fqn, p in model.named_parameters():
        assert torch.equal(p, weights[fqn]) and p.grad is None, fqn


@pytest.mark.parametrize("name", SUPPORTED)
def test_the_trial_step_leaves_the_model_and_the_optimizer_untouched(name: str) -> None:
    model = Model()
    weights = {fqn: p.detach().clone() for fqn, p in model.named_parameters()}
    cls = getattr(torch.optim, name)
    # Weight decay moves a parameter even at a zero gradient: a trial step on the model shows.
    decay = {"weight_decay": 0.1} if "weight_decay" in inspect.signature(cls).parameters else {}
    manager = manager_for(model, name, {**KWARGS.get(name, {}), **decay})
    fresh = cls([p.detach().clone() for p in model.parameters()], **KWARGS.get(name, {}))
    assert len(manager.get_optimizer().state) == len(fresh.state)  # Adagrad's, or none
    for fqn, p in model.named_parameters():
        assert torch.equal(p, weights[fqn]) and p.grad is None, fqn


# -- (d) schedulers a config cannot describe ---------------------------------------------


@pytest.mark.parametrize(
    ("name", "needs"),
    [
        ("ChainedScheduler", "other schedulers"),
        ("SequentialLR", "other schedulers"),
        ("LambdaLR", "a function"),
        ("MultiplicativeLR", "a function"),
    ],
)
def test_schedulers_built_from_python_objects_are_refused_with_an_alternative(
    name: str, needs: str
) -> None:
    model = Model()
    with pytest.raises(ConfigError, match=rf"^scheduler\.name: {name} is not supported") as raised:
        DynamicOptimizerManager(
            model, OptimizerConfig(), SchedulerConfig(name=name), trial_parameters=model.trial
        )
    message = str(raised.value)
    assert needs in message and "OneCycleLR" in message and "\n" not in message
