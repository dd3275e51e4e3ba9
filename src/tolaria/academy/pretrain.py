"""Base policy v0: the candidate scorer trained on a replay campaign's logged outcomes.

Each decision point whose outcome is known is one example: the chosen action's score is
regressed on its reward (:func:`tolaria.academy.reward.reward`; wait's is 0), weighted by
``min(1 / propensity, MAX_WEIGHT)`` so that actions the behaviour policy rarely took count as
much as the ones it favoured (importance weighting, clipped against the variance of rare
actions).  Only the chosen action has a target -- bandit feedback -- and the shared MLP
carries what it learns to the others.

Full-batch Adam on one CPU thread from a fixed seed: the same replay gives the same weights,
bit for bit (``tolaria academy pretrain`` checks its rebuild against the shipped v0).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from tolaria.academy.campaign import CampaignSize, run_campaign
from tolaria.tamiyo.features import encode
from tolaria.tamiyo.growth import Candidate
from tolaria.tamiyo.policy import Observation
from tolaria.tamiyo.scorer import CandidateScorer

#: Importance weights are clipped here: a propensity of 0.02 must not outweigh 10 others.
MAX_WEIGHT = 10.0
#: Chosen by leave-one-task-out on the campaign's replay (docs/academy.md): trained on five
#: tasks, the grafts the scorer would take on the sixth summed to +0.51 reward against -1.15
#: for all the campaign took there (the sign of 92 of 125 graft rewards right).  Stronger
#: decay flattens the scores to a constant; more steps memorise the ~125 graft outcomes.
STEPS = 300
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-3
TRAINING_SEED = 0


@dataclass(frozen=True)
class Examples:
    """A replay as tensors: ``global_features [P, G]``, every candidate's row
    ``candidates [M, C]`` with ``point [M]``, the chosen row (-1: wait), reward and weight."""

    global_features: torch.Tensor
    candidates: torch.Tensor
    point: torch.Tensor
    chosen_row: torch.Tensor
    reward: torch.Tensor
    weight: torch.Tensor

    def __len__(self) -> int:
        return len(self.reward)


def logged_candidates(
    observation: Observation, logged: Iterable[Mapping[str, Any]]
) -> list[Candidate]:
    """A point's candidate set as logged (``Candidate.to_dict`` entries), rebuilt on the
    seeds of its ``observation``."""
    seeds = {s.seed_id: s for s in observation.seeds}
    rebuilt = []
    for entry in logged:
        seed = seeds[entry["seed_id"]]
        option = next(o for o in seed.options if o.blueprint == entry["blueprint"])
        rebuilt.append(Candidate(seed, option))
    return rebuilt


def rewarded(
    points: Iterable[Mapping[str, Any]], runs: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The points with their reward computed afresh from the raw outcome: the reward's one
    definition (:func:`tolaria.academy.reward.reward`) as it is now, not as it was when the
    run logged it."""
    from tolaria.academy.reward import reward

    host_params = {run["run_id"]: run["fingerprint"]["params"] for run in runs}
    return [
        {**p, "reward": reward(p["outcome"], host_params[p["run_id"]]) if p["outcome"] else None}
        for p in points
    ]


def examples(points: Iterable[Mapping[str, Any]], *, max_weight: float = MAX_WEIGHT) -> Examples:
    """The trainable decision points: a known reward and a known propensity, weighted
    ``min(1 / propensity, max_weight)``."""
    g_rows, c_rows, owner, chosen_rows, rewards, weights = [], [], [], [], [], []
    offset = 0  # candidate rows so far: where this point's rows start
    for point in points:
        if point.get("reward") is None or not point.get("propensity"):
            continue
        observation = Observation.from_dict(point["observation"])
        g, c = encode(observation, logged_candidates(observation, point["candidates"]))
        index = len(g_rows)
        g_rows.append(g)
        c_rows.append(c)
        owner += [index] * len(c)
        chosen_rows.append(offset + point["chosen"] - 1 if point["chosen"] else -1)
        offset += len(c)
        rewards.append(float(point["reward"]))
        weights.append(min(1.0 / float(point["propensity"]), max_weight))
    if not g_rows:
        raise ValueError("no decision point with a known outcome and propensity to train on")
    return Examples(
        torch.stack(g_rows),
        torch.cat(c_rows),
        torch.tensor(owner, dtype=torch.long),
        torch.tensor(chosen_rows, dtype=torch.long),
        torch.tensor(rewards, dtype=torch.float32),
        torch.tensor(weights, dtype=torch.float32),
    )


