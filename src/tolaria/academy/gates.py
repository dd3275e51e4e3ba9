"""The validation gates a nightly candidate must pass (design §6.3, ACADEMY.md §4 step 4).

Each gate is a small pure function over scorers and decision points (``ReplayBuffer.points()``
entries), in the design's order:

``history_score``       mean over historical tasks of ``min(1, candidate / champion)``, the
                        final validation scores of each task's snapshot continued with each
                        policy (:func:`tolaria.academy.snapshot.continue_snapshot`).
``hardware_stability``  fraction of (held-out point, variation) pairs whose greedy choice is
                        unchanged when the point's hardware context is replaced by a mirrorable
                        production profile and its measured numbers are jittered by ±noise.
``diversity_score``     normalised entropy of the marginal action distribution over held-out
                        points, by category (*wait*, each blueprint).

A candidate passes a gate when its value is strictly above the threshold
(:class:`~tolaria.config.GatesConfig`).  :func:`validation_divergence` is the monitor's metric
(ACADEMY.md §5), reported beside the gates, not one of them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tolaria.academy.pretrain import logged_candidates
from tolaria.academy.recorder import GIB
from tolaria.config import GatesConfig, NightlyConfig, TamiyoConfig
from tolaria.errors import TolariaError
from tolaria.tamiyo.features import encode
from tolaria.tamiyo.growth import Candidate
from tolaria.tamiyo.policy import Observation
from tolaria.tamiyo.scorer import CandidateScorer, probabilities

#: The gates in the design's order: a report's ``failed_gate`` is the first that fails.
GATES = ("history_score", "hardware_stability", "diversity_score")
#: The measured numbers of a seed's telemetry (its ids and counts are not measurements).
TELEMETRY_MEASURED = ("activation_mean", "activation_var", "dead_fraction",
                      "saturated_fraction", "grad_norm", "delta_ratio")


def decision(point: Mapping[str, Any]) -> tuple[Observation, list[Candidate]]:
    observation = Observation.from_dict(point["observation"])
    return observation, logged_candidates(observation, point["candidates"])


def action_probabilities(
    scorer: CandidateScorer, observation: Observation, candidates: Sequence[Candidate],
    temperature: float,
) -> torch.Tensor:
    """``π(wait), π(candidate 1), ...`` as the learned policy computes them."""
    with torch.no_grad():
        return probabilities(scorer(*encode(observation, candidates)), temperature)


def greedy(scorer: CandidateScorer, observation: Observation, candidates: Sequence[Candidate]):
    return int(torch.argmax(action_probabilities(scorer, observation, candidates, 0.0)))


# ---------------------------------------------------------------------------- history_score
def task_score(candidate: float, champion: float) -> float:
    """One task's ``min(1, candidate / champion)`` on scores (higher is better).

    A ratio means something only against a positive reference.  A negative champion score
    (a monitor in ``min`` mode is stored negated, ``-mse``; an R² below 0) compares the other
    way round, ``min(1, champion / candidate)``, and a candidate at or above 0 scores 1; a
    champion at exactly 0 gives 1 to a candidate at or above it, else 0.  A run that did not
    finish (NaN) scores 0 -- unless the champion's did not either: no regression, 1."""
    if not math.isfinite(candidate):
        return 0.0 if math.isfinite(champion) else 1.0
    if not math.isfinite(champion):
        return 1.0
    if champion > 0:
        return min(1.0, max(0.0, candidate / champion))
    if candidate >= 0:
        return 1.0
    return min(1.0, champion / candidate) if champion < 0 else 0.0


def history_score(pairs: Sequence[tuple[float, float]]) -> float:
    """Mean over tasks of :func:`task_score` of ``(candidate, champion)`` pairs."""
    if not pairs:
        raise TolariaError("the history gate needs at least one historical task's snapshot")
    return sum(task_score(c, h) for c, h in pairs) / len(pairs)


# ------------------------------------------------------------------------ hardware_stability
def profile_context(profile: Mapping[str, Any], like: Mapping[str, Any]) -> dict[str, Any]:
    """The hardware context ``like`` (a packet's, as JSON) as seen on ``profile``'s machine
    class (``recorder.hardware_profile``'s fields); its load stays the point's own."""
    total = int(profile["memory_gib"] * GIB)
    cuda = profile.get("cuda_memory_gib")
    return {
        **like,
        "device_type": profile["device_type"],
        "device_name": profile["device_name"],
        "cpu_count": profile["cpu_count"],
        "system_memory_total_bytes": total,
        "system_memory_available_bytes": min(like["system_memory_available_bytes"], total),
        "cuda_memory_total_bytes": int(cuda * GIB) if cuda is not None else None,
        "cuda_memory_allocated_bytes": like["cuda_memory_allocated_bytes"] if cuda else None,
        "cuda_memory_reserved_bytes": like["cuda_memory_reserved_bytes"] if cuda else None,
    }


