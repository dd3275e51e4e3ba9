"""Learning-rate schedules for a growing model: the user's scheduler plus the seed warm-up.

The optimizer of ``DynamicOptimizerManager`` has a fixed pair of param groups (host, seed)
created once, so every ``torch.optim.lr_scheduler`` class keeps valid per-group lists
(``base_lrs``, ``min_lrs``, OneCycle's ``max_lr``...) however often the model grows.

Two factors set the seed group's learning rate at optimizer step ``t``::

    lr_seed(t) = scheduled_seed_lr(t) * warmup(t)

``scheduled_seed_lr`` belongs to the scheduler alone: it starts at
``optimizer.lr * seed_lr_multiplier`` and evolves exactly as the scheduler would evolve
it with no warm-up.  ``warmup`` belongs to ``SeedWarmup``.  The manager hands the
scheduler the bare scheduled value around each of its steps (chainable schedulers read
``group["lr"]``), so the warm-up never leaks into the schedule.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch.optim import lr_scheduler

from tolaria.config import SchedulerConfig
from tolaria.errors import ConfigError

Scheduler = lr_scheduler.LRScheduler

#: Scheduler arguments that are learning rates, one per param group.  A single number is
#: expanded to ``[value, value * seed_lr_multiplier]`` so the seed group keeps its multiplier.
_PER_GROUP_LR_ARGS = ("max_lr", "base_lr")
#: Required scheduler arguments that are Python objects, which a config cannot hold.
_OBJECT_ARGS = {"lr_lambda": "a function", "schedulers": "other schedulers"}


class SeedWarmup:
    """A linear ramp of the seed group's learning rate, restarted when parameters join it.

    With ``steps = W > 0``, the ``k``-th optimizer step after a restart (``k = 1, 2, ...``)
    uses ``factor = min(1, k / W)``; with ``W = 0`` the factor is always 1.

    A second seed joining while the first is mid-warm-up restarts the ramp for the whole
    seed group.  The alternatives are worse: letting the newcomer join at the group's
    current factor gives fresh Adam moments (whose first updates are ~lr in size whatever
    the gradient) nearly the full LR, and per-seed groups break schedulers' per-group
    lists and fused kernels.  The restart is conservative: no parameter ever trains at a
    higher factor than its own solo warm-up would give it; the older seed merely ramps
    again, which costs it at most ``W`` steps at reduced LR.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps
        #: The optimizer step count at the last restart; None before any seed joined.
        self.started_at: int | None = None

    def restart(self, step: int) -> None:
        self.started_at = step

    def factor(self, step: int) -> float:
        """Factor for the next optimizer step, after ``step`` steps have been taken."""
        if self.steps == 0 or self.started_at is None:
            return 1.0
        return min(1.0, (step - self.started_at + 1) / self.steps)


def is_plateau(scheduler: Scheduler | None) -> bool:
    """ReduceLROnPlateau steps on a metric, so only ``end_epoch`` can step it."""
    return isinstance(scheduler, lr_scheduler.ReduceLROnPlateau)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    config: SchedulerConfig,
    *,
    seed_lr_multiplier: float,
    total_steps: int | None,
    steps_per_epoch: int | None,
) -> Scheduler | None:
    """Build the configured scheduler on ``optimizer``, or None for a constant LR.

    Arguments the config leaves out are filled from the run's horizon (in scheduler steps:
    optimizer steps when ``interval == "step"``, epochs otherwise): ``total_steps`` for
    OneCycleLR (unless ``epochs`` is given) and ``T_max`` for CosineAnnealingLR; OneCycleLR's
    ``max_lr`` defaults to the optimizer's configured ``lr``.
    A wrong name or argument is a ``ConfigError``, and so is a scheduler built from functions
    or other schedulers (LambdaLR, SequentialLR, ChainedScheduler...).
    """
    if config.name is None:
        return None
    cls = _scheduler_class(config.name)
    accepted = inspect.signature(cls).parameters
    objects = [
        f"{what} ({arg})"
        for arg, what in _OBJECT_ARGS.items()
        if arg in accepted and accepted[arg].default is inspect.Parameter.empty
    ]
    if objects:
        raise ConfigError(
            f"scheduler.name: {config.name} is not supported from the config, it needs "
            f"{' and '.join(objects)}; configure a single scheduler instead: OneCycleLR for "
            "a warm-up then a decay, CosineAnnealingWarmRestarts for repeated decays, LinearLR "
            "for a ramp (new seeds ramp by optimizer.seed_warmup_steps)"
        )
    kwargs = dict(config.kwargs)
    horizon = _horizon(config.interval, total_steps, steps_per_epoch)
    if horizon is not None:
        kwargs.update(dict.fromkeys(_horizon_arguments(accepted, kwargs), horizon))
    if "max_lr" in accepted and "max_lr" not in kwargs:
        kwargs["max_lr"] = optimizer.param_groups[0]["lr"]  # OneCycleLR peaks at optimizer.lr
    for arg in _PER_GROUP_LR_ARGS:
        value = kwargs.get(arg)
        if arg in accepted and isinstance(value, numbers.Real):
            kwargs[arg] = [value, value * seed_lr_multiplier]
    try:
        return cls(optimizer, **kwargs)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"scheduler {config.name}: {exc}") from None


def horizon_arguments(config: SchedulerConfig) -> list[str]:
    """The arguments of the configured scheduler that the run's length fills in."""
    if config.name is None:
        return []
    cls = _scheduler_class(config.name)
    return _horizon_arguments(inspect.signature(cls).parameters, config.kwargs)


def _scheduler_class(name: str) -> type[Scheduler]:
    cls = getattr(lr_scheduler, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Scheduler)) or cls is Scheduler:
        raise ConfigError(f"scheduler.name: {name!r} is not a torch.optim.lr_scheduler class")
    return cls


def _horizon_arguments(accepted: Mapping[str, Any], kwargs: Mapping[str, Any]) -> list[str]:
    # OneCycleLR derives its length from ``epochs`` (with steps_per_epoch) when given that.
    names = []
    if "total_steps" in accepted and not {"total_steps", "epochs"} & kwargs.keys():
        names.append("total_steps")
    if "T_max" in accepted and "T_max" not in kwargs:
        names.append("T_max")
    return names


def _horizon(interval: str, total_steps: int | None, steps_per_epoch: int | None) -> int | None:
    if total_steps is None:
        return None
    if interval == "step":
        return total_steps
    if steps_per_epoch is None:
        return None
    return max(1, total_steps // steps_per_epoch)
