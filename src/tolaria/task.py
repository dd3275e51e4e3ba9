"""What is learned and how it is scored: the task's loss, its metrics and its monitor.

``TaskConfig.kind`` is ``classification`` (integer class targets; the model outputs one
logit per class) or ``regression`` (real targets; the model outputs one value per target
dimension, the data's ``num_classes``).  A regression target is shaped like the output and
made floating point before the loss and the metrics see it.  An :class:`Evaluation` is one
pass's running loss and metrics (``tolaria.metrics``: on the device, read once at the end).

**The monitor** is the one number Tamiyo's evidence (a seed's counterfactual gain, decision
outcomes, collapse) and the run's "best" use.  ``EvalMetrics.accuracy``, and with it the
packet's ``validation_accuracy``, holds it as a *score*, higher is better: the monitor's
value in ``max`` mode, its negation in ``min`` mode (monitoring ``mse`` stores ``-mse``).
Tamiyo's plateau stays on the validation loss, which is the task's own loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset, default_collate

from tolaria.config import MetricConfig, TaskConfig
from tolaria.contracts import EvalMetrics
from tolaria.data import DataBundle
from tolaria.errors import ConfigError
from tolaria.metrics import METRICS, Metric, StatefulMetric, SumMetric, bind, user_metric
from tolaria.plugins import check_kwargs, construct, is_reference, resolve_callable
from tolaria.tamiyo.emergency import ChanceLevel

#: Training targets the chance level is measured on, spread over the split: plenty for a
#: mean, and few enough to read from a dataset on disk in a moment.
CHANCE_SAMPLES = 1024

#: Built-in losses of each kind.
LOSSES: Mapping[str, Mapping[str, type[nn.Module]]] = {
    "classification": {"cross_entropy": nn.CrossEntropyLoss},
    "regression": {"mse": nn.MSELoss, "mae": nn.L1Loss, "l1": nn.L1Loss, "huber": nn.HuberLoss},
}

#: Each kind's loss, metrics and monitor when the config leaves them out.
DEFAULTS: Mapping[str, tuple[str, tuple[str, ...], str]] = {
    "classification": ("cross_entropy", ("accuracy",), "accuracy"),
    "regression": ("mse", ("mse", "mae", "r2"), "r2"),
}


def prepare_target(kind: str, output: Tensor, target: Tensor) -> Tensor:
    """The target as the loss and the metrics see it: a regression target takes the
    output's shape, ``(B,)`` for an output ``(B, 1)``, and a floating type (float32 at least,
    so a bfloat16 output does not round the targets)."""
    if kind == "classification":
        return target
    if target.shape != output.shape:
        if target.numel() != output.numel():
            raise ConfigError(
                f"task.kind=regression: targets of shape {tuple(target.shape)} do not fit the "
                f"model's output of shape {tuple(output.shape)} (the model's output width is "
                "the data's num_classes)"
            )
        target = target.reshape(output.shape)
    return target.to(torch.promote_types(output.dtype, torch.float32))


class TaskLoss:
    """The configured loss as the trainer calls it: ``(output, target) -> scalar``."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], kind: str) -> None:
        self.fn = fn
        self.kind = kind

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        return self.fn(output, prepare_target(self.kind, output, target))

    def to(self, device: torch.device) -> TaskLoss:
        """Move a loss module's buffers (a class weight, say) to ``device``."""
        if isinstance(self.fn, nn.Module):
            self.fn.to(device)
        return self


# --- the task -----------------------------------------------------------------------------


