"""Policies: what to do with the seeds, given one epoch's evidence.

A policy maps an :class:`Observation` -- the packet plus the controller's view of every
seed -- to a list of :class:`Decision`.  ``decide`` is pure: it never touches a seed or
its own memory, so the same observation and state always give the same decisions (one
rank can decide for all; a sandbox can replay stored observations).  What a policy
remembers across epochs is its own, updated in ``update`` once the controller has applied
the decisions, and saved with ``state_dict``.  The config names a policy by its
registered name or as ``module:Class``; the class is called with the ``TamiyoConfig``.

:class:`HeuristicPolicy` is the first policy.  Per epoch, in registration order:

1. **Advance on evidence.**  GERMINATED -> TRAINING at once (the optimizer is rebuilt
   before the next epoch, so waiting would only waste it); TRAINING -> BLENDING after
   ``min_training_epochs``; BLENDING -> PROBATIONARY once alpha has reached 1;
   PROBATIONARY, after ``probation_epochs``, is judged on its counterfactual on the
   validation split: with ``gain_acc = acc - acc(alpha=0)`` and ``gain_loss =
   loss(alpha=0) - loss`` it FOSSILIZES when ``gain_acc >= fossilize_min_gain`` and
   ``gain_loss >= fossilize_min_loss_gain``, and is CULLED otherwise.  A seed holding a
   graft implicated in an incident is culled whatever its state.
2. **Grow on a plateau.**  When validation loss has not improved by
   ``plateau_min_improvement`` (a fraction of its best) for ``plateau_patience`` epochs
   (the policy's memory; a graft answers the plateau, so the count restarts) and fewer than
   ``max_active_seeds`` seeds are on trial, graft the best (location, blueprint) pair:
   a DORMANT seed whose chunk shape is known, a blueprint that supports it, fits the
   remaining parameter budget and is not forbidden, maximising

       score = w_dead * dead + w_sat * saturated + w_grad * grad_norm / max(grad_norm)
               - penalty(location, blueprint)

   so the least healthy location wins; ties go to the earlier seed, then the earlier
   blueprint in ``TamiyoConfig.blueprints``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from tolaria.config import TamiyoConfig
from tolaria.contracts import Adaptation, SeedState, SeedTelemetry, SystemStatePacket
from tolaria.errors import ConfigError
from tolaria.plugins import check_kwargs, construct
from tolaria.registry import Registry
from tolaria.tamiyo.emergency import Emergency
from tolaria.tamiyo.growth import candidates, growth_slots


@dataclass(frozen=True)
class GraftOption:
    """One blueprint that fits a DORMANT seed's chunk, as the controller priced it."""

    blueprint: str
    param_cost: int
    #: Accumulated cull / failed-germination penalty for this (seed, blueprint) pair.
    penalty: float = 0.0
    #: Implicated in an incident: never graft it here again.
    forbidden: bool = False
    #: The blueprint's descriptors (``Blueprint.kind``, ``Blueprint.receptive_field``).
    kind: str = "other"
    receptive_field: float = 1.0


@dataclass(frozen=True)
class SeedView:
    """What a policy may know about one seed."""

    seed_id: str
    state: SeedState
    epochs_in_state: int
    alpha: float
    blueprint: str | None
    param_count: int
    telemetry: SeedTelemetry | None
    #: Blueprints that fit (DORMANT seeds with a known chunk shape only).
    options: tuple[GraftOption, ...] = ()
    #: Holds a blueprint implicated in an incident.
    implicated: bool = False
    #: Per-sample shape of the seed's chunk (None until a forward pass taught it).
    chunk_shape: tuple[int, ...] | None = None
    #: Position of the seed's module among the seeded modules: 0 first (input side), 1 last.
    depth: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **{f: getattr(self, f) for f in _SEED_VIEW_SCALARS},
            "state": self.state.value,
            "telemetry": self.telemetry.to_dict() if self.telemetry else None,
            "options": [asdict(o) for o in self.options],
            "chunk_shape": list(self.chunk_shape) if self.chunk_shape else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SeedView:
        telemetry = data["telemetry"]
        return cls(
            **{f: data[f] for f in _SEED_VIEW_SCALARS},
            state=SeedState(data["state"]),
            telemetry=SeedTelemetry.from_dict(telemetry) if telemetry else None,
            options=tuple(GraftOption(**o) for o in data["options"]),
            chunk_shape=tuple(data["chunk_shape"]) if data["chunk_shape"] else None,
        )


_SEED_VIEW_SCALARS = (
    "seed_id", "epochs_in_state", "alpha", "blueprint", "param_count", "implicated", "depth"
)