def predicted(scorer: CandidateScorer, data: Examples) -> torch.Tensor:
    """The scorer's estimate of each example's chosen action (wait's own head for waits)."""
    wait, rows = scorer.score_batch(data.global_features, data.candidates, data.point)
    chosen = rows[data.chosen_row.clamp(min=0)]
    return torch.where(data.chosen_row >= 0, chosen, wait)


def weighted_loss(scorer: CandidateScorer, data: Examples) -> torch.Tensor:
    error = predicted(scorer, data) - data.reward
    return (data.weight * error.square()).sum() / data.weight.sum()


def reward_spread(data: Examples) -> float:
    """The rewards' weighted root mean square (1 when they are all 0): the scale a fit is
    measured on, so that its loss does not depend on the units of the reward."""
    spread = float(torch.sqrt((data.weight * data.reward.square()).sum() / data.weight.sum()))
    return spread if spread > 0 else 1.0


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """One CPU thread and torch's generator seeded with ``seed`` (restored after): what makes
    a full-batch fit the same bit for bit on every run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def train_scorer(data: Examples, *, steps: int = STEPS) -> CandidateScorer:
    """A fresh scorer fitted to ``data``; deterministic (fixed seed, one thread).

    Rewards are a few hundredths of accuracy: the fit runs on rewards divided by their
    weighted spread (so weight decay does not simply flatten it), and the output layers are
    scaled back after, so scores stay in reward units (the temperature's scale)."""
    scale = reward_spread(data)
    scaled = replace(data, reward=data.reward / scale)
    with deterministic(TRAINING_SEED):
        scorer = CandidateScorer.build()
        optimizer = torch.optim.Adam(
            scorer.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, foreach=False
        )
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            weighted_loss(scorer, scaled).backward()
            optimizer.step()
    with torch.no_grad():
        for head in (scorer.candidate[-1], scorer.wait[-1]):
            head.weight.mul_(scale)
            head.bias.mul_(scale)
    return scorer.eval()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names and bytes, in name order: equal iff bit for bit equal."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def preferences(scorer: CandidateScorer, data: Examples) -> dict[str, float]:
    """Mean score the scorer gives the campaign's candidates, by blueprint kind and by
    input (depth 0) or hidden layer: what it learned to prefer where."""
    from tolaria.kasmina.blueprints import BLUEPRINT_KINDS
    from tolaria.tamiyo.features import CANDIDATE_FEATURES

    with torch.no_grad():
        _, scores = scorer.score_batch(data.global_features, data.candidates, data.point)
    depth = data.candidates[:, CANDIDATE_FEATURES.index("depth")]
    result = {}
    for kind in BLUEPRINT_KINDS:
        is_kind = data.candidates[:, CANDIDATE_FEATURES.index(f"kind_{kind}")] > 0
        for where, at in (("input", depth == 0), ("hidden", depth > 0)):
            chosen = is_kind & at
            if chosen.any():
                result[f"{kind}@{where}"] = round(float(scores[chosen].mean()), 4)
    return result


def pretrain(
    out: Path,
    size: CampaignSize,
    *,
    workdir: Path,
    on_run: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Run the campaign in ``workdir``, train v0 on its replay, write the version to ``out``
    (the registry's format); returns the card."""
    from tolaria.academy.registry import write_version
    from tolaria.academy.replay import ReplayBuffer

    academy = run_campaign(workdir, size, on_run=on_run)
    with ReplayBuffer.in_academy(academy) as replay:
        points, runs, by_task = replay.points(), replay.runs(), replay.size_by_task()
    data = examples(rewarded(points, runs))
    started = time.perf_counter()
    scorer = train_scorer(data)
    tensors = {name: t.detach().clone() for name, t in scorer.state_dict().items()}
    card = {
        "version": "v0",
        "parent": None,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "trained_on": {
            "campaign": {"tasks": size.tasks, "seeds": size.seeds, "epochs": size.epochs},
            "decision_points": by_task,
            "examples": len(data),
            "grafts": int((data.chosen_row >= 0).sum()),
        },
        "gates": {},
        "training_s": round(time.perf_counter() - started, 3),
        "scorer": scorer.architecture,
        "tensors_digest": tensors_digest(tensors),
        "loss": round(float(weighted_loss(scorer, data).detach()), 6),
        "preferences": preferences(scorer, data),
    }
    return write_version(out, tensors, card)
