"""LearnedPolicy: the growth choice made by a network the academy trains (ACADEMY.md §1).

Per epoch: the lifecycle gates decide the seeds on trial by rule, exactly as for the
heuristic (:class:`~tolaria.tamiyo.policy.LifecycleGates`); then, where growth is possible,
the :class:`~tolaria.tamiyo.scorer.CandidateScorer` scores *wait* and every feasible
(DORMANT seed, blueprint) pair and one action is chosen from ``π = softmax(scores / τ)``
(``tamiyo.temperature``; 0: greedy, for evaluation).  One graft at most per epoch.

Sampling is a pure function of the policy's state: the n-th decision point of a run draws
``u ~ U(0, 1)`` from a generator seeded with ``(run.seed, n)``, and ``n`` is the policy's
state (saved with the controller), so ``decide`` stays pure and a resumed or rolled-back
run takes the same decisions as an uninterrupted one.

The weights come from the academy's policy registry: ``tamiyo.policy_version`` pins one
(``v3``), otherwise the champion runs; the version is recorded with every decision point.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tolaria.config import TamiyoConfig, TolariaConfig
from tolaria.contracts import Adaptation
from tolaria.tamiyo.features import encode
from tolaria.tamiyo.growth import Candidate, feasible, graft, sample_action
from tolaria.tamiyo.policy import Decision, LifecycleGates, Observation
from tolaria.tamiyo.scorer import CandidateScorer, probabilities


def _warn(message: str) -> None:
    print(f"tolaria: warning: {message}", file=sys.stderr)


class LearnedPolicy:
    def __init__(
        self,
        config: TamiyoConfig,
        *,
        seed: int = 0,
        academy_dir: str | Path | None = None,
        scorer: CandidateScorer | None = None,
        version: str | None = None,
    ) -> None:
        self.config = config
        self.gates = LifecycleGates(config)
        self.seed = seed
        # Without one given: where a run with the default config keeps its academy.
        self.academy_dir = Path(academy_dir) if academy_dir else TolariaConfig().academy_dir()
        if scorer is None:
            scorer, version = self._from_registry(config.policy_version)
        self.scorer, self.version = scorer.eval(), version
        #: Decision points met so far: the index of the next draw.
        self.draws = 0

    def _from_registry(self, name: str | None) -> tuple[CandidateScorer, str]:
        """Version ``name``'s scorer, or the champion's (None)."""
        from tolaria.academy.registry import PolicyRegistry  # the academy only when used

        registry = PolicyRegistry(self.academy_dir)
        chosen = registry.load(name) if name else registry.champion(warn=_warn)
        scorer = CandidateScorer.from_tensors(chosen.card["scorer"], chosen.tensors)
        return scorer, chosen.name

    # ------------------------------------------------------------------ the policy
    def decide(self, observation: Observation) -> list[Decision]:
        decisions = self.gates.decide(observation)
        options = feasible(observation, self.config, decisions)
        if not options:
            return decisions
        probs = self.action_probabilities(observation, options)
        if self.config.temperature <= 0:
            chosen = int(torch.argmax(probs))
        else:
            chosen = sample_action(probs, self.seed, self.draws)
        if chosen == 0:
            return decisions
        evidence = {"probability": float(probs[chosen]), "wait_probability": float(probs[0])}
        reason = f"learned policy {self.version}: p={probs[chosen]:.2f} (wait {probs[0]:.2f})"
        return decisions + graft(options[chosen - 1], reason, evidence)

    def action_probabilities(
        self, observation: Observation, feasible: Sequence[Candidate]
    ) -> torch.Tensor:
        """``π(wait), π(candidate 1), ...`` at this observation (float64)."""
        with torch.no_grad():
            scores = self.scorer(*encode(observation, feasible))
        return probabilities(scores, self.config.temperature)

    def update(self, observation: Observation, applied: Sequence[Adaptation]) -> None:
        if feasible(observation, self.config, self.gates.decide(observation)):
            self.draws += 1

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws, "version": self.version}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """A run resumes with the version it ran, even if the champion has moved since."""
        draws, version = int(state["draws"]), state["version"]
        if version is not None and version != self.version:
            self.scorer, self.version = self._from_registry(version)
        self.draws = draws