@dataclass(frozen=True)
class Observation:
    packet: SystemStatePacket
    #: Every registered seed, in registration (module, then chunk) order.
    seeds: tuple[SeedView, ...]
    param_budget_left: int
    #: What the emergency check found; the controller then rolls back, no policy asked.
    emergency: Emergency | None = None
    #: ``(training_loss, validation_loss, validation_accuracy)`` of the last epochs, this
    #: one last: the trend a policy may read without memory of its own.
    history: tuple[tuple[float, float, float], ...] = ()
    #: The run's planned epochs, the host's own parameters and the growth budget (0: unknown).
    epochs_total: int = 0
    host_params: int = 0
    param_budget: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The raw observation as JSON (a replay buffer stores it; encoders may change)."""
        return {
            "packet": self.packet.to_dict(),
            "seeds": [s.to_dict() for s in self.seeds],
            "history": [list(h) for h in self.history],
            **{f: getattr(self, f) for f in _OBSERVATION_SCALARS},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Observation:
        return cls(
            packet=SystemStatePacket.from_dict(data["packet"]),
            seeds=tuple(SeedView.from_dict(s) for s in data["seeds"]),
            history=tuple(tuple(h) for h in data["history"]),
            **{f: data[f] for f in _OBSERVATION_SCALARS},
        )


_OBSERVATION_SCALARS = ("param_budget_left", "epochs_total", "host_params", "param_budget")


@dataclass(frozen=True)
class Decision:
    """Move ``seed_id`` to ``to_state`` (GERMINATED with ``blueprint`` grafts it)."""

    seed_id: str
    to_state: SeedState
    reason: str
    blueprint: str | None = None
    #: The numbers the decision rests on, logged with it.
    evidence: Mapping[str, float] = field(default_factory=dict)


class Policy(Protocol):
    def decide(self, observation: Observation) -> list[Decision]:
        """Pure: decisions from the observation and the policy's state, nothing changed."""
        ...

    def update(self, observation: Observation, applied: Sequence[Adaptation]) -> None:
        """Fold the epoch into the policy's memory, once ``applied`` were carried out."""
        ...

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class LifecycleGates:
    """Step 1 of every built-in policy: the seeds on trial advance, fossilize or are culled
    by rule (evidence, age, the counterfactual on validation) -- safety is never learned."""

    def __init__(self, config: TamiyoConfig) -> None:
        self.config = config

    def decide(self, observation: Observation) -> list[Decision]:
        return [d for s in observation.seeds if (d := self._advance(s, observation))]

    def _advance(self, seed: SeedView, observation: Observation) -> Decision | None:
        cfg = self.config
        if not seed.state.is_active:
            return None
        if seed.implicated:
            return Decision(
                seed.seed_id,
                SeedState.CULLED,
                "implicated in an earlier incident",
                seed.blueprint,
            )
        if seed.state is SeedState.GERMINATED:
            return Decision(seed.seed_id, SeedState.TRAINING, "grafted", seed.blueprint)
        if seed.state is SeedState.TRAINING and seed.epochs_in_state >= cfg.min_training_epochs:
            ratio = seed.telemetry.delta_ratio if seed.telemetry else None
            if ratio is not None and ratio > cfg.max_delta_ratio:
                # Blending it in would add a correction larger than the signal it corrects.
                return Decision(
                    seed.seed_id,
                    SeedState.CULLED,
                    f"delta grew to {ratio:.2f}x its layer's RMS in training "
                    f"(tamiyo.max_delta_ratio={cfg.max_delta_ratio})",
                    seed.blueprint,
                    {"delta_ratio": ratio},
                )
            return Decision(
                seed.seed_id,
                SeedState.BLENDING,
                f"trained {seed.epochs_in_state} epochs",
                seed.blueprint,
            )
        if seed.state is SeedState.BLENDING and seed.alpha >= 1.0:
            return Decision(seed.seed_id, SeedState.PROBATIONARY, "fully blended", seed.blueprint)
        if seed.state is SeedState.PROBATIONARY and seed.epochs_in_state >= cfg.probation_epochs:
            return self._judge(seed, observation.packet)
        return None

    def _judge(self, seed: SeedView, packet: SystemStatePacket) -> Decision | None:
        ablated = packet.counterfactual.get(seed.seed_id)
        if ablated is None:
            return None  # no evidence this epoch: judging blind would be a guess
        gain_acc = packet.validation_accuracy - ablated.accuracy
        gain_loss = ablated.loss - packet.validation_loss
        evidence = {"gain_accuracy": gain_acc, "gain_loss": gain_loss}
        measured = f"gain {gain_acc:+.4f} acc, {gain_loss:+.4f} loss on validation"
        if (
            gain_acc >= self.config.fossilize_min_gain
            and gain_loss >= self.config.fossilize_min_loss_gain
        ):
            return Decision(
                seed.seed_id, SeedState.FOSSILIZED, f"helps: {measured}", seed.blueprint, evidence
            )
        return Decision(
            seed.seed_id, SeedState.CULLED, f"does not help: {measured}", seed.blueprint, evidence
        )


