"""LR schedules survive rebuilds; the seed warm-up composes with them."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from test_optim import Trial
from test_optim_state import through_json
from tolaria.config import OptimizerConfig, SchedulerConfig
from tolaria.errors import ConfigError
from tolaria.optim import DynamicOptimizerManager

STEPS_PER_EPOCH = 4
EPOCHS = 6
#: A validation loss that improves, then plateaus (ReduceLROnPlateau must fire).
LOSSES = [1.0, 0.8, 0.8, 0.8, 0.8, 0.8]


class Growing(nn.Module):
    """A host the test grows, fossilizes and culls by hand, as Kasmina would."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.trial = Trial()

    def graft(self, name: str) -> None:
        self.body.register_parameter(name, nn.Parameter(torch.zeros(3)))
        self.trial.names.add(f"body.{name}")

    def fossilize(self, name: str) -> None:
        self.trial.names.discard(f"body.{name}")

    def cull(self, name: str) -> None:
        delattr(self.body, name)
        self.trial.names.discard(f"body.{name}")


#: (epoch, step within epoch) -> what happens to the model just before that step.
GROWTH = {
    (0, 2): lambda m: m.graft("a"),
    (1, 1): lambda m: None,  # a rebuild with nothing changed
    (2, 0): lambda m: m.fossilize("a"),
    (2, 3): lambda m: m.graft("b"),
    (4, 1): lambda m: m.cull("b"),
}


def lr_trace(
    scheduler: SchedulerConfig, *, warmup: int = 0, growth=None
) -> tuple[list[tuple[float, float]], DynamicOptimizerManager]:
    """(host LR, seed LR) used by every optimizer step of a short run."""
    model = Growing()
    config = OptimizerConfig(name="Adam", lr=0.1, seed_lr_multiplier=0.5, seed_warmup_steps=warmup)
    manager = DynamicOptimizerManager(
        model,
        config,
        scheduler,
        total_steps=EPOCHS * STEPS_PER_EPOCH,
        steps_per_epoch=STEPS_PER_EPOCH,
        trial_parameters=model.trial,
    )
    optimizer = manager.get_optimizer()
    trace = []
    for epoch in range(EPOCHS):
        for step in range(STEPS_PER_EPOCH):
            if growth and (epoch, step) in growth:
                growth[epoch, step](model)
                manager.rebuild_optimizer()
            trace.append(tuple(group["lr"] for group in optimizer.param_groups))
            optimizer.step()
            manager.after_optimizer_step()
        manager.end_epoch(LOSSES[epoch])
    return trace, manager


