"""DynamicOptimizerManager: one optimizer for a model that grows (design §3.2).

The optimizer has exactly two param groups, created once and mutated in place:

* ``host`` -- the host's trainable parameters and those of FOSSILIZED seeds, at
  ``optimizer.lr``;
* ``seed`` -- parameters of seeds on trial (GERMINATED/TRAINING/BLENDING/PROBATIONARY), at
  ``optimizer.lr * seed_lr_multiplier`` times the seed warm-up (``tolaria.schedules``).

A rebuild rescans the model and edits the groups' ``params`` lists: a parameter that
stays keeps its ``optimizer.state`` entry untouched (the same tensors, so no copies and
bit-for-bit identical updates), a parameter that leaves loses its state, and a parameter
that joins gets the fresh state the optimizer class would give it (Adagrad builds state in
its constructor), plus, in a fused SGD group, a zero momentum buffer like its peers'.
Because the groups never change in number, a scheduler's per-group lists stay valid and
every existing group's LR is what it would have been with no rebuild.

Parameters are known by their fully qualified name (FQN) in the manifest and the
state dict; identity in the optimizer is the tensor object itself, so a parameter
replaced under the same name counts as new.  Roles come from a ``trial_parameters``
callable (default ``tolaria.kasmina.seed_parameter_names``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tolaria.config import OptimizerConfig, SchedulerConfig
from tolaria.errors import ConfigError, OptimizerManifestError
from tolaria.kasmina import seed_parameter_names
from tolaria.schedules import SeedWarmup, build_scheduler, is_plateau

HOST_ROLE = "host"
SEED_ROLE = "seed"
#: Group order in the optimizer: index 0 is the host group, index 1 the seed group.
ROLES = (HOST_ROLE, SEED_ROLE)

#: Version of the layout returned by ``state_dict``.
STATE_FORMAT = 1

TrialParameters = Callable[[nn.Module], set[str]]
#: role -> {FQN: parameter}, in the model's parameter order.
Scan = dict[str, dict[str, nn.Parameter]]
#: role -> the distinct (dtype, device, rank) of its parameters.
Kinds = dict[str, list[tuple[torch.dtype, torch.device, int]]]


def resolve_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` class called ``name``; ``ConfigError`` if it cannot serve here."""
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"optimizer.name: {name!r} is not a torch.optim optimizer")
    if cls is torch.optim.Optimizer or cls is torch.optim.LBFGS:
        # LBFGS needs a closure in step() and refuses more than one param group.
        raise ConfigError(f"optimizer.name: {name} cannot train a growing model here")
    return cls