class HeuristicPolicy:
    """Plateau-triggered growth, health-guided placement, counterfactual judgement."""

    #: The same observation and memory always give the same choice: every propensity is 1.
    deterministic = True

    def __init__(self, config: TamiyoConfig) -> None:
        self.config = config
        self.gates = LifecycleGates(config)
        #: Plateau tracking: the best validation loss, and epochs since it improved.
        self.best_validation_loss = math.inf
        self.epochs_since_improvement = 0

    def decide(self, observation: Observation) -> list[Decision]:
        decisions = self.gates.decide(observation)
        slots = growth_slots(observation, self.config, decisions)
        return decisions + self._grow(observation, slots)

    def update(self, observation: Observation, applied: Sequence[Adaptation]) -> None:
        self.best_validation_loss, self.epochs_since_improvement = self._plateau(
            observation.packet
        )
        if any(a.to_state is SeedState.GERMINATED for a in applied):
            self.epochs_since_improvement = 0  # the graft answers this plateau

    def _plateau(self, packet: SystemStatePacket) -> tuple[float, int]:
        """(best loss, epochs since improvement) once this packet's loss is counted."""
        best, loss = self.best_validation_loss, packet.validation_loss
        if best == math.inf or loss < best - self.config.plateau_min_improvement * abs(best):
            return loss, 0  # (the first epoch is progress: inf - x * inf would be NaN)
        return self.best_validation_loss, self.epochs_since_improvement + 1

    def state_dict(self) -> dict[str, Any]:
        best = self.best_validation_loss
        return {
            "best_validation_loss": best if math.isfinite(best) else None,
            "epochs_since_improvement": self.epochs_since_improvement,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        best, stale = state["best_validation_loss"], int(state["epochs_since_improvement"])
        self.best_validation_loss = math.inf if best is None else float(best)
        self.epochs_since_improvement = stale

    # ------------------------------------------------------------------ growth
    def _grow(self, observation: Observation, slots: int) -> list[Decision]:
        cfg = self.config
        _, stale = self._plateau(observation.packet)
        if stale < cfg.plateau_patience or not slots:
            return []
        budget = observation.param_budget_left
        dormant = [s for s in observation.seeds if s.state is SeedState.DORMANT and s.options]
        grads = [s.telemetry.grad_norm for s in dormant if s.telemetry is not None]
        grad_scale = max(grads, default=0.0)
        health = {s.seed_id: self._unhealthiness(s.telemetry, grad_scale) for s in dormant}
        # A stable sort of the candidates (seed, then blueprint-preference order): ties go to
        # the earlier seed, then the earlier blueprint.
        ranked = sorted(
            ((health[c.seed.seed_id] - c.option.penalty, c.seed, c.option)
             for c in candidates(observation, budget=budget)),
            key=lambda entry: -entry[0],
        )

        decisions: list[Decision] = []
        chosen: set[str] = set()
        for score, seed, option in ranked:
            if len(chosen) >= slots:
                break
            if seed.seed_id in chosen or option.param_cost > budget:
                continue
            chosen.add(seed.seed_id)
            budget -= option.param_cost
            decisions.append(
                Decision(
                    seed.seed_id,
                    SeedState.GERMINATED,
                    f"plateau for {stale} epochs; least healthy location (score {score:.3f})",
                    option.blueprint,
                    {
                        "score": score,
                        "param_cost": float(option.param_cost),
                        "epochs_since_improvement": stale,
                    },
                )
            )
            decisions.append(
                Decision(seed.seed_id, SeedState.TRAINING, "grafted", option.blueprint)
            )
        return decisions

    def _unhealthiness(self, telemetry: SeedTelemetry | None, grad_scale: float) -> float:
        if telemetry is None:
            return 0.0
        cfg = self.config
        grad = telemetry.grad_norm / grad_scale if grad_scale > 0 else 0.0
        return (
            cfg.health_weight_dead * telemetry.dead_fraction
            + cfg.health_weight_saturated * telemetry.saturated_fraction
            + cfg.health_weight_gradient * grad
        )


def _learned(config: TamiyoConfig, **context: Any) -> Policy:
    from tolaria.tamiyo.learned import LearnedPolicy  # torch-heavy scoring only when chosen

    return LearnedPolicy(config, **context)


POLICIES: Registry[Any] = Registry("policy", "tamiyo.policy")
POLICIES.register("heuristic", HeuristicPolicy)
POLICIES.register("learned", _learned)

#: What a policy may ask for beyond its config, by naming it as a keyword argument.
POLICY_CONTEXT = ("seed", "academy_dir")


def make_policy(config: TamiyoConfig, **context: Any) -> Policy:
    """The policy ``tamiyo.policy`` names (registered, or ``module:Class``), built on ``config``
    and the ``context`` entries (:data:`POLICY_CONTEXT`: the run seed, the academy) its
    constructor accepts.

    An unknown name and a constructor that fails are two different mistakes, reported as such.
    """
    factory = POLICIES.get(config.policy)
    wanted = _accepted(factory, context)
    check_kwargs(factory, wanted, "tamiyo.policy", positional=1)
    policy = construct(factory, f"tamiyo.policy={config.policy!r}", config, **wanted)
    missing = [m for m in ("decide", "update", "state_dict", "load_state_dict")
               if not callable(getattr(policy, m, None))]
    if missing:
        raise ConfigError(
            f"tamiyo.policy={config.policy!r}: not a policy (lacks {', '.join(missing)})"
        )
    return policy


def _accepted(factory: Any, context: Mapping[str, Any]) -> dict[str, Any]:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return dict(context)
    return {k: v for k, v in context.items() if k in parameters}