SCHEDULERS = {
    "StepLR": ({"step_size": 2}, "epoch"),
    "CosineAnnealingLR": ({}, "epoch"),  # T_max comes from the run's horizon
    "OneCycleLR": ({"max_lr": 0.4}, "step"),  # total_steps comes from the run's horizon
    "ReduceLROnPlateau": ({"patience": 0, "factor": 0.5}, "epoch"),
    "CosineAnnealingWarmRestarts": ({"T_0": 5}, "step"),
    "LinearLR": ({"start_factor": 0.25, "total_iters": 6}, "step"),
    "CyclicLR": ({"base_lr": 0.01, "max_lr": 0.2, "step_size_up": 3}, "step"),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_rebuilds_leave_every_group_lr_exactly_on_schedule(name: str) -> None:
    kwargs, interval = SCHEDULERS[name]
    config = SchedulerConfig(name=name, kwargs=kwargs, interval=interval)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimizer.step() before lr_scheduler.step()"
        reference, _ = lr_trace(config)
        grown, manager = lr_trace(config, growth=GROWTH)
    assert len({host for host, _ in reference}) > 2, "the schedule must actually move"
    assert grown == reference
    assert manager.manifest() == {"body.weight": "host", "body.bias": "host", "body.a": "host"}


def test_horizon_fills_missing_arguments_and_per_group_peaks() -> None:
    _, cosine = lr_trace(SchedulerConfig(name="CosineAnnealingLR"))
    assert cosine.scheduler.T_max == EPOCHS
    trace, _ = lr_trace(SchedulerConfig(name="OneCycleLR", kwargs={"max_lr": 0.4}, interval="step"))
    # The seed group peaks at max_lr * seed_lr_multiplier, not at the host's max_lr.
    host_peak, seed_peak = (max(lrs) for lrs in zip(*trace, strict=True))
    assert host_peak > 0.3
    assert seed_peak == pytest.approx(host_peak * 0.5)
    # Without max_lr, the cycle peaks at the optimizer's configured lr (0.1 here).
    trace, _ = lr_trace(SchedulerConfig(name="OneCycleLR", interval="step"))
    host_peak, seed_peak = (max(lrs) for lrs in zip(*trace, strict=True))
    assert 0.09 < host_peak <= 0.1
    assert seed_peak == pytest.approx(host_peak * 0.5)


def test_plateau_steps_on_the_epoch_loss_even_with_step_interval() -> None:
    config = SchedulerConfig(name="ReduceLROnPlateau", kwargs={"patience": 0}, interval="step")
    trace, _ = lr_trace(config)
    epoch_lrs = [trace[e * STEPS_PER_EPOCH][0] for e in range(EPOCHS)]
    # Constant inside each epoch; reduced only after the loss stopped improving.
    assert all(len({h for h, _ in trace[e * 4 : e * 4 + 4]}) == 1 for e in range(EPOCHS))
    assert epoch_lrs[:3] == [0.1, 0.1, 0.1] and epoch_lrs[3] == pytest.approx(0.01)


def test_warmup_ramps_new_seeds_and_restarts_for_a_second_seed() -> None:
    growth = {(0, 1): lambda m: m.graft("a"), (1, 0): lambda m: m.graft("b")}
    trace, _ = lr_trace(SchedulerConfig(), warmup=4, growth=growth)
    seed = [s for _, s in trace]
    full = 0.1 * 0.5
    # "a" joins before step 1 and ramps; "b" joins before step 4, mid-ramp, and restarts it.
    ramp = [full * (k / 4) for k in range(1, 5)]
    assert seed[1:4] == ramp[:3]
    assert seed[4:9] == [*ramp, full]
    assert all(host == 0.1 for host, _ in trace)


def test_warmup_is_a_factor_on_top_of_the_scheduler() -> None:
    config = SchedulerConfig(name="StepLR", kwargs={"step_size": 3, "gamma": 0.5}, interval="step")
    growth = {(0, 1): lambda m: m.graft("a")}
    reference, _ = lr_trace(config, growth=growth)
    warmed, _ = lr_trace(config, warmup=5, growth=growth)
    assert [h for h, _ in warmed] == [h for h, _ in reference]
    for k, ((_, ref), (_, warm)) in enumerate(zip(reference[1:], warmed[1:], strict=True), 1):
        assert warm == ref * min(1.0, k / 5)
    assert len({ref for _, ref in reference[1:6]}) > 1, "the schedule moved during the ramp"


def test_warmup_reaches_the_parameters() -> None:
    model = Growing()
    model.graft("a")
    config = OptimizerConfig(name="SGD", lr=0.1, seed_lr_multiplier=0.5, seed_warmup_steps=4)
    manager = DynamicOptimizerManager(model, config, trial_parameters=model.trial)
    model.body.a.grad = torch.ones(3)
    manager.get_optimizer().step()
    assert torch.equal(model.body.a.detach(), torch.full((3,), -0.1 * 0.5 / 4))


def test_schedule_and_warmup_resume_from_a_state_dict() -> None:
    config = SchedulerConfig(name="StepLR", kwargs={"step_size": 3, "gamma": 0.5}, interval="step")
    optimizer = OptimizerConfig(name="Adam", lr=0.1, seed_warmup_steps=6)

    def manager_for(model: Growing) -> DynamicOptimizerManager:
        return DynamicOptimizerManager(model, optimizer, config, trial_parameters=model.trial)

    def step(manager: DynamicOptimizerManager) -> None:
        manager.get_optimizer().step()
        manager.after_optimizer_step()

    a = Growing()
    ma = manager_for(a)
    for _ in range(4):
        step(ma)
    a.graft("a")
    ma.rebuild_optimizer()
    step(ma)  # mid-ramp and mid-schedule
    b = Growing()
    b.graft("a")
    mb = manager_for(b)  # its own warm-up started at step 0
    mb.load_state_dict(through_json(ma.state_dict()))
    for _ in range(8):
        assert [g["lr"] for g in mb.get_optimizer().param_groups] == [
            g["lr"] for g in ma.get_optimizer().param_groups
        ]
        step(ma)
        step(mb)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (SchedulerConfig(name="StepLRR"), "'StepLRR' is not a torch.optim.lr_scheduler"),
        (SchedulerConfig(name="StepLR", kwargs={"stepsize": 2}), "scheduler StepLR"),
        (SchedulerConfig(name="CosineAnnealingLR"), "scheduler CosineAnnealingLR"),  # no T_max
    ],
)
def test_bad_scheduler_config_is_a_config_error(config: SchedulerConfig, match: str) -> None:
    model = Growing()
    with pytest.raises(ConfigError, match=match):
        DynamicOptimizerManager(model, OptimizerConfig(), config, trial_parameters=model.trial)
