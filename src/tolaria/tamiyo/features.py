"""What a learned policy sees: numbers computed from the :class:`Observation` only.

Every feature is scale-free -- a fraction, a ratio to the run's own scale, a descriptor --
so a policy trained on one task can read another (ACADEMY.md §1).  Nothing here reads the
test split, the model or a blueprint registry: a stored observation is enough, which is
what lets the academy train on its replay buffer.

Global features (:data:`GLOBAL_FEATURES`), the same for every candidate:
  epoch_fraction      epoch / planned epochs
  trend_3             relative change of validation loss over the last 3 epochs, in [-1, 1]
  trend_1             the same over the last epoch
  stale               epochs since the best validation loss in the history window, / window
  gap                 (validation - training loss) / validation loss, in [-1, 1]
  score               validation accuracy
  budget_left         growth budget left, as a fraction of the budget
  on_trial            seeds on trial / seeds
  dormant             DORMANT seeds / seeds
  accelerator         1 on a CUDA device, else 0

The hardware enters as its class, not its load: free memory changes from second to second,
and a decision that read it would differ between a run and its resume (invariant 8).

Candidate features (:data:`CANDIDATE_FEATURES`), one row per (DORMANT seed, blueprint):
  dead, saturated     the seed's telemetry (fractions of its chunk's units)
  grad                its gradient norm / the largest among the candidates' seeds
  depth               its module's position among the seeded modules (0: input side)
  width               log2 of the chunk's size, / 10
  kind_*              the blueprint's kind, one-hot over ``BLUEPRINT_KINDS``
  receptive_field     fraction of the chunk one output of the delta reads
  cost                parameters / the host's parameters
  cost_of_budget      parameters / the growth budget left
  penalty             accumulated cull penalty of this (seed, blueprint)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tolaria.contracts import SeedState
from tolaria.kasmina.blueprints import BLUEPRINT_KINDS
from tolaria.tamiyo.growth import Candidate
from tolaria.tamiyo.policy import Observation

GLOBAL_FEATURES = (
    "epoch_fraction", "trend_3", "trend_1", "stale", "gap", "score", "budget_left",
    "on_trial", "dormant", "accelerator",
)
CANDIDATE_FEATURES = (
    "dead", "saturated", "grad", "depth", "width", *(f"kind_{k}" for k in BLUEPRINT_KINDS),
    "receptive_field", "cost", "cost_of_budget", "penalty",
)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


def _clip(value: float) -> float:
    return max(-1.0, min(1.0, value)) if math.isfinite(value) else 0.0


def global_features(observation: Observation) -> list[float]:
    packet, seeds = observation.packet, observation.seeds
    losses = [h[1] for h in observation.history] or [packet.validation_loss]
    now = losses[-1]

    def trend(back: int) -> float:
        if len(losses) <= back:
            return 0.0
        then = losses[-1 - back]
        return _clip(_ratio(now - then, abs(then)))

    best = min(range(len(losses)), key=lambda i: (losses[i], -i))
    hardware = packet.hardware_context
    return [
        _ratio(packet.current_epoch, observation.epochs_total),
        trend(3),
        trend(1),
        (len(losses) - 1 - best) / max(1, len(losses) - 1) if len(losses) > 1 else 0.0,
        _clip(_ratio(packet.validation_loss - packet.training_loss, packet.validation_loss)),
        packet.validation_accuracy if math.isfinite(packet.validation_accuracy) else 0.0,
        _ratio(observation.param_budget_left, observation.param_budget),
        _ratio(sum(s.state.is_active for s in seeds), len(seeds)),
        _ratio(sum(s.state is SeedState.DORMANT for s in seeds), len(seeds)),
        float(hardware is not None and hardware.device_type == "cuda"),
    ]


def candidate_features(
    observation: Observation, candidates: Sequence[Candidate]
) -> list[list[float]]:
    grads = [c.seed.telemetry.grad_norm for c in candidates if c.seed.telemetry]
    grad_scale = max(grads, default=0.0)
    rows = []
    for candidate in candidates:
        seed, option = candidate.seed, candidate.option
        telemetry = seed.telemetry
        size = math.prod(seed.chunk_shape) if seed.chunk_shape else 1
        kind = option.kind if option.kind in BLUEPRINT_KINDS else "other"
        rows.append([
            telemetry.dead_fraction if telemetry else 0.0,
            telemetry.saturated_fraction if telemetry else 0.0,
            _ratio(telemetry.grad_norm, grad_scale) if telemetry else 0.0,
            seed.depth,
            math.log2(size) / 10,
            *(float(kind == k) for k in BLUEPRINT_KINDS),
            option.receptive_field,
            _ratio(option.param_cost, observation.host_params),
            _ratio(option.param_cost, observation.param_budget_left),
            option.penalty,
        ])
    return rows


def encode(
    observation: Observation, candidates: Sequence[Candidate]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(global [G], candidates [N, C])`` float32 tensors for the scorer."""
    g = torch.tensor(global_features(observation), dtype=torch.float32)
    c = torch.tensor(candidate_features(observation, candidates), dtype=torch.float32)
    return g, c.reshape(len(candidates), len(CANDIDATE_FEATURES))
