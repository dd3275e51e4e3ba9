"""A learned policy with a fixed, graft-happy scorer: the policy's mechanics without a
registry (the tests that need one build it)."""

from __future__ import annotations

import torch

from tolaria.tamiyo.learned import LearnedPolicy
from tolaria.tamiyo.scorer import CandidateScorer


def graft_happy_scorer() -> CandidateScorer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        scorer = CandidateScorer.build()
    with torch.no_grad():
        scorer.wait[-1].bias.fill_(-0.5)  # waiting scores lower than most grafts
    return scorer


class SeededLearnedPolicy(LearnedPolicy):
    def __init__(self, config, *, seed: int = 0) -> None:
        super().__init__(config, seed=seed, scorer=graft_happy_scorer(), version="test")
