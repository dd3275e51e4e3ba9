"""Growth as a choice: the decision points the replay buffer records (ACADEMY.md §1-2).

At an epoch end where growth is possible -- a seed slot is free and at least one
(DORMANT seed, blueprint) pair fits the parameter budget and is not forbidden -- the policy
chooses one action among ``wait`` and those candidates.  A :class:`GrowthPoint` records that
choice: the candidate set, the chosen index (0 = wait, ``i`` = ``candidates[i - 1]``) and its
propensity ``π(a|s)`` under the policy that chose it, so a learned policy can later be
trained on it off-policy.  A policy that grafts several seeds in one epoch (the heuristic
may) makes one point per graft, each over what the grafts before it left.

What is feasible is decided here, once, for every policy: the lifecycle gates (slots,
budget, forbidden grafts) are rules, never learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from tolaria.config import TamiyoConfig
from tolaria.contracts import SeedState

#: Mixes the run seed and the draw number into one generator seed (a large odd constant).
_DRAW_STRIDE = 1_000_003

if TYPE_CHECKING:  # the policies import this module
    from tolaria.tamiyo.policy import Decision, GraftOption, Observation, SeedView


@dataclass(frozen=True)
class Candidate:
    """One feasible graft: ``option`` on the DORMANT seed ``seed``."""

    seed: SeedView
    option: GraftOption

    @property
    def key(self) -> tuple[str, str]:
        return self.seed.seed_id, self.option.blueprint

    def to_dict(self) -> dict[str, Any]:
        return {"seed_id": self.seed.seed_id, **asdict(self.option)}


@dataclass(frozen=True)
class GrowthPoint:
    slot: int
    candidates: tuple[Candidate, ...]
    #: 0: wait; i: ``candidates[i - 1]``.
    chosen: int
    #: ``π(chosen | observation)``; None when the policy cannot say (a user policy).
    propensity: float | None


def growth_slots(observation: Observation, config: TamiyoConfig, gates: Sequence[Decision]) -> int:
    """Seeds that may be grafted this epoch, once the lifecycle ``gates`` are applied."""
    if observation.packet.current_epoch < config.min_epochs_before_growth:
        return 0
    culled = sum(d.to_state is SeedState.CULLED for d in gates)
    on_trial = sum(s.state.is_active for s in observation.seeds) - culled
    return max(0, min(config.max_active_seeds - on_trial, config.max_germinations_per_epoch))


def candidates(
    observation: Observation, *, budget: int, taken: frozenset[str] = frozenset()
) -> tuple[Candidate, ...]:
    """Feasible grafts in seed, then blueprint-preference order (``taken``: seeds already
    grafted this epoch)."""
    return tuple(
        Candidate(seed, option)
        for seed in observation.seeds
        if seed.state is SeedState.DORMANT and seed.seed_id not in taken
        for option in seed.options
        if not option.forbidden and option.param_cost <= budget
    )


def feasible(
    observation: Observation, config: TamiyoConfig, gates: Sequence[Decision]
) -> tuple[Candidate, ...]:
    """What one growth choice may pick this epoch (after the ``gates``); () if none."""
    if not growth_slots(observation, config, gates):
        return ()
    return candidates(observation, budget=observation.param_budget_left)


def sample_action(probabilities: torch.Tensor, seed: int, draw: int) -> int:
    """Inverse-CDF sample of an action with the ``draw``-th uniform of run ``seed``: a pure
    function, so a policy that keeps ``draw`` in its state decides the same after a resume."""
    generator = torch.Generator().manual_seed(seed * _DRAW_STRIDE + draw)
    u = torch.rand((), generator=generator, dtype=torch.float64)
    index = int(torch.searchsorted(torch.cumsum(probabilities, 0), u, right=True))
    return min(index, len(probabilities) - 1)


def graft(candidate: Candidate, reason: str, evidence: dict[str, float]) -> list[Decision]:
    """The decisions that graft ``candidate``: germinate, then train at once."""
    from tolaria.tamiyo.policy import Decision

    seed_id, blueprint = candidate.key
    return [
        Decision(seed_id, SeedState.GERMINATED, reason, blueprint, evidence),
        Decision(seed_id, SeedState.TRAINING, "grafted", blueprint),
    ]


def growth_points(
    observation: Observation, config: TamiyoConfig, decisions: Sequence[Decision], policy: Any
) -> tuple[GrowthPoint, ...]:
    """The decision points ``policy``'s ``decisions`` amount to; () where growth was not
    possible.  A graft outside the feasible set (a user policy ignoring the budget) ends the
    points: what it chose among is unknown."""
    slots = growth_slots(observation, config, decisions)
    grafts = [d for d in decisions if d.to_state is SeedState.GERMINATED]
    budget, taken = observation.param_budget_left, frozenset()
    points: list[GrowthPoint] = []
    for slot in range(slots):
        feasible = candidates(observation, budget=budget, taken=taken)
        graft = grafts[slot] if slot < len(grafts) else None
        keys = [c.key for c in feasible]
        if not feasible or (graft and (graft.seed_id, graft.blueprint) not in keys):
            break
        chosen = 0 if graft is None else 1 + keys.index((graft.seed_id, graft.blueprint))
        propensity = _propensity(policy, observation, feasible, chosen, slot)
        points.append(GrowthPoint(slot, feasible, chosen, propensity))
        if graft is None:
            break
        budget -= feasible[chosen - 1].option.param_cost
        taken |= {graft.seed_id}
    return tuple(points)


def _propensity(
    policy: Any, observation: Observation, feasible: tuple[Candidate, ...], chosen: int, slot: int
) -> float | None:
    """``π(chosen)``: 1 for a ``deterministic`` policy; from ``action_probabilities`` for a
    stochastic one (which chooses once per epoch); None for a policy that says neither."""
    if getattr(policy, "deterministic", False):
        return 1.0
    probabilities = getattr(policy, "action_probabilities", None)
    if probabilities is None or slot:
        return None
    return float(probabilities(observation, feasible)[chosen])
