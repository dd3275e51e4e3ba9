"""Emergency detection and the incident memory that keeps a rollback from looping.

Three emergencies end an epoch with ``emergency_rollback_required``:

* ``nonfinite_loss`` -- the training or validation loss is NaN or infinite;
* ``divergence`` -- the training or validation loss exceeds ``chance_loss_factor`` times
  the chance level (the loss of an output that knows nothing: a uniform guess, ``ln(classes)``
  for cross-entropy; for regression, predicting the training targets' mean), from the first
  epoch on: a model that bad has diverged, not merely stalled; or the validation loss exceeds
  ``divergence_factor`` times the best
  validation loss of the last ``divergence_window`` epochs (or times
  ``divergence_loss_floor``, whichever is larger), for ``divergence_epochs`` consecutive
  epochs.  The floor keeps a model that fits its data almost perfectly from "diverging"
  when its loss wobbles from 1e-5 to 1e-4;
* ``collapse`` -- the validation score falls to chance plus ``collapse_margin`` after the
  model had once been above it: accuracy ``1 / classes``, R² 0 (the mean's); a score whose
  chance level is not known by definition has no collapse check.

An incident is keyed by ``"{kind}@{epoch}"``: a rollback replays the epochs after the
restored snapshot deterministically, so the same failure recurring at the same epoch
has the same key.  The :class:`IncidentMemory` counts keys and remembers which
(seed, blueprint) pairs were grafted or advanced shortly before each incident; it is
*merged* into a restored controller rather than overwritten, which is what lets the
controller avoid replaying the decision that led to the failure.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from tolaria.contracts import SystemStatePacket


@dataclass(frozen=True)
class ChanceLevel:
    """What knowing nothing scores on this task: the detector's reference for "this bad".

    ``loss``: the loss of an output that knows nothing (not positive, e.g. for a
    log-likelihood loss: no chance-level divergence check); ``score``: the validation score
    of chance, None where it is not known by definition (no collapse check); ``what``: how
    the reference was found, for the incident's reason.
    """

    loss: float
    score: float | None
    what: str

    @classmethod
    def of_classes(cls, num_classes: int) -> ChanceLevel:
        """A uniform guess over ``num_classes``: cross-entropy ``ln(C)``, accuracy ``1/C``."""
        return cls(math.log(num_classes), 1.0 / num_classes, "ln(classes), a uniform guess")


@dataclass(frozen=True)
class Emergency:
    kind: str
    epoch: int
    reason: str

    @property
    def key(self) -> str:
        return f"{self.kind}@{self.epoch}"


class EmergencyDetector:
    """Watches the validation metrics epoch by epoch; holds only a short loss history."""

    def __init__(
        self,
        *,
        chance: ChanceLevel,
        collapse_margin: float,
        chance_loss_factor: float,
        divergence_factor: float,
        divergence_epochs: int,
        divergence_window: int,
        divergence_loss_floor: float,
    ) -> None:
        self.chance = chance
        # A multiple of a chance loss <= 0 (a log-likelihood can be negative) says nothing.
        usable = math.isfinite(chance.loss) and chance.loss > 0
        self.loss_limit = chance_loss_factor * chance.loss if usable else math.inf
        self.chance_loss_factor = chance_loss_factor
        self.collapse_margin = collapse_margin
        self.divergence_factor = divergence_factor
        self.divergence_epochs = divergence_epochs
        self.divergence_loss_floor = divergence_loss_floor
        self.recent_losses: deque[float] = deque(maxlen=divergence_window)
        self.spike_epochs = 0
        self.best_accuracy = -math.inf

    def check(self, packet: SystemStatePacket) -> Emergency | None:
        """Return the emergency this packet shows, or None and fold it into the history.

        An emergency epoch is not added to the history: the rollback that follows
        discards it, and a restored controller must not have seen it.
        """
        epoch = packet.current_epoch
        losses = {"training": packet.training_loss, "validation": packet.validation_loss}
        for name, value in losses.items():
            if not math.isfinite(value):
                return Emergency("nonfinite_loss", epoch, f"{name} loss is {value}")
        if not math.isfinite(packet.validation_accuracy):
            return Emergency(
                "nonfinite_loss", epoch, f"validation accuracy is {packet.validation_accuracy}"
            )
        for name, value in losses.items():
            if value > self.loss_limit:
                return Emergency(
                    "divergence",
                    epoch,
                    f"{name} loss {value:.4g} > {self.chance_loss_factor} x the chance level "
                    f"{self.chance.loss:.3g} ({self.chance.what})",
                )

        if self.chance.score is not None:
            floor = self.chance.score + self.collapse_margin
            if packet.validation_accuracy <= floor < self.best_accuracy:
                return Emergency(
                    "collapse",
                    epoch,
                    f"validation score {packet.validation_accuracy:.4f} fell to chance "
                    f"(<= {floor:.4f}) after reaching {self.best_accuracy:.4f}",
                )

        reference = max(min(self.recent_losses, default=math.inf), self.divergence_loss_floor)
        if packet.validation_loss > self.divergence_factor * reference:
            self.spike_epochs += 1
            if self.spike_epochs >= self.divergence_epochs:
                return Emergency(
                    "divergence",
                    epoch,
                    f"validation loss {packet.validation_loss:.4g} > {self.divergence_factor} x "
                    f"recent best {reference:.4g} for {self.spike_epochs} epoch(s)",
                )
            # A spike still within tolerance is not folded into the history: it must
            # not become the reference that hides a sustained divergence.
            return None
        self.spike_epochs = 0
        self.recent_losses.append(packet.validation_loss)
        self.best_accuracy = max(self.best_accuracy, packet.validation_accuracy)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "recent_losses": list(self.recent_losses),
            "spike_epochs": self.spike_epochs,
            "best_accuracy": self.best_accuracy if math.isfinite(self.best_accuracy) else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent_losses.clear()
        self.recent_losses.extend(state["recent_losses"])
        self.spike_epochs = state["spike_epochs"]
        best = state["best_accuracy"]
        self.best_accuracy = -math.inf if best is None else best


class IncidentMemory:
    """How often each incident happened and which grafts were implicated.

    ``forbidden`` holds (seed_id, blueprint) pairs that were grafted, advanced or
    fossilized in the epochs before an incident; the policy never grafts them again
    and culls a seed that still holds one after the rollback.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.forbidden: set[tuple[str, str]] = set()

    def record(self, emergency: Emergency, suspects: list[tuple[str, str]]) -> int:
        """Count one more occurrence of ``emergency`` and forbid its suspects."""
        self.counts[emergency.key] = self.counts.get(emergency.key, 0) + 1
        self.forbidden.update(suspects)
        return self.counts[emergency.key]

    def is_forbidden(self, seed_id: str, blueprint: str | None) -> bool:
        return blueprint is not None and (seed_id, blueprint) in self.forbidden

    def state_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(sorted(self.counts.items())),
            "forbidden": sorted([list(pair) for pair in self.forbidden]),
        }

    def merge_state_dict(self, state: dict[str, Any]) -> None:
        """Union with a (typically older) saved memory: counts only ever grow."""
        for key, count in state["counts"].items():
            self.counts[key] = max(self.counts.get(key, 0), count)
        self.forbidden.update((seed_id, blueprint) for seed_id, blueprint in state["forbidden"])
