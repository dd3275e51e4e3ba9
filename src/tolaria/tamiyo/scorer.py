"""The learned policy's network: a permutation-invariant candidate scorer (ACADEMY.md §1).

One MLP scores every candidate from ``[global ‖ candidate]``; *wait* has its own small head
on the global features.  Scores estimate the reward of each action (wait's reference is 0),
and the policy is ``π = softmax(scores / τ)``.  Candidates are scored independently, so
their order never changes their scores, and a set of any size fits.  The ``nn.Linear``
layers are what the nightly session's LoRA adapters adapt.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tolaria.tamiyo.features import CANDIDATE_FEATURES, GLOBAL_FEATURES

#: The shipped architecture; a version's card records its own.
DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "global_features": len(GLOBAL_FEATURES),
    "candidate_features": len(CANDIDATE_FEATURES),
    "hidden": 16,
    "wait_hidden": 8,
}


class CandidateScorer(nn.Module):
    def __init__(
        self, global_features: int, candidate_features: int, hidden: int, wait_hidden: int
    ) -> None:
        super().__init__()
        self.architecture = {
            "global_features": global_features,
            "candidate_features": candidate_features,
            "hidden": hidden,
            "wait_hidden": wait_hidden,
        }
        self.candidate = nn.Sequential(
            nn.Linear(global_features + candidate_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        self.wait = nn.Sequential(
            nn.Linear(global_features, wait_hidden), nn.ReLU(), nn.Linear(wait_hidden, 1)
        )

    @classmethod
    def build(cls, architecture: Mapping[str, Any] | None = None) -> CandidateScorer:
        return cls(**(architecture or DEFAULT_ARCHITECTURE))

    @classmethod
    def from_tensors(
        cls, architecture: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
    ) -> CandidateScorer:
        scorer = cls.build(architecture)
        scorer.load_state_dict(dict(tensors))
        return scorer.eval()

    def forward(self, global_features: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Scores ``[1 + N]`` (index 0: wait) of one decision point."""
        rows = torch.cat([global_features.expand(len(candidates), -1), candidates], dim=1)
        return torch.cat([self.wait(global_features), self.candidate(rows).squeeze(1)])

    def score_batch(
        self, global_features: torch.Tensor, candidates: torch.Tensor, point: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Many points at once (training): ``global_features [P, G]``, ``candidates [M, C]``
        with ``point [M]`` naming each row's point -> (wait scores [P], candidate scores [M])."""
        rows = torch.cat([global_features[point], candidates], dim=1)
        return self.wait(global_features).squeeze(1), self.candidate(rows).squeeze(1)


def probabilities(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(scores / τ)``; τ = 0 is greedy (all mass on the first best score)."""
    if temperature <= 0:
        greedy = torch.zeros_like(scores, dtype=torch.float64)
        greedy[int(torch.argmax(scores))] = 1.0
        return greedy
    return torch.softmax(scores.double() / temperature, dim=0)
