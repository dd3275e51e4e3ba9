"""Policies: what to do with the seeds, given one epoch's evidence.

A policy is a pure function of an :class:`Observation` -- the packet plus the
controller's view of every seed and its memory -- to a list of :class:`Decision`.  It
holds no state and never touches a seed: the controller builds the observation,
applies the decisions and remembers what happened, so the same observation always
gives the same decisions, and a learned policy plugs into the same place.

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
   ``plateau_min_delta`` for ``plateau_patience`` epochs and fewer than
   ``max_active_seeds`` seeds are on trial, graft the best (location, blueprint) pair:
   a DORMANT seed whose chunk shape is known, a blueprint that supports it, fits the
   remaining parameter budget and is not forbidden, maximising

       score = w_dead * dead + w_sat * saturated + w_grad * grad_norm / max(grad_norm)
               - penalty(location, blueprint)

   so the least healthy location wins; ties go to the earlier seed, then the earlier
   blueprint in ``TamiyoConfig.blueprints``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from tolaria.config import TamiyoConfig
from tolaria.contracts import SeedState, SeedTelemetry, SystemStatePacket
from tolaria.errors import ConfigError


@dataclass(frozen=True)
class GraftOption:
    """One blueprint that fits a DORMANT seed's chunk, as the controller priced it."""

    blueprint: str
    param_cost: int
    #: Accumulated cull / failed-germination penalty for this (seed, blueprint) pair.
    penalty: float = 0.0
    #: Implicated in an incident: never graft it here again.
    forbidden: bool = False


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


@dataclass(frozen=True)
class Observation:
    packet: SystemStatePacket
    #: Every registered seed, in registration (module, then chunk) order.
    seeds: tuple[SeedView, ...]
    epochs_since_improvement: int
    param_budget_left: int


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
    def decide(self, observation: Observation) -> list[Decision]: ...


class HeuristicPolicy:
    """Plateau-triggered growth, health-guided placement, counterfactual judgement."""

    def __init__(self, config: TamiyoConfig) -> None:
        self.config = config

    def decide(self, observation: Observation) -> list[Decision]:
        decisions = [d for s in observation.seeds if (d := self._advance(s, observation))]
        culled = sum(d.to_state is SeedState.CULLED for d in decisions)
        on_trial = sum(s.state.is_active for s in observation.seeds) - culled
        decisions += self._grow(observation, on_trial)
        return decisions

    # ------------------------------------------------------------------ seeds on trial
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

    # ------------------------------------------------------------------ growth
    def _grow(self, observation: Observation, on_trial: int) -> list[Decision]:
        cfg = self.config
        plateau = observation.epochs_since_improvement >= cfg.plateau_patience
        if not plateau or observation.packet.current_epoch < cfg.min_epochs_before_growth:
            return []
        slots = min(cfg.max_active_seeds - on_trial, cfg.max_germinations_per_epoch)
        budget = observation.param_budget_left
        dormant = [s for s in observation.seeds if s.state is SeedState.DORMANT and s.options]
        grads = [s.telemetry.grad_norm for s in dormant if s.telemetry is not None]
        grad_scale = max(grads, default=0.0)

        ranked = []
        for position, seed in enumerate(dormant):
            health = self._unhealthiness(seed.telemetry, grad_scale)
            for preference, option in enumerate(seed.options):
                if not option.forbidden:
                    ranked.append((-(health - option.penalty), position, preference, seed, option))
        ranked.sort(key=lambda entry: entry[:3])

        decisions: list[Decision] = []
        chosen: set[str] = set()
        for negative_score, _, _, seed, option in ranked:
            if len(chosen) >= slots:
                break
            if seed.seed_id in chosen or option.param_cost > budget:
                continue
            chosen.add(seed.seed_id)
            budget -= option.param_cost
            score = -negative_score
            decisions.append(
                Decision(
                    seed.seed_id,
                    SeedState.GERMINATED,
                    f"plateau for {observation.epochs_since_improvement} epochs; "
                    f"least healthy location (score {score:.3f})",
                    option.blueprint,
                    {"score": score, "param_cost": float(option.param_cost)},
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


POLICIES = {"heuristic": HeuristicPolicy}


def make_policy(config: TamiyoConfig) -> Policy:
    try:
        return POLICIES[config.policy](config)
    except KeyError:
        raise ConfigError(
            f"tamiyo.policy: unknown policy {config.policy!r} (known: {sorted(POLICIES)})"
        ) from None
