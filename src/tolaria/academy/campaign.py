"""The replay campaign that base policy v0 is trained from (ACADEMY.md §3).

Short runs over the built-in tasks -- several hosts and widths on MNIST-1D and digits, and
two synthetic families (:mod:`tolaria.academy.tasks`) -- each with seeds on the input and on
every hidden layer and every built-in dense blueprint, so that *where* and *what* matter.
The behaviour policy is :class:`ExploringPolicy`: the heuristic, mixed with uniform choices
so that every feasible action is tried and every propensity is known.  Every run appends to
one replay buffer through the ordinary recorder: the campaign is a set of ``tolaria train``
runs, nothing more.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tolaria.config import TamiyoConfig, TolariaConfig, load_config
from tolaria.contracts import Adaptation, SeedState
from tolaria.errors import RepeatedFailureError
from tolaria.tamiyo.growth import Candidate, feasible, graft, sample_action
from tolaria.tamiyo.policy import Decision, HeuristicPolicy, Observation


class ExploringPolicy:
    """The heuristic's growth choice with probability ``1 - EPSILON``, else a uniform one
    among wait and every feasible graft; one graft at most per epoch.

    ``π(a) = (1 - ε)·[a = heuristic's choice] + ε / (1 + candidates)``, logged as the
    propensity, so the replay can be importance-weighted.
    """

    EPSILON = 0.3

    def __init__(self, config: TamiyoConfig, *, seed: int = 0) -> None:
        self.config = config
        self.heuristic = HeuristicPolicy(config)
        self.seed = seed
        self.draws = 0

    def decide(self, observation: Observation) -> list[Decision]:
        gates = self.heuristic.gates.decide(observation)
        options = feasible(observation, self.config, gates)
        if not options:
            return gates
        probs = self.action_probabilities(observation, options)
        chosen = sample_action(probs, self.seed, self.draws)
        if chosen == 0:
            return gates
        reason = f"exploring (p={probs[chosen]:.2f})"
        return gates + graft(options[chosen - 1], reason, {"probability": float(probs[chosen])})

    def action_probabilities(
        self, observation: Observation, options: Sequence[Candidate]
    ) -> torch.Tensor:
        probs = torch.full((1 + len(options),), self.EPSILON / (1 + len(options)),
                           dtype=torch.float64)
        probs[self._heuristic_choice(observation, options)] += 1 - self.EPSILON
        return probs

    def _heuristic_choice(self, observation: Observation, options: Sequence[Candidate]) -> int:
        keys = [c.key for c in options]
        for decision in self.heuristic.decide(observation):
            key = (decision.seed_id, decision.blueprint)
            if decision.to_state is SeedState.GERMINATED and key in keys:
                return 1 + keys.index(key)
        return 0

    def update(self, observation: Observation, applied: Sequence[Adaptation]) -> None:
        if feasible(observation, self.config, self.heuristic.gates.decide(observation)):
            self.draws += 1
        self.heuristic.update(observation, applied)

    def state_dict(self) -> dict[str, Any]:
        return {"heuristic": self.heuristic.state_dict(), "draws": self.draws}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.heuristic.load_state_dict(state["heuristic"])
        self.draws = int(state["draws"])


@dataclass(frozen=True)
class CampaignTask:
    """One task of the campaign: a name (the replay's task key is derived from the run) and
    the ``--set`` overrides that make it."""

    name: str
    settings: tuple[str, ...]


#: Seeds on the input and every hidden layer, every built-in blueprint for flat chunks.
GROWTH_SETTINGS = (
    "kasmina.layers=[flatten, 'hidden.*']",
    "tamiyo.blueprints=[signal_conv1d, residual_mlp, low_rank, se_gate]",
    "tamiyo.param_budget_fraction=4.0",
)
SYNTHETIC = "data.dataset=tolaria.academy.tasks:synthetic"

#: The built-in tasks of the campaign (``benchmarks/bench_academy.py`` holds out others).
CAMPAIGN_TASKS = (
    CampaignTask("mnist1d/mlp[32,32]", ("model.kwargs={hidden: [32, 32]}",)),
    CampaignTask("mnist1d/mlp[64]", ("model.kwargs={hidden: [64]}",)),
    CampaignTask("digits/mlp[32,32]", ("data.dataset=digits", "model.kwargs={hidden: [32, 32]}")),
    CampaignTask("digits/mlp[16]", ("data.dataset=digits", "model.kwargs={hidden: [16]}")),
    CampaignTask("motifs/mlp[32,32]", (SYNTHETIC, "data.kwargs={family: motifs, size: 32}",
                                       "model.kwargs={hidden: [32, 32]}")),
    CampaignTask("clusters/mlp[16,16]", (SYNTHETIC, "data.kwargs={family: clusters, size: 12}",
                                         "model.kwargs={hidden: [16, 16]}")),
)


@dataclass(frozen=True)
class CampaignSize:
    tasks: int
    seeds: int
    epochs: int


SIZES = {"full": CampaignSize(len(CAMPAIGN_TASKS), 5, 24), "tiny": CampaignSize(2, 1, 6)}


def campaign_config(task: CampaignTask, seed: int, epochs: int, root: Path) -> TolariaConfig:
    """The config of one campaign run: the task, the exploring policy, a scratch root."""
    return load_config(None, [
        *GROWTH_SETTINGS,
        *task.settings,
        f"run.name={task.name.replace('/', '-')}-s{seed}",
        f"run.seed={seed}",
        f"run.epochs={epochs}",
        "run.progress=false",
        "run.tensorboard=false",
        f"run.runs_root={root}",
        f"data.cache_dir={root / 'cache'}",
        # Named, not left to the default: $TOLARIA_ACADEMY must not take the campaign's runs.
        f"academy.dir={root / 'academy'}",
        "tamiyo.policy=tolaria.academy.campaign:ExploringPolicy",
    ])


def run_campaign(
    root: Path, size: CampaignSize, *, on_run: Callable[[str, int, int], None] | None = None
) -> Path:
    """Train every (task, seed) of ``size`` under ``root``; returns the academy directory
    whose replay buffer holds what they did.  ``on_run(task, seed, index)`` before each."""
    from tolaria.build import build_trainer

    runs = [(t, s) for t in CAMPAIGN_TASKS[: size.tasks] for s in range(size.seeds)]
    for index, (task, seed) in enumerate(runs):
        if on_run is not None:
            on_run(task.name, seed, index)
        config = campaign_config(task, seed, size.epochs, root)
        run_dir = root / "runs" / f"{index:03d}-{config.run.name}"
        # Exploration may find a graft that keeps diverging: the run stops, and its incidents
        # are in the replay like any outcome.
        with contextlib.suppress(RepeatedFailureError):
            build_trainer(config, run_dir=run_dir).train()
    return root / "academy"
