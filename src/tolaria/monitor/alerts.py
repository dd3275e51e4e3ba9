"""An alert: a metric past its threshold, as a record a terminal, a dashboard and TensorBoard
all show the same way (design §7, ACADEMY.md §5)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Alert:
    #: When the metric was measured (unix seconds).
    time: float
    #: The metric's name: ``policy_success_rate``, ``validation_divergence``, ...
    metric: str
    value: float
    threshold: float
    #: What is alerted on: ``"academy"`` or a run's id (its directory).
    scope: str
    #: One line for a human: what crossed which threshold.
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
