"""What a metric is, and how it accumulates over an evaluation pass with no host sync per
batch (architecture invariant 7); ``tolaria.task`` picks the configured ones.

* The built-ins are functions of sums kept on the device in float64 (so R²'s
  ``sum(y²) - sum(y)²/n`` does not cancel on targets far from 0), read in one transfer at
  the end: ``accuracy`` (argmax over dim 1); ``mse``, ``mae``, ``rmse`` over every target
  element; ``r2`` per target dimension, then averaged (scikit-learn's and torchmetrics'
  default).
* A ``module:attr`` with ``update``/``compute``/``reset`` (a torchmetrics metric class, or
  an instance) is copied fresh for every pass, updated per batch and computed once.
* Any other callable ``(output, target) -> number`` is averaged over samples, weighted by
  batch size: right for means such as MAE, wrong for ratios such as R² (use an object).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tolaria.config import MetricConfig
from tolaria.errors import ConfigError
from tolaria.plugins import check_kwargs, construct, resolve_callable


@dataclass(frozen=True)
class SumMetric:
    """A metric that is a function of sums: ``sums(output, target)`` is one batch's, a flat
    float64 tensor; ``value(totals, samples, elements)`` is the metric from the pass's
    totals (floats) and its sample and target-element counts."""

    sums: Callable[[Tensor, Tensor], Tensor]
    value: Callable[[list[float], int, int], float]
    higher_is_better: bool | None


@dataclass(frozen=True)
class StatefulMetric:
    """A metric object with ``update``/``compute``/``reset`` (torchmetrics); ``template`` is
    copied for every pass, so counterfactual passes never share its state."""

    template: Any
    higher_is_better: bool | None

    def fresh(self, device: torch.device) -> Any:
        metric = copy.deepcopy(self.template)
        metric.reset()
        return metric.to(device) if isinstance(metric, nn.Module) else metric


@dataclass(frozen=True)
class Metric:
    """One configured metric: its label, the config field that named it, how it is measured."""

    label: str
    field: str
    measure: SumMetric | StatefulMetric


def _errors(output: Tensor, target: Tensor) -> Tensor:
    return output.double() - target.double()


def _r2_sums(output: Tensor, target: Tensor) -> Tensor:
    # Per target dimension: the residual, target and squared-target sums.
    residual = _errors(output, target).reshape(len(output), -1)
    target = target.double().reshape(len(target), -1)
    return torch.cat([residual.square().sum(0), target.sum(0), target.square().sum(0)])


def _r2(totals: list[float], samples: int, elements: int) -> float:
    width = len(totals) // 3
    scores = []
    for residual, total, squares in zip(
        totals[:width], totals[width : 2 * width], totals[2 * width :], strict=True
    ):
        spread = squares - total * total / samples
        # Constant targets: all or nothing, as scikit-learn's r2_score (force_finite) says.
        scores.append(1.0 - residual / spread if spread > 0 else float(residual == 0))
    return sum(scores) / width


#: Built-in metrics of each kind.
METRICS: Mapping[str, Mapping[str, SumMetric]] = {
    "classification": {
        "accuracy": SumMetric(
            lambda o, t: (o.argmax(dim=1) == t).sum(dtype=torch.float64).reshape(1),
            lambda totals, samples, elements: totals[0] / elements,
            higher_is_better=True,
        ),
    },
    "regression": {
        "mse": SumMetric(
            lambda o, t: _errors(o, t).square().sum().reshape(1),
            lambda totals, samples, elements: totals[0] / elements,
            higher_is_better=False,
        ),
        "mae": SumMetric(
            lambda o, t: _errors(o, t).abs().sum().reshape(1),
            lambda totals, samples, elements: totals[0] / elements,
            higher_is_better=False,
        ),
        "rmse": SumMetric(
            lambda o, t: _errors(o, t).square().sum().reshape(1),
            lambda totals, samples, elements: math.sqrt(totals[0] / elements),
            higher_is_better=False,
        ),
        "r2": SumMetric(_r2_sums, _r2, higher_is_better=True),
    },
}


def _sample_mean(fn: Callable[..., Any]) -> SumMetric:
    """A per-batch function as a sample-weighted mean over the pass."""

    def sums(output: Tensor, target: Tensor) -> Tensor:
        value = torch.as_tensor(fn(output, target), dtype=torch.float64, device=output.device)
        return (value * len(output)).reshape(1)

    return SumMetric(sums, lambda totals, samples, elements: totals[0] / samples, None)


def _is_stateful(target: Any) -> bool:
    return all(callable(getattr(target, m, None)) for m in ("update", "compute", "reset"))


def user_metric(spec: MetricConfig, field: str) -> SumMetric | StatefulMetric:
    """The metric a ``module:attr`` entry names: a metric object (or its class, built with
    the entry's ``kwargs``), else a per-batch function averaged over samples."""
    target = resolve_callable(spec.name, f"{field}.name")
    if spec.kwargs and _is_stateful(target) and not isinstance(target, type):
        raise ConfigError(f"{field}.kwargs: {spec.name!r} is a metric object, built already")
    metric = bind(target, spec.kwargs, f"{field}.name={spec.name!r}", f"{field}.kwargs")
    if not _is_stateful(metric):
        return _sample_mean(metric)
    higher = getattr(metric, "higher_is_better", None)
    return StatefulMetric(metric, higher if isinstance(higher, bool) else None)


def bind(target: Callable[..., Any], kwargs: Mapping[str, Any], field: str, kwargs_field: str):
    """A class is built with ``kwargs``; a function ``(output, target)`` gets them at every
    call."""
    if isinstance(target, type):
        check_kwargs(target, kwargs, kwargs_field)
        return construct(target, field, **kwargs)
    check_kwargs(target, kwargs, kwargs_field, positional=2)
    return functools.partial(target, **kwargs) if kwargs else target