def varied_observation(
    observation: Mapping[str, Any], profile: Mapping[str, Any] | None, noise: float,
    rng: np.random.Generator,
) -> Observation:
    """``observation`` (raw JSON) on ``profile``'s hardware (None: its own) with every measured
    number -- losses, scores, metrics, the history, seed telemetry -- times ``1 + u·noise``,
    ``u ~ U(-1, 1)`` drawn from ``rng``.  Counts, epochs and costs are exact, not measured."""
    data = copy.deepcopy(dict(observation))
    packet = data["packet"]

    def jitter(value):
        if isinstance(value, float) and math.isfinite(value):
            return value * (1.0 + noise * rng.uniform(-1.0, 1.0))
        return value

    def jitter_telemetry(telemetry):
        if telemetry:
            telemetry.update({k: jitter(telemetry.get(k)) for k in TELEMETRY_MEASURED
                              if k in telemetry})

    if profile is not None:
        packet["hardware_context"] = profile_context(profile, packet["hardware_context"])
    for key in ("training_loss", "validation_loss", "validation_accuracy"):
        packet[key] = jitter(packet[key])
    packet["validation_metrics"] = {k: jitter(v) for k, v in packet["validation_metrics"].items()}
    for telemetry in packet["health_map"].values():
        jitter_telemetry(telemetry)
    data["history"] = [[jitter(value) for value in entry] for entry in data["history"]]
    for seed in data["seeds"]:
        jitter_telemetry(seed["telemetry"])
    return Observation.from_dict(data)


def hardware_stability(
    scorer: CandidateScorer,
    points: Sequence[Mapping[str, Any]],
    profiles: Sequence[Mapping[str, Any]],
    noise: float,
    seed: int,
) -> float:
    """Fraction of (point, variation) pairs whose greedy choice is the unvaried one's.  The
    variations are the ``profiles`` (mirrorable ones), each with its own jitter; without any,
    one jittered copy on the point's own hardware.  Point ``i``'s variation ``v`` draws from
    a generator seeded ``(seed, i, v)``: deterministic, and independent of the other points."""
    variations = list(profiles) or [None]
    same = total = 0
    for i, point in enumerate(points):
        observation, candidates = decision(point)
        chosen = greedy(scorer, observation, candidates)
        for v, profile in enumerate(variations):
            rng = np.random.default_rng([seed, i, v])
            varied = varied_observation(point["observation"], profile, noise, rng)
            same += greedy(scorer, varied, candidates) == chosen
            total += 1
    if not total:
        raise TolariaError("the hardware-stability gate needs held-out decision points")
    return same / total


# ---------------------------------------------------------------------------- diversity_score
def marginal_actions(
    scorer: CandidateScorer, points: Sequence[Mapping[str, Any]], temperature: float
) -> dict[str, float]:
    """The mean over ``points`` of each category's probability: ``"wait"`` and every blueprint
    feasible somewhere in them (0 where the policy never takes it)."""
    mass: dict[str, float] = {"wait": 0.0}
    for point in points:
        observation, candidates = decision(point)
        probs = action_probabilities(scorer, observation, candidates, temperature).tolist()
        mass["wait"] += probs[0]
        for candidate, p in zip(candidates, probs[1:], strict=True):
            blueprint = candidate.option.blueprint
            mass[blueprint] = mass.get(blueprint, 0.0) + p
    if not points:
        raise TolariaError("the diversity gate needs held-out decision points")
    return {category: total / len(points) for category, total in mass.items()}


def diversity_score(
    scorer: CandidateScorer, points: Sequence[Mapping[str, Any]], temperature: float
) -> float:
    """``H(marginal) / log K`` in 0..1, K the categories feasible somewhere in ``points``:
    "always wait" and "always the same blueprint" both score 0."""
    marginal = marginal_actions(scorer, points, temperature)
    entropy = -sum(p * math.log(p) for p in marginal.values() if p > 0)
    return entropy / math.log(len(marginal)) if len(marginal) > 1 else 0.0


