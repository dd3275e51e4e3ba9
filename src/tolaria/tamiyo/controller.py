"""TamiyoController: the morphogenetic controller Tolaria calls at every epoch end.

Per epoch (design §2, Figures 1-2)::

    on_epoch_boundary(epoch)   the epoch's seed telemetry becomes the health map
    seeds_to_evaluate()        PROBATIONARY seeds, whose counterfactual Tolaria measures
    step(packet)               apply(decide(observe(packet))):
      observe(packet)          emergency check; otherwise close the epoch's clocks (loss
                               history, due outcomes, each seed's on_epoch_end) -> Observation
      decide(observation)      pure: the policy's decisions, or a rollback -> Plan
      apply(plan)              the only place seeds are commanded, logged and remembered
    on_rollback(epoch)         after Tolaria restored a snapshot: cull implicated grafts

``step`` returns an :class:`AdaptationSignal`.  ``emergency_rollback_required`` is set
by :mod:`tolaria.tamiyo.emergency` and then nothing else happens that epoch;
``optimizer_rebuild_required`` is set exactly when the set of trainable seed
parameters, or the role (on trial / host) of one, changed: germination, cull,
fossilization.  ``observe`` is deterministic and ``decide`` has no side effects, so under
multi-process training every rank observes and applies while one decides, and a sandbox
can replay decisions against stored observations.

The controller owns every piece of memory a decision depends on -- the policy (with its
own ``state_dict``: plateau tracking for the heuristic), penalties, incident memory,
decision log -- and ``state_dict`` returns all of it as plain JSON.  Seeds keep their own
state in the model (Kasmina's structure manifest).  ``load_state_dict`` merges the
memories that must survive a rollback (incidents, penalties, decision ids) and overwrites
the rest, so a fresh controller loaded from a checkpoint takes exactly the decisions the
saved one would have taken.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tolaria.config import KasminaConfig, TamiyoConfig
from tolaria.contracts import (
    Adaptation,
    AdaptationSignal,
    SeedState,
    SeedTelemetry,
    SystemStatePacket,
)
from tolaria.errors import BlueprintError, CheckpointError, ConfigError, RepeatedFailureError
from tolaria.kasmina import KasminaSeed, collect_telemetry
from tolaria.tamiyo.catalog import GraftCatalog
from tolaria.tamiyo.decisions import DecisionLog, GrowthLedger
from tolaria.tamiyo.emergency import ChanceLevel, Emergency, EmergencyDetector, IncidentMemory
from tolaria.tamiyo.growth import GrowthPoint, growth_points
from tolaria.tamiyo.policy import Decision, Observation, Policy, SeedView, make_policy

#: 2: the plateau tracker moved into the policy's own state.  3: the loss history and the
#: growth ledger joined it (a version-2 state loads with both empty).
STATE_VERSION = 3

#: Epochs of (training loss, validation loss, accuracy) an observation carries.
HISTORY_EPOCHS = 8


def _discard(kind: str, **fields: Any) -> None:
    """The event sink of a controller that nobody listens to."""


@dataclass(frozen=True)
class Plan:
    """What ``decide`` concluded: seed commands, or a rollback for ``emergency``."""

    observation: Observation
    decisions: tuple[Decision, ...] = ()
    emergency: Emergency | None = None
    #: The growth choices the decisions amount to (the replay buffer's decision points).
    points: tuple[GrowthPoint, ...] = ()


class TamiyoController:
    """Decides when, where and what to grow, judges seeds on trial, detects emergencies."""

    def __init__(
        self,
        config: TamiyoConfig,
        kasmina_config: KasminaConfig,
        *,
        host_parameters: int,
        chance: ChanceLevel | None = None,
        num_classes: int | None = None,
        event_sink: Callable[..., None] | None = None,
        policy: Policy | None = None,
        epochs_total: int = 0,
    ) -> None:
        """``chance`` is what knowing nothing scores on the task (``tolaria.task`` measures
        it); ``num_classes`` is the short form for classification with cross-entropy."""
        if (chance is None) == (num_classes is None):
            raise ConfigError("TamiyoController: give exactly one of chance and num_classes")
        if num_classes is not None:
            if num_classes < 2:
                raise ConfigError(f"TamiyoController: num_classes must be >= 2, got {num_classes}")
            chance = ChanceLevel.of_classes(num_classes)
        self.catalog = GraftCatalog(config, kasmina_config)
        self.config = config
        self.kasmina_config = kasmina_config
        self.chance = chance
        self.host_parameters, self.epochs_total = host_parameters, epochs_total
        self.param_budget = int(config.param_budget_fraction * host_parameters)
        self.policy = policy if policy is not None else make_policy(config)
        #: ``sink(kind, **fields)`` for decisions, outcomes and incidents (the trainer's).
        self.event_sink = event_sink if event_sink is not None else _discard
        self._seeds: dict[str, KasminaSeed] = {}
        self._health: dict[str, SeedTelemetry] = {}
        self.penalties: dict[tuple[str, str], float] = {}
        self.detector = self._new_detector()
        self.incidents = IncidentMemory()
        self.decisions = DecisionLog(self._emit, config.outcome_horizon)
        self.growth = GrowthLedger(self._emit)
        self.history: deque[tuple[float, float, float]] = deque(maxlen=HISTORY_EPOCHS)
        self._modules: list[str] = []  # seeded modules, in registration order

    def _new_detector(self) -> EmergencyDetector:
        cfg = self.config
        return EmergencyDetector(
            chance=self.chance,
            collapse_margin=cfg.collapse_margin,
            chance_loss_factor=cfg.chance_loss_factor,
            divergence_factor=cfg.divergence_factor,
            divergence_epochs=cfg.divergence_epochs,
            divergence_window=cfg.divergence_window,
            divergence_loss_floor=cfg.divergence_loss_floor,
        )

    def _emit(self, kind: str, **fields: Any) -> None:
        self.event_sink(kind, **fields)  # looked up per call: the trainer rebinds the sink

    # ------------------------------------------------------------------ registration
    def register_seed(self, seed: KasminaSeed) -> None:
        if seed.seed_id in self._seeds:
            raise ValueError(f"seed {seed.seed_id!r} is already registered")
        self._seeds[seed.seed_id] = seed
        module = seed.seed_id.rpartition(".")[0]
        if module not in self._modules:
            self._modules.append(module)

    def check_grafts(self) -> None:
        """Refuse now, in one line, a configured graft that can never happen
        (:meth:`GraftCatalog.check`)."""
        self.catalog.check(self._seeds.values())

    # ------------------------------------------------------------------ epoch boundary
    def on_epoch_boundary(self, epoch: int) -> None:
        """Rotate the epoch state: the telemetry the seeds gathered becomes the health map."""
        health = collect_telemetry(self._seeds.values(), epoch)
        self._health = {sid: t for sid, t in health.items() if sid in self._seeds}

    @property
    def health_map(self) -> dict[str, SeedTelemetry]:
        return dict(self._health)

    @property
    def seed_states(self) -> dict[str, SeedState]:
        return {seed_id: seed.state for seed_id, seed in self._seeds.items()}

    def seeds_to_evaluate(self) -> list[str]:
        """Seeds whose validation with alpha forced to 0 the next packet must carry."""
        return [sid for sid, s in self._seeds.items() if s.state is SeedState.PROBATIONARY]

    # ------------------------------------------------------------------ the decision
    def step(self, packet: SystemStatePacket) -> AdaptationSignal:
        return self.apply(self.decide(self.observe(packet)))

    def observe(self, packet: SystemStatePacket) -> Observation:
        """Close the epoch just lived and return what a decision may see.

        Not a decision, so every rank can run it: the emergency check folds the packet into
        the loss history; unless it found an emergency (whose epoch a rollback discards),
        due outcomes are written and each seed counts the epoch -- before the policy looks,
        so ``epochs_in_state`` and the blending ramp include it.
        """
        emergency = self.detector.check(packet)
        if emergency is None:
            self.history.append(
                (packet.training_loss, packet.validation_loss, packet.validation_accuracy)
            )
            self.decisions.resolve_due(
                packet.current_epoch, packet.validation_loss, packet.validation_accuracy
            )
            for seed in self._seeds.values():
                seed.on_epoch_end(packet.current_epoch)
        grafted = sum(s.param_count() for s in self._seeds.values() if s.state.holds_blueprint)
        views = tuple(
            SeedView(
                seed_id=seed_id,
                state=seed.state,
                epochs_in_state=seed.epochs_in_state,
                alpha=seed.alpha,
                blueprint=seed.blueprint_name,
                param_count=seed.param_count(),
                telemetry=packet.health_map.get(seed_id),
                options=self.catalog.options(seed, self.penalties, self.incidents),
                implicated=self.incidents.is_forbidden(seed_id, seed.blueprint_name),
                chunk_shape=tuple(seed.chunk_shape) if seed.chunk_shape else None,
                depth=self._depth(seed_id),
            )
            for seed_id, seed in self._seeds.items()
        )
        return Observation(
            packet=packet,
            seeds=views,
            param_budget_left=self.param_budget - grafted,
            emergency=emergency,
            history=tuple(self.history),
            epochs_total=self.epochs_total,
            host_params=self.host_parameters,
            param_budget=self.param_budget,
        )

    def _depth(self, seed_id: str) -> float:
        index = self._modules.index(seed_id.rpartition(".")[0])
        return index / (len(self._modules) - 1) if len(self._modules) > 1 else 0.0

    def decide(self, observation: Observation) -> Plan:
        """Pure: no seed, memory or log changes; the same observation and state, the same plan."""
        if observation.emergency is not None:
            return Plan(observation, emergency=observation.emergency)
        decisions = tuple(self.policy.decide(observation))
        points = growth_points(observation, self.config, decisions, self.policy)
        return Plan(observation, decisions=decisions, points=points)

    def apply(self, plan: Plan) -> AdaptationSignal:
        """Carry out ``plan``: command the seeds, log each decision, update the memories."""
        observation = plan.observation
        if plan.emergency is not None:
            return self._on_emergency(plan.emergency, observation.packet)
        before = self._trainable_signature()
        for point in plan.points:
            self.growth.record(
                point,
                epoch=observation.packet.current_epoch,
                observation=observation,
                policy=self.config.policy,
                policy_version=getattr(self.policy, "version", None),
            )
        adaptations: list[Adaptation] = []
        failed: set[str] = set()
        for decision in plan.decisions:
            if decision.seed_id in failed:
                continue  # e.g. the TRAINING that follows a germination that failed
            adaptation = self._apply(decision, observation)
            if adaptation is None:
                failed.add(decision.seed_id)
            else:
                adaptations.append(adaptation)
        self.policy.update(observation, adaptations)
        rebuild = self._trainable_signature() != before
        reason = "; ".join(f"{a.seed_id} -> {a.to_state.value}" for a in adaptations)
        return AdaptationSignal(
            optimizer_rebuild_required=rebuild, reason=reason, adaptations=tuple(adaptations)
        )

    def _apply(self, decision: Decision, observation: Observation) -> Adaptation | None:
        """Issue one command to its seed; log it.  None if the germination was refused."""
        seed = self._seeds[decision.seed_id]
        packet = observation.packet
        epoch = packet.current_epoch
        from_state = seed.state
        blueprint = decision.blueprint
        if decision.to_state is SeedState.GERMINATED:
            kwargs = self.config.blueprint_kwargs.get(blueprint, {})
            try:
                seed.germinate(blueprint, epoch=epoch, reason=decision.reason, **kwargs)
            except BlueprintError as exc:
                self._penalise(seed.seed_id, blueprint)
                self.growth.settle(seed.seed_id, "germination_failed", epoch=epoch)
                self._emit(
                    "germination_failed",
                    epoch=epoch,
                    seed_id=seed.seed_id,
                    blueprint=blueprint,
                    error=str(exc),
                )
                return None
        else:
            seed.transition(decision.to_state, epoch=epoch, reason=decision.reason)
            if decision.to_state is SeedState.CULLED and blueprint is not None:
                self._penalise(seed.seed_id, blueprint)
            if decision.to_state in (SeedState.CULLED, SeedState.FOSSILIZED):
                self.growth.settle(
                    seed.seed_id, decision.to_state.value, epoch=epoch, evidence=decision.evidence
                )

        view = next(v for v in observation.seeds if v.seed_id == seed.seed_id)
        self.decisions.record(
            epoch=epoch,
            seed_id=seed.seed_id,
            action=decision.to_state.value,
            blueprint=blueprint,
            reason=decision.reason,
            validation_loss=packet.validation_loss,
            validation_accuracy=packet.validation_accuracy,
            param_cost=seed.param_count(),
            features={
                "training_loss": packet.training_loss,
                "param_budget_left": observation.param_budget_left,
                "seeds_on_trial": sum(v.state.is_active for v in observation.seeds),
                "from_state": from_state.value,
                "epochs_in_state": view.epochs_in_state,
                "telemetry": view.telemetry.to_dict() if view.telemetry else None,
                "evidence": dict(decision.evidence),
            },
        )
        return Adaptation(seed.seed_id, from_state, decision.to_state, decision.reason, blueprint)

    def _penalise(self, seed_id: str, blueprint: str) -> None:
        key = (seed_id, blueprint)
        self.penalties[key] = self.penalties.get(key, 0.0) + self.config.cull_penalty

    def _trainable_signature(self) -> frozenset[tuple[str, str, bool]]:
        """(parameter FQN within the seeds, on trial?) for every trainable seed parameter."""
        return frozenset(
            (f"{seed_id}/{name}", seed.state.is_active)
            for seed_id, seed in self._seeds.items()
            for name, parameter in seed.named_parameters()
            if parameter.requires_grad
        )

    # ------------------------------------------------------------------ emergencies
    def _on_emergency(self, emergency: Emergency, packet: SystemStatePacket) -> AdaptationSignal:
        suspects = self.decisions.implicate(
            emergency.epoch,
            self.config.incident_lookback_epochs,
            emergency.key,
            packet.validation_loss,
            packet.validation_accuracy,
        )
        # Suspects: what the recent decisions grafted or advanced, and every seed still on
        # trial -- a graft made long ago can fail when it starts blending in.
        on_trial = {
            (sid, seed.blueprint_name)
            for sid, seed in self._seeds.items()
            if seed.state.is_active and seed.blueprint_name
        }
        grafts = sorted(
            on_trial
            | {(r.seed_id, r.blueprint) for r in suspects if r.blueprint and r.action != "culled"}
        )
        count = self.incidents.record(emergency, grafts)
        points = self.growth.implicate({seed_id for seed_id, _ in grafts})
        self._emit(
            "incident",
            epoch=emergency.epoch,
            emergency=emergency.kind,
            key=emergency.key,
            reason=emergency.reason,
            count=count,
            suspect_decisions=[r.decision_id for r in suspects],
            forbidden=[list(g) for g in grafts],
            implicated_points=points,
        )
        if count >= self.config.max_repeated_failures:
            implicated = ", ".join(f"{b} at {s}" for s, b in grafts) or "no recent graft"
            raise RepeatedFailureError(
                f"{emergency.kind} at epoch {emergency.epoch} happened {count} times "
                f"(tamiyo.max_repeated_failures={self.config.max_repeated_failures}): "
                f"{emergency.reason}; implicated: {implicated}. Rolling back again would loop; "
                "stopping the run.",
                kind=emergency.kind,
            )
        return AdaptationSignal(
            emergency_rollback_required=True,
            reason=f"{emergency.kind} at epoch {emergency.epoch}: {emergency.reason}",
        )

    def on_rollback(self, restored_epoch: int) -> AdaptationSignal:
        """Apply the incident memory to the structure a rollback just restored.

        The restored snapshot predates the incident, so it may still hold the graft that
        caused it; replaying it unchanged would replay the failure bit for bit.  Every seed
        on trial whose graft is forbidden is culled now, before the epoch runs again.
        """
        self.growth.close_undone(restored_epoch)
        adaptations = []
        for seed_id, seed in self._seeds.items():
            blueprint = seed.blueprint_name
            if seed.state.is_active and self.incidents.is_forbidden(seed_id, blueprint):
                reason = "implicated in an incident; culled before the epoch is replayed"
                from_state = seed.state
                seed.transition(SeedState.CULLED, epoch=restored_epoch, reason=reason)
                self._penalise(seed_id, blueprint)
                self.growth.settle(seed_id, "culled", epoch=restored_epoch)
                adaptations.append(
                    Adaptation(seed_id, from_state, SeedState.CULLED, reason, blueprint)
                )
        return AdaptationSignal(
            optimizer_rebuild_required=bool(adaptations),
            reason="; ".join(f"{a.seed_id} -> culled" for a in adaptations),
            adaptations=tuple(adaptations),
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a decision depends on, as plain JSON."""
        return {
            "version": STATE_VERSION,
            "policy": self.policy.state_dict(),
            "penalties": [[s, b, p] for (s, b), p in sorted(self.penalties.items())],
            "health_map": {sid: t.to_dict() for sid, t in self._health.items()},
            "detector": self.detector.state_dict(),
            "incidents": self.incidents.state_dict(),
            "decisions": self.decisions.state_dict(),
            "history": [list(h) for h in self.history],
            "growth": self.growth.state_dict(),
        }

    #: The design's name (§3.1, §6.2) for :meth:`state_dict`.
    save_state_dict = state_dict

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a saved state; incident memory, penalties and decision ids are merged.

        All or nothing: the state is parsed into new objects first, so a malformed one
        raises ``CheckpointError`` and leaves the controller as it was.
        """
        try:
            if state["version"] not in (2, STATE_VERSION):
                raise CheckpointError(
                    f"tamiyo state version {state['version']!r}, expected {STATE_VERSION}"
                )
            penalties = dict(self.penalties)
            for seed_id, blueprint, penalty in state["penalties"]:
                key = (str(seed_id), str(blueprint))
                penalties[key] = max(penalties.get(key, 0.0), float(penalty))
            health = {sid: SeedTelemetry.from_dict(t) for sid, t in state["health_map"].items()}
            detector = self._new_detector()
            detector.load_state_dict(state["detector"])
            incidents = IncidentMemory()
            for memory in (self.incidents.state_dict(), state["incidents"]):
                incidents.merge_state_dict(memory)
            decisions = DecisionLog(self._emit, self.config.outcome_horizon)
            for log in (self.decisions.state_dict(), state["decisions"]):
                decisions.merge_state_dict(log)
            history = deque((tuple(h) for h in state.get("history", ())), maxlen=HISTORY_EPOCHS)
            growth = self.growth.restored(state.get("growth", GrowthLedger(None).state_dict()))
            self.policy.load_state_dict(state["policy"])  # last: it may fail half-way
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"tamiyo state is malformed: {exc!r}") from None
        self.penalties, self._health = penalties, health
        self.detector, self.incidents, self.decisions = detector, incidents, decisions
        self.history, self.growth = history, growth
