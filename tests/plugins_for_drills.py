"""User code named by the drills' configs (``plugins_for_drills:...``)."""

from __future__ import annotations

import math

import torch

from tolaria.hosts import MLPHost

POISONS = {"nan": math.nan, "inf": math.inf}


class PoisonedHost(MLPHost):
    """The built-in MLP, but its logits are all NaN or all inf in chosen epochs: a user's
    model gone bad, with no hook into Tolaria.

    Epochs are counted by the ``model.train()`` call that starts each one, so an epoch run
    again after a rollback counts as a new one: ``epochs`` are epoch *starts* (0-based).
    """

    def __init__(self, input_shape, num_classes, *, poison: str, epochs: set[int],
                 hidden=(32, 32)) -> None:
        super().__init__(input_shape, num_classes, hidden)
        self.poison = POISONS[poison]
        self.epochs = epochs
        self.starts = 0

    def train(self, mode: bool = True):
        if mode:
            self.starts += 1
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if self.starts - 1 in self.epochs:
            return logits * 0 + self.poison  # still part of the graph: backward runs
        return logits


def poisoned_mlp(input_shape, num_classes, poison: str = "nan", start: int = 2,
                 stop: int | None = None):
    """Poisoned from epoch start ``start`` to ``stop`` (exclusive; None: for ever)."""
    epochs = set(range(start, stop if stop is not None else 10_000))
    return PoisonedHost(input_shape, num_classes, poison=poison, epochs=epochs)