# ---------------------------------------------------------------------- validation_divergence
def validation_divergence(
    candidate: CandidateScorer, champion: CandidateScorer,
    points: Sequence[Mapping[str, Any]], temperature: float,
) -> float:
    """Mean total-variation distance between the two policies' action distributions."""
    if not points:
        raise TolariaError("the validation divergence needs held-out decision points")
    total = 0.0
    for point in points:
        observation, candidates = decision(point)
        ours = action_probabilities(candidate, observation, candidates, temperature)
        theirs = action_probabilities(champion, observation, candidates, temperature)
        total += 0.5 * float((ours - theirs).abs().sum())
    return total / len(points)


# ---------------------------------------------------------------------------- the report
@dataclass(frozen=True)
class GateReport:
    values: dict[str, float]
    thresholds: dict[str, float]

    def passes(self, gate: str) -> bool:
        return self.values[gate] > self.thresholds[gate]  # NaN fails

    @property
    def failed_gate(self) -> str | None:
        return next((gate for gate in GATES if not self.passes(gate)), None)

    @property
    def passed(self) -> bool:
        return self.failed_gate is None

    def to_dict(self) -> dict[str, Any]:
        """The card's and session record's form."""
        gates = {gate: {"value": self.values[gate], "threshold": self.thresholds[gate],
                        "passed": self.passes(gate)} for gate in GATES}
        return {"gates": gates, "failed_gate": self.failed_gate}


def validate_policy(
    candidate: CandidateScorer,
    *,
    history: Sequence[tuple[float, float]],
    held_out: Sequence[Mapping[str, Any]],
    profiles: Sequence[Mapping[str, Any]],
    settings: NightlyConfig,
    temperature: float,
    seed: int,
) -> GateReport:
    """Design §6.3: the three gates' values against ``settings.gates``.  ``history`` holds
    each historical task's (candidate, champion) final validation scores."""
    gates: GatesConfig = settings.gates
    values = {
        "history_score": history_score(history),
        "hardware_stability": hardware_stability(
            candidate, held_out, profiles, settings.noise, seed
        ),
        "diversity_score": diversity_score(candidate, held_out, temperature),
    }
    return GateReport(values, {gate: getattr(gates, gate) for gate in GATES})


# ---------------------------------------------------------------------------- the sandbox job
def unmirrorable(profile: Mapping[str, Any]) -> str | None:
    """Why this machine cannot mirror ``profile`` (None: it can): its device type must exist."""
    device = profile.get("device_type")
    if device == "cpu":
        return None
    backend = getattr(torch, str(device), None)
    available = getattr(backend, "is_available", None)
    if callable(available) and available():
        return None
    return f"no {device} device on this machine"


def validate_job(payload: Mapping[str, Any], scratch: Path) -> dict[str, Any]:
    """The sandbox job (nightly contract): every gate, the divergence, what was tested.
    ``payload["temperature"]`` (optional; default ``tamiyo.temperature``'s) is the policy's
    daytime temperature, at which diversity and divergence are measured."""
    from tolaria.academy.job_inputs import load_points, load_scorer
    from tolaria.academy.snapshot import continue_snapshot, load_snapshot

    settings = NightlyConfig.model_validate(payload["settings"])
    temperature = float(payload.get("temperature", TamiyoConfig().temperature))
    seed = int(payload["seed"])
    candidate_dir, champion_dir = Path(payload["candidate"]), Path(payload["champion"])
    candidate, champion = load_scorer(candidate_dir), load_scorer(champion_dir)
    held_out = load_points(payload["held_out"])
    tested, skipped = [], []
    for profile in payload["profiles"]:
        why = unmirrorable(profile)
        if why is None:
            if profile not in tested:
                tested.append(profile)
        elif all(entry["profile"] != profile for entry in skipped):
            skipped.append({"profile": profile, "why": why})
    history = []
    for path in payload["snapshots"]:
        snapshot = load_snapshot(Path(path))
        scores = {name: continue_snapshot(snapshot, policy_dir=directory,
                                          epochs=settings.history_epochs, scratch=Path(scratch))
                  for name, directory in (("candidate", candidate_dir),
                                          ("champion", champion_dir))}
        history.append((snapshot["task"], scores["candidate"], scores["champion"]))
    report = validate_policy(
        candidate,
        history=[(ours, theirs) for _, ours, theirs in history],
        held_out=held_out, profiles=tested, settings=settings,
        temperature=temperature, seed=seed,
    )
    return {
        **report.to_dict(),
        "validation_divergence": validation_divergence(candidate, champion, held_out,
                                                       temperature),
        # A run that did not finish is NaN in the gate, null in JSON.
        "history": [{"task": task, "candidate": _finite(ours), "champion": _finite(theirs)}
                    for task, ours, theirs in history],
        "profiles_tested": tested,
        "profiles_unmirrorable": skipped,
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