class Task:
    """The configured task: the loss the trainer minimises, the metrics an evaluation pass
    measures and the monitor its score is."""

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.kind = config.kind
        #: Names the loss in the one line a failure of it becomes.
        self.loss_field = f"task.loss={config.loss or DEFAULTS[self.kind][0]!r}"
        self.loss = TaskLoss(self._build_loss(), self.kind)
        self.metrics = self._build_metrics()
        self.monitor, self.mode = self._choose_monitor()

    def evaluation(self, device: torch.device) -> Evaluation:
        return Evaluation(self, device)

    def score(self, loss: float, values: Mapping[str, float]) -> float:
        """The monitor as a score: higher is better (``EvalMetrics.accuracy``)."""
        return self.monitored(loss if self.monitor == "loss" else values[self.monitor])

    def monitored(self, score: float) -> float:
        """The monitor's own value for ``score``, and back: negation is its own inverse."""
        return score if self.mode == "max" else -score

    def chance_level(self, data: DataBundle, sample_output: Tensor) -> ChanceLevel:
        """What an output that knows nothing scores: the loss Tamiyo's divergence check
        scales, and the score below which it calls a collapse.

        Classification: zero logits, a uniform guess (``ln(classes)`` for cross-entropy),
        chance accuracy ``1/classes``.  Regression: the training targets' mean, whose R² is 0.
        Measured on up to ``CHANCE_SAMPLES`` training targets with the loss and every metric,
        on an output shaped like ``sample_output`` (the model's, on a sample batch), so a loss
        or metric that cannot score this model on this data fails now, in one line.
        """
        if self.kind == "classification" and data.num_classes < 2:
            raise ConfigError(
                f"task.kind=classification needs at least 2 classes; data.dataset="
                f"{data.name!r} has {data.num_classes} output(s): is it task.kind=regression?"
            )
        targets = _training_targets(data.train)
        blank = sample_output.detach().new_zeros((len(targets), *sample_output.shape[1:]))
        # The one chance score known by definition per kind: the built-in metric's.
        if self.kind == "classification":
            what, known, score = "the loss of a uniform guess", "accuracy", 1.0 / data.num_classes
        else:
            targets = prepare_target(self.kind, blank, targets)
            blank = targets.mean(dim=0, keepdim=True).expand_as(targets)
            what, known, score = "the loss of predicting the training targets' mean", "r2", 0.0
        evaluation = self.evaluation(torch.device("cpu"))
        evaluation.update(blank, targets)
        loss = evaluation.result().loss
        monitored = next((m.measure for m in self.metrics if m.label == self.monitor), None)
        return ChanceLevel(loss, score if monitored is METRICS[self.kind][known] else None, what)

    # ------------------------------------------------------------------ from the config
    def _build_loss(self) -> Callable[[Tensor, Tensor], Tensor]:
        name, field = self.config.loss or DEFAULTS[self.kind][0], self.loss_field
        kwargs = self.config.loss_kwargs
        if is_reference(name):
            return bind(resolve_callable(name, "task.loss"), kwargs, field, "task.loss_kwargs")
        builtins = LOSSES[self.kind]
        if name not in builtins:
            raise ConfigError(
                f"{field}: {_not_for(name, LOSSES, 'loss')}; task.kind={self.kind} takes "
                f"{', '.join(builtins)} (or 'module:attr' for your own)"
            )
        check_kwargs(builtins[name], kwargs, "task.loss_kwargs")
        return construct(builtins[name], field, **kwargs)

    def _build_metrics(self) -> list[Metric]:
        specs = self.config.metrics
        if specs is None:
            specs = [MetricConfig(name=name) for name in DEFAULTS[self.kind][1]]
        builtins = METRICS[self.kind]
        metrics: list[Metric] = []
        for index, spec in enumerate(specs):
            field = f"task.metrics.{index}"
            if is_reference(spec.name):
                measure = user_metric(spec, field)
                label = spec.label or spec.name.partition(":")[2].rsplit(".", 1)[-1]
            elif spec.name in builtins:
                if spec.kwargs:
                    raise ConfigError(f"{field}.kwargs: the built-in {spec.name!r} takes none")
                measure, label = builtins[spec.name], spec.label or spec.name
            else:
                raise ConfigError(
                    f"{field}={spec.name!r}: {_not_for(spec.name, METRICS, 'metric')}; "
                    f"task.kind={self.kind} has {', '.join(builtins)} (or 'module:attr' for "
                    "your own, e.g. a torchmetrics class)"
                )
            taken = ["loss", *(m.label for m in metrics)]
            if label in taken:
                raise ConfigError(
                    f"{field}: the label {label!r} is taken (by "
                    f"{'the loss' if label == 'loss' else 'another metric'}); give it a label"
                )
            metrics.append(Metric(label, f"{field}={spec.name!r}", measure))
        return metrics

    def _choose_monitor(self) -> tuple[str, str]:
        default = DEFAULTS[self.kind][2]
        monitor = self.config.monitor or default
        labels = [m.label for m in self.metrics]
        if monitor == "loss":
            higher = False
        elif monitor in labels:
            higher = self.metrics[labels.index(monitor)].measure.higher_is_better
        else:
            which = "" if self.config.monitor else " (the default)"
            raise ConfigError(
                f"task.monitor={monitor!r}{which} is not among the metrics "
                f"({', '.join(labels) or 'none'}); name one of them, or 'loss'"
            )
        if self.config.mode is not None:
            return monitor, self.config.mode
        if higher is None:
            raise ConfigError(
                f"task.mode: say whether a higher {monitor} is better (max or min): "
                "it is your own metric"
            )
        return monitor, "max" if higher else "min"