class DynamicOptimizerManager:
    """Owns the optimizer, its manifest, rebuilds and the LR schedule of a growing model.

    Call ``after_optimizer_step()`` after each ``optimizer.step()`` and
    ``end_epoch(validation_loss)`` once per epoch; call ``rebuild_optimizer()`` whenever
    the set of trainable parameters or their roles changed (graft, cull, fossilize) and
    ``check_manifest()`` whenever you want proof that nothing was missed.  A config the
    optimizer would refuse, even one torch checks only at the first step, is a
    ``ConfigError`` at construction.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer_config: OptimizerConfig,
        scheduler_config: SchedulerConfig | None = None,
        *,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        trial_parameters: TrialParameters | None = None,
    ) -> None:
        self.model = model
        self.config = optimizer_config
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self._trial_parameters = trial_parameters or seed_parameter_names
        self._optimizer_class = resolve_optimizer_class(optimizer_config.name)
        self._constructor_args = inspect.signature(self._optimizer_class).parameters.keys()
        reserved = {"params", "lr"} & optimizer_config.kwargs.keys()
        if reserved:
            raise ConfigError(
                f"optimizer.kwargs: {', '.join(sorted(reserved))} is set by the manager "
                "(use optimizer.lr and optimizer.seed_lr_multiplier)"
            )
        scan = self._scan()
        self._validate_kwargs(scan)
        self._optimizer = self._build(
            {role: list(params.values()) for role, params in scan.items()},
            optimizer_config.kwargs,
        )
        self._record(scan)
        #: Optimizer steps taken so far (counts ``after_optimizer_step`` calls).
        self._steps = 0
        self._warmup = SeedWarmup(optimizer_config.seed_warmup_steps)
        if scan[SEED_ROLE]:
            self._warmup.restart(self._steps)
        self.scheduler = build_scheduler(
            self._optimizer,
            self.scheduler_config,
            seed_lr_multiplier=optimizer_config.seed_lr_multiplier,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
        )
        self._scheduler_steps_per_batch = (
            self.scheduler is not None
            and self.scheduler_config.interval == "step"
            and not is_plateau(self.scheduler)
        )
        # The seed group's LR as the scheduler alone would have it (see tolaria.schedules).
        self._seed_scheduled_lr = self._seed_group["lr"]
        self._apply_warmup()

    # -- the optimizer and its manifest -------------------------------------------------

    def get_optimizer(self) -> torch.optim.Optimizer:
        """The one optimizer of the run; rebuilds mutate it, they never replace it."""
        return self._optimizer

    def manifest(self) -> dict[str, str]:
        """FQN -> role (``"host"`` or ``"seed"``) of every parameter the optimizer trains."""
        return dict(self._manifest)

    def rebuild_optimizer(self) -> torch.optim.Optimizer:
        """Make the optimizer train exactly the model's trainable parameters, by role.

        Surviving parameters keep their state objects (no copy); removed ones lose theirs;
        new ones get the optimizer's fresh state.  New seed parameters restart the seed
        warm-up.  Raises ``OptimizerManifestError`` (changing nothing) if the optimizer
        class rejects a new parameter.
        """
        return self._rebuild(self._scan())

    def _rebuild(self, scan: Scan) -> torch.optim.Optimizer:
        held = self._fqn_of.keys()
        joined = {
            role: {name: p for name, p in params.items() if id(p) not in held}
            for role, params in scan.items()
        }
        # Build fresh state before touching anything, so a rejected parameter changes nothing.
        fresh_state = {}
        for group, role in zip(self._optimizer.param_groups, ROLES, strict=True):
            fresh_state.update(self._fresh_state(group, joined[role]))
        wanted = {id(p) for params in scan.values() for p in params.values()}
        state = self._optimizer.state
        for group, role in zip(self._optimizer.param_groups, ROLES, strict=True):
            for p in group["params"]:
                if id(p) not in wanted:
                    state.pop(p, None)
            group["params"] = list(scan[role].values())
        state.update(fresh_state)
        for group in self._optimizer.param_groups:
            _align_fused_momentum(group, state)
        self._record(scan)
        if joined[SEED_ROLE]:
            self._warmup.restart(self._steps)
            self._apply_warmup()
        self._check(scan)
        return self._optimizer

    def check_manifest(self) -> None:
        """Raise ``OptimizerManifestError`` unless the optimizer holds exactly the model's
        trainable parameters, each in the group of its role.  Cheap: one scan, sets of ids."""
        self._check(self._scan())

    # -- the schedule ---------------------------------------------------------------------

    def after_optimizer_step(self) -> None:
        """Count the step, advance the seed warm-up, step a per-step scheduler. No host sync."""
        self._steps += 1
        if self._scheduler_steps_per_batch:
            self._step_scheduler()
        else:
            self._apply_warmup()

    def end_epoch(self, validation_loss: float) -> None:
        """Step a per-epoch scheduler; ReduceLROnPlateau always steps here, on the loss."""
        if is_plateau(self.scheduler):
            self._step_scheduler(validation_loss)
        elif self.scheduler is not None and self.scheduler_config.interval == "epoch":
            self._step_scheduler()

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, keyed by FQN: tensors plus JSON-able metadata.

        ``state`` maps FQN -> the optimizer's state for that parameter.  Like
        ``torch.optim``, the tensors are the live ones (no copy): clone them to keep a
        snapshot across further steps.  Every other value is JSON-able (Python's ``json``;
        ReduceLROnPlateau's ``best`` may be ``Infinity``).

        An optimizer that missed a graft is refused (``OptimizerManifestError``): a state
        without an entry for a trainable parameter could never be restored.
        """
        self.check_manifest()
        return {
            "format": STATE_FORMAT,
            "optimizer": self.config.name,
            "manifest": dict(self._manifest),
            "param_groups": {
                group["role"]: {k: _jsonable(v) for k, v in group.items() if k != "params"}
                for group in self._optimizer.param_groups
            },
            "state": {self._fqn_of[id(p)]: dict(s) for p, s in self._optimizer.state.items()},
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "counters": {
                "steps": self._steps,
                "warmup_started_at": self._warmup.started_at,
                "seed_scheduled_lr": self._seed_scheduled_lr,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict`` onto the current model, matching parameters by FQN.

        The model's structure must already match the saved one (replay it first): a saved
        name the model lacks, a trainable parameter the save lacks, or a role that differs
        raises ``OptimizerManifestError`` naming them, before anything changes.  Tensors are
        copied, so the caller's snapshot stays valid after further steps.
        """
        saved_format = state_dict.get("format")
        if saved_format != STATE_FORMAT:
            raise OptimizerManifestError(
                f"optimizer state has format {saved_format!r}, expected {STATE_FORMAT}"
            )
        if state_dict["optimizer"] != self.config.name:
            raise OptimizerManifestError(
                f"optimizer state was saved by {state_dict['optimizer']}, "
                f"this run uses {self.config.name}"
            )
        if (state_dict["scheduler"] is None) != (self.scheduler is None):
            raise OptimizerManifestError(
                f"optimizer state {'lacks' if state_dict['scheduler'] is None else 'has'} "
                f"scheduler state, this run configures scheduler {self.scheduler_config.name}"
            )
        scan = self._scan()
        _check_saved_names(state_dict, {n: r for r, ps in scan.items() for n in ps})
        self._rebuild(scan)
        self._optimizer.load_state_dict(self._positional(state_dict))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state_dict["scheduler"])
        counters = state_dict["counters"]
        self._steps = counters["steps"]
        self._warmup.started_at = counters["warmup_started_at"]
        self._seed_scheduled_lr = counters["seed_scheduled_lr"]
        self._apply_warmup()

    # -- internals ------------------------------------------------------------------------

    def _build(
        self, params: dict[str, list[torch.Tensor]], kwargs: dict[str, Any]
    ) -> torch.optim.Optimizer:
        """The configured optimizer over ``params`` by role, one group per role."""
        groups = [
            {"params": params[HOST_ROLE], "role": HOST_ROLE},
            {
                "params": params[SEED_ROLE],
                "role": SEED_ROLE,
                "lr": self.config.lr * self.config.seed_lr_multiplier,
            },
        ]
        return self._optimizer_class(groups, lr=self.config.lr, **kwargs)

    def _validate_kwargs(self, scan: Scan) -> None:
        """Raise ``ConfigError`` now for a config the optimizer would refuse at any point,
        also where torch checks only in ``step()`` (``capturable`` on CPU).

        A trial step rather than a list of known checks: each class checks what it
        checks, in whatever torch version runs.  It trains stand-ins, never the model:
        one-element zero tensors, one per dtype, device and rank of the model's trainable
        parameters (what the classes check: Muon takes 2-D parameters only, fused kernels
        some dtypes and devices), so the trial costs well under a millisecond at any size.
        """
        kinds: Kinds = {
            role: list(dict.fromkeys((p.dtype, p.device, p.ndim) for p in params.values()))
            for role, params in scan.items()
        }
        kwargs = self.config.kwargs
        try:
            trial = self._trial_step(kinds, kwargs)
        except Exception as exc:  # whatever the class raises is its verdict on the config
            raise self._rejection(kinds, exc) from None
        group = trial.param_groups[0]
        if group.get("fused") and group.get("momentum") and group.get("dampening"):
            raise ConfigError(
                f"optimizer.kwargs: fused=True together with dampening={group['dampening']!r} "
                "is refused: fused SGD starts the momentum of a whole group in one step, so a "
                "parameter joining later could not start its own (use foreach=True)"
            )

    def _trial_step(self, kinds: Kinds, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
        """One zero-gradient step of the optimizer built with ``kwargs`` over stand-ins."""
        stand_ins = {
            role: [
                torch.zeros((1,) * ndim, dtype=dtype, device=device, requires_grad=True)
                for dtype, device, ndim in role_kinds
            ]
            for role, role_kinds in kinds.items()
        }
        optimizer = self._build(stand_ins, kwargs)
        # SparseAdam refuses dense gradients; most other classes refuse sparse ones.
        sparse = self._optimizer_class is torch.optim.SparseAdam
        for params in stand_ins.values():
            for p in params:
                p.grad = torch.zeros_like(p).to_sparse() if sparse else torch.zeros_like(p)
        optimizer.step()
        return optimizer

    def _rejection(self, kinds: Kinds, exc: Exception) -> ConfigError:
        """``exc`` as a one-line ``ConfigError`` naming the kwargs to blame: those without
        any one of which the optimizer accepts the config (all of them if none is enough)."""
        name, kwargs = self.config.name, self.config.kwargs
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        if not self._accepts(kinds, {}):
            # Not the kwargs: optimizer.lr, or the parameters themselves (Muon: 2-D only).
            return ConfigError(f"optimizer {name}: {reason}")
        culprits = [
            key
            for key in kwargs
            if self._accepts(kinds, {k: v for k, v in kwargs.items() if k != key})
        ] or list(kwargs)
        named = " together with ".join(f"{key}={kwargs[key]!r}" for key in culprits)
        return ConfigError(f"optimizer.kwargs: {named} is refused by optimizer {name}: {reason}")

    def _accepts(self, kinds: Kinds, kwargs: dict[str, Any]) -> bool:
        try:
            self._trial_step(kinds, kwargs)
        except Exception:  # a refusal, whatever its type
            return False
        return True

    @property
    def _seed_group(self) -> dict[str, Any]:
        return self._optimizer.param_groups[ROLES.index(SEED_ROLE)]

    def _step_scheduler(self, metric: float | None = None) -> None:
        # The scheduler sees the seed group's bare scheduled LR, never the warmed one.
        self._seed_group["lr"] = self._seed_scheduled_lr
        if metric is None:
            self.scheduler.step()
        else:
            self.scheduler.step(metric)
        self._seed_scheduled_lr = self._seed_group["lr"]
        self._apply_warmup()

    def _apply_warmup(self) -> None:
        self._seed_group["lr"] = self._seed_scheduled_lr * self._warmup.factor(self._steps)

    def _scan(self) -> Scan:
        """The model's trainable parameters by role; trial parameters that cannot train
        or do not exist are errors (new capacity must never sit untrained)."""
        every = dict(self.model.named_parameters())
        trial = self._trial_parameters(self.model)
        unknown = sorted(trial - every.keys())
        if unknown:
            raise OptimizerManifestError(
                f"seed parameters not found in the model: {', '.join(unknown)}"
            )
        frozen = sorted(name for name in trial if not every[name].requires_grad)
        if frozen:
            raise OptimizerManifestError(
                f"seed parameters on trial do not require grad and would never train: "
                f"{', '.join(frozen)}"
            )
        scan: Scan = {role: {} for role in ROLES}
        for name, p in every.items():
            if p.requires_grad:
                scan[SEED_ROLE if name in trial else HOST_ROLE][name] = p
        return scan

    def _record(self, scan: Scan) -> None:
        self._manifest = {name: role for role, params in scan.items() for name in params}
        # Ids stay valid: the optimizer's groups hold exactly these parameters alive.
        self._fqn_of = {id(p): name for params in scan.values() for name, p in params.items()}

    def _fresh_state(
        self, group: dict[str, Any], params: dict[str, nn.Parameter]
    ) -> dict[nn.Parameter, dict[str, Any]]:
        """The state the optimizer class gives ``params`` on joining ``group`` (often none).

        A throwaway optimizer with the group's hyperparameters both builds eager state
        (Adagrad) and runs the class's own checks on the new parameters (Muon: 2-D only).
        Those the constructor takes are its arguments too, not only its group's values:
        Adagrad fills its accumulators from the argument ``initial_accumulator_value``."""
        if not params:
            return {}
        hyperparameters = {k: v for k, v in group.items() if k != "params"}
        arguments = {k: v for k, v in hyperparameters.items() if k in self._constructor_args}
        try:
            probe = self._optimizer_class(
                [{"params": list(params.values()), **hyperparameters}], **arguments
            )
        except (TypeError, ValueError) as exc:
            raise OptimizerManifestError(
                f"{self.config.name} cannot train {', '.join(params)}: {exc}"
            ) from None
        return dict(probe.state)

    def _check(self, scan: Scan) -> None:
        held = {
            id(p): group["role"] for group in self._optimizer.param_groups for p in group["params"]
        }
        wanted = {
            id(p): (name, role) for role, params in scan.items() for name, p in params.items()
        }
        untrained = [name for i, (name, _) in wanted.items() if i not in held]
        misplaced = [
            f"{name} (in the {held[i]} group, role {role})"
            for i, (name, role) in wanted.items()
            if i in held and held[i] != role
        ]
        stale = sorted(self._fqn_of[i] for i in held.keys() - wanted.keys())
        if not (untrained or misplaced or stale):
            return
        problems = []
        if untrained:
            problems.append(f"not in the optimizer: {', '.join(untrained)}")
        if misplaced:
            problems.append(f"in the wrong group: {', '.join(misplaced)}")
        if stale:
            problems.append(f"no longer trainable parameters of the model: {', '.join(stale)}")
        raise OptimizerManifestError(
            "optimizer does not match the model (call rebuild_optimizer() after the model "
            "changes): " + "; ".join(problems)
        )

    def _positional(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` in torch's positional layout for the current groups (tensors copied)."""
        saved_state = state_dict["state"]
        positional: dict[str, Any] = {"state": {}, "param_groups": []}
        index = 0
        for group in self._optimizer.param_groups:
            indices = []
            for p in group["params"]:
                name = self._fqn_of[id(p)]
                if name in saved_state:
                    positional["state"][index] = {
                        k: v.clone() if isinstance(v, torch.Tensor) else v
                        for k, v in saved_state[name].items()
                    }
                indices.append(index)
                index += 1
            saved_group = state_dict["param_groups"][group["role"]]
            positional["param_groups"].append(
                {**_restore_types(saved_group, group), "params": indices}
            )
        return positional


def _check_saved_names(state_dict: dict[str, Any], current: dict[str, str]) -> None:
    saved: dict[str, str] = state_dict["manifest"]
    unknown = sorted((saved.keys() | state_dict["state"].keys()) - current.keys())
    missing = sorted(current.keys() - saved.keys())
    misplaced = sorted(
        f"{name} (saved as {saved[name]}, now {current[name]})"
        for name in saved.keys() & current.keys()
        if saved[name] != current[name]
    )
    problems = []
    if unknown:
        problems.append(f"unknown parameter(s) {', '.join(unknown)}")
    if missing:
        problems.append(f"no saved entry for trainable parameter(s) {', '.join(missing)}")
    if misplaced:
        problems.append(f"role changed for {', '.join(misplaced)}")
    if problems:
        raise OptimizerManifestError(
            "optimizer state does not fit the model (replay its structure first): "
            + "; ".join(problems)
        )


def _align_fused_momentum(group: dict[str, Any], state: dict[torch.Tensor, dict]) -> None:
    """Give every parameter of a fused SGD group a momentum buffer once any has one.

    SGD makes a parameter's buffer in its first step (buffer = gradient), but its fused
    kernel takes that first step for the whole group at once: a group whose members hold
    buffers crashes on one that does not (a graft joining, a seed fossilizing into the host
    group).  A zero buffer gives it the same update, 0 * momentum + gradient, because fused
    SGD with dampening is refused at construction.
    """
    if not group.get("fused"):
        return
    lacking = [p for p in group["params"] if "momentum_buffer" not in state.get(p, ())]
    if len(lacking) < len(group["params"]):
        for p in lacking:
            state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _restore_types(saved: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """Saved hyperparameters with JSON lists turned back into the tuples the group uses."""
    return {
        k: tuple(v) if isinstance(live.get(k), tuple) and isinstance(v, list) else v
        for k, v in saved.items()
    }
