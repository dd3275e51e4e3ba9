"""User code named in configs by the task tests (``plugins_for_task_tests:...``)."""

from __future__ import annotations

import torchmetrics
from torch.nn import functional as F

#: How often ``smooth_l1`` ran, so a test can see the configured loss is the one trained.
CALLS = {"smooth_l1": 0}


def smooth_l1(output, target, beta=1.0):
    """A user loss ``(output, target) -> scalar``, with a keyword from ``task.loss_kwargs``."""
    CALLS["smooth_l1"] += 1
    return F.smooth_l1_loss(output, target, beta=beta)


def worst_error(output, target):
    """A per-batch function metric with no ``higher_is_better``: monitoring it needs a mode."""
    return (output - target).abs().max()


#: A metric object named as an instance: every pass must get its own copy of its state.
SHARED_MAE = torchmetrics.regression.MeanAbsoluteError()
