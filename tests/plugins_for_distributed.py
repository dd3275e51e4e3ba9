"""User code named by the multi-process tests' configs (``plugins_for_distributed:...``)."""

from __future__ import annotations

import os
import signal
from typing import ClassVar

import torch

from conftest import make_blobs
from tolaria.contracts import SeedState
from tolaria.hosts import MLPHost
from tolaria.tamiyo import Decision, HeuristicPolicy


def blobs(n: int = 256):
    """``(train, test, classes)``: the suite's tiny Gaussian blobs."""
    return make_blobs(n, 12, 4, seed=1), make_blobs(64, 12, 4, seed=3), 4


class ScriptedGrowth(HeuristicPolicy):
    """Every lifecycle step on a fixed schedule, whatever the evidence: seed A is grafted
    and trained at epoch 0, blends, goes on probation and is fossilized at epoch 3; seed B
    is grafted at epoch 0, left GERMINATED for an epoch (a blueprint the forward skips),
    trains, and is culled at epoch 2."""

    SCHEDULE: ClassVar[dict] = {
        0: [("A", SeedState.GERMINATED), ("A", SeedState.TRAINING), ("B", SeedState.GERMINATED)],
        1: [("A", SeedState.BLENDING), ("B", SeedState.TRAINING)],
        2: [("A", SeedState.PROBATIONARY), ("B", SeedState.CULLED)],
        3: [("A", SeedState.FOSSILIZED)],
    }

    def decide(self, observation):
        seeds = observation.seeds
        named = {"A": seeds[0], "B": seeds[len(seeds) // 2]}  # on two different layers
        return [
            Decision(named[key].seed_id, to, "scripted",
                     named[key].options[0].blueprint if to is SeedState.GERMINATED else None)
            for key, to in self.SCHEDULE.get(observation.packet.current_epoch, [])
        ]

    def update(self, observation, applied) -> None:
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state) -> None:
        pass


class KilledHost(MLPHost):
    """The built-in MLP, whose process kills itself with SIGKILL (kill -9) when rank
    ``rank`` of a multi-process run has trained ``batches`` batches and starts another."""

    def __init__(self, input_shape, num_classes, *, rank: int, batches: int) -> None:
        super().__init__(input_shape, num_classes, (16, 16))
        self.rank, self.batches, self.trained = rank, batches, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            if self.trained == self.batches and os.environ.get("RANK") == str(self.rank):
                os.kill(os.getpid(), signal.SIGKILL)
            self.trained += 1
        return super().forward(x)


def killed_mlp(input_shape, num_classes, rank: int = 1, batches: int = 18):
    return KilledHost(input_shape, num_classes, rank=rank, batches=batches)