def _not_for(name: str, builtins: Mapping[str, Mapping[str, Any]], what: str) -> str:
    """Why a built-in name does not fit: the other kind's, or no such thing."""
    kinds = [kind for kind, names in builtins.items() if name in names]
    return f"a {kinds[0]} {what}" if kinds else f"unknown {what}"


def _training_targets(dataset: Dataset) -> Tensor:
    n = len(dataset)  # type: ignore[arg-type]
    indices = range(0, n, max(n // CHANCE_SAMPLES, 1))[:CHANCE_SAMPLES]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1][torch.as_tensor(indices)]
    return default_collate([dataset[i][1] for i in indices])


class Evaluation:
    """One evaluation pass of a task: the loss and the sum metrics as running sums on the
    device, metric objects updated per batch; ``result`` reads it all once."""

    def __init__(self, task: Task, device: torch.device) -> None:
        self.task = task
        self.samples = 0
        self.elements = 0
        self._loss = torch.zeros(1, dtype=torch.float64, device=device)
        self._sums: dict[str, Tensor] = {}
        self._objects = {
            m.label: m.measure.fresh(device)
            for m in task.metrics
            if isinstance(m.measure, StatefulMetric)
        }

    def update(self, output: Tensor, target: Tensor) -> None:
        task = self.task
        target = prepare_target(task.kind, output, target)
        batch = len(target)
        self._loss += construct(task.loss, task.loss_field, output, target).double() * batch
        for metric in task.metrics:
            if isinstance(metric.measure, SumMetric):
                sums = construct(metric.measure.sums, metric.field, output, target)
                previous = self._sums.get(metric.label)
                self._sums[metric.label] = sums if previous is None else previous + sums
            else:
                construct(self._objects[metric.label].update, metric.field, output, target)
        self.samples += batch
        self.elements += target.numel()

    def add_up(self, sum_over_ranks: Callable[[Tensor], Tensor]) -> None:
        """Make this pass the pass over every rank's part of the split: its running sums
        and counts, packed in one float64 vector, become ``sum_over_ranks`` of them (one
        all-reduce).  Metric objects keep state of their own and cannot be added up."""
        if self._objects:
            raise ConfigError(
                f"task.metrics: {', '.join(self._objects)} keep their own state; a "
                "multi-process run can only add up sum metrics"
            )
        sums = [self._loss, *self._sums.values()]
        counts = torch.tensor([self.samples, self.elements], dtype=torch.float64,
                              device=self._loss.device)
        total = sum_over_ranks(torch.cat([*(t.double().flatten() for t in sums), counts]))
        *added, counts = total.split([t.numel() for t in sums] + [2])
        added = [new.view_as(old).to(old.dtype) for new, old in zip(added, sums, strict=True)]
        self._loss, self._sums = added[0], dict(zip(self._sums, added[1:], strict=True))
        self.samples, self.elements = (int(v) for v in counts.tolist())

    def result(self) -> EvalMetrics:
        if not self.samples:  # an empty split measures nothing
            values = {m.label: math.nan for m in self.task.metrics}
            return EvalMetrics(math.nan, math.nan, values)
        flat = torch.cat([self._loss, *self._sums.values()]).tolist()  # the pass's one read
        loss, offset, totals = flat[0] / self.samples, 1, {}
        for label, sums in self._sums.items():
            totals[label], offset = flat[offset : offset + sums.numel()], offset + sums.numel()
        values = {}
        for metric in self.task.metrics:
            if isinstance(metric.measure, SumMetric):
                value = metric.measure.value(totals[metric.label], self.samples, self.elements)
            else:
                value = _one_number(construct(self._objects[metric.label].compute, metric.field),
                                    metric.field)
            values[metric.label] = value
        return EvalMetrics(loss, self.task.score(loss, values), values)


def _one_number(value: Any, field: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"{field}: compute() gave {value!r:.80}, not one number") from None
