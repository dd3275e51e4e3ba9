"""One strict configuration tree for a run (design §3.3, §5.1).

``TolariaConfig`` holds every section, and its defaults are the built-in default job:
MNIST-1D, a small MLP host with Kasmina seeds, Tamiyo in charge.  A config file or
``--set`` only changes the fields it names.  ``load_config`` reads YAML, applies
``--set a.b=c`` overrides and validates.  Any mistake -- an unknown key, a wrong
type, a missing file -- becomes one ``ConfigError`` naming the dotted field path and
the file, never a traceback.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tolaria.errors import ConfigError


class Section(BaseModel):
    """Unknown keys are errors: a typo must never silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    #: Keys a section no longer has, with the value they held by default: a run directory
    #: written before they went carries them, and at that value it loads as if they were
    #: absent; any other value is an unknown key that names its replacement (REPLACED_KEYS).
    retired_defaults: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _drop_retired_defaults(cls, value: Any) -> Any:
        if not isinstance(value, dict) or not cls.retired_defaults:
            return value
        return {k: v for k, v in value.items() if not (
            k in cls.retired_defaults and type(v) is type(cls.retired_defaults[k])
            and v == cls.retired_defaults[k])}


class CallbackConfig(Section):
    """A user callback: ``module:Class`` built with ``kwargs`` (see ``tolaria.events``)."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_reference(cls, value: Any) -> Any:
        # The short form: a bare "module:Class" string.
        return {"name": value} if isinstance(value, str) else value


class MLflowConfig(Section):
    """MLflow as a logger (``pip install 'tolaria[mlflow]'``): the resolved config as params,
    every epoch's metrics at step = epoch, the summary and the status at the end.  A resume
    continues the same MLflow run (its id is kept in ``<run_dir>/mlflow.json``)."""

    enabled: bool = False
    #: Where runs are tracked: ``file:<dir>`` (a local store, no server; Tolaria opts in to
    #: MLflow's file store, which MLflow 3 otherwise refuses), ``http://host:5000``, ...
    #: null: MLflow's own choice (``MLFLOW_TRACKING_URI``, else its default database, which
    #: needs the full ``mlflow`` package).
    tracking_uri: str | None = None
    #: The MLflow experiment (made if missing); null: ``run.name``.
    experiment: str | None = None


class EarlyStoppingConfig(Section):
    """Stop a run whose ``checkpoint.monitor`` has stopped improving (``tolaria.selection``)."""

    #: Kept epochs in a row without an improvement of more than ``min_delta`` on the best
    #: value so far that end the run.
    patience: int = Field(5, ge=1)
    #: How much better than the best so far a value must be to count as an improvement.
    min_delta: float = Field(0.0, ge=0.0)
    #: Stop even while a seed is on trial.  Off, a run waits for its trials to end: a graft
    #: that is still blending may be what improves the monitor next.
    during_trials: bool = False


class RunConfig(Section):
    # ``amp: false`` (off, as run.precision's default is); ``amp: true`` was bf16 autocast.
    retired_defaults: ClassVar[dict[str, Any]] = {"amp": False}

    #: Names the run directory (``<runs_root>/<name>-<time>``); a number is a name too.
    name: str = "mnist1d-mlp"
    #: Seeds Python, NumPy and torch, the train/val split and every epoch's data order.
    seed: int = 0
    #: Epochs to train (``tolaria resume --set run.epochs=N`` continues to N).
    epochs: int = Field(30, ge=1)
    #: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` (the N-th
    #: visible GPU); a CUDA device this machine lacks is refused when the trainer is built.
    device: str = "auto"
    #: CPU threads for torch ops (0: torch's default).  Small models like the default host
    #: train fastest on one thread: extra threads only add synchronisation, and stall badly
    #: on a busy machine.
    num_threads: int = Field(1, ge=0)
    #: Arithmetic of the forward pass (``tolaria.stepping``): ``fp32``; ``bf16``, autocast to
    #: bfloat16 on CPU or CUDA; ``fp16``, autocast to float16 with a gradient scaler, on
    #: CUDA only (CPU kernels are built for bfloat16).  Weights, optimizer state and
    #: checkpoints stay float32 in every case.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: Run directories go to ``<runs_root>/<name>-<time>`` unless ``--run-dir`` is given.
    runs_root: str = "runs"
    #: Live display on stderr: bars in a terminal, one plain line per epoch anywhere else
    #: (a pipe, a CI log).  false: only seed transitions, rollbacks and failed grafts.
    progress: bool = True
    #: TensorBoard scalars in ``<run_dir>/tensorboard``.
    tensorboard: bool = True
    #: ``<run_dir>/metrics.csv``: one row per epoch run (a rollback's re-run has attempt 2).
    csv: bool = True
    #: MLflow as a logger, off by default (``{enabled: true, tracking_uri: "file:mlruns"}``).
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    #: Your callbacks, after the built-in ones: ``["module:Class", {name: ..., kwargs: ...}]``.
    callbacks: list[CallbackConfig] = Field(default_factory=list)
    #: Stop early on ``checkpoint.monitor`` (``{patience: 5}``); null runs every epoch.
    early_stopping: EarlyStoppingConfig | None = None
    #: Multi-process runs (``torchrun``, ``tolaria train --nproc N``): seconds a collective
    #: waits for the other ranks.  A rank that died or hangs stops every other one within
    #: this; longer than any one rank's slowest step (the first epoch compiles nothing, so
    #: minutes are plenty).
    distributed_timeout_s: float = Field(300.0, gt=0.0)

    @field_validator("name", mode="before")
    @classmethod
    def _number_as_name(cls, value: Any) -> Any:
        # YAML reads `name: 123` (and `--set run.name=123`) as a number; true/false stay errors.
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        return str(value) if is_number else value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
            raise PydanticCustomError("device", "expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value


class DataConfig(Section):
    #: ``mnist1d``, ``digits``, ``cifar10`` (needs torchvision and internet once),
    #: ``friedman1`` (regression) or a ``module:function`` returning ``(train_dataset,
    #: test_dataset, num_classes)`` (for regression, the number of outputs).
    dataset: str = "mnist1d"
    #: Samples per training batch (validation and test use the same size).
    batch_size: int = Field(64, ge=1)
    #: Fraction of the training split held out for validation; decisions use it,
    #: the test split is only ever reported.
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    #: Where generated (MNIST-1D) and downloaded (CIFAR-10) data is kept between runs.
    cache_dir: str = "~/.cache/tolaria"
    #: DataLoader worker processes (0: load in the training process, best for in-memory data).
    num_workers: int = Field(0, ge=0)
    #: Passed to the dataset: mnist1d's generator arguments, digits' ``test_fraction`` and
    #: ``split_seed``, or your function's keyword arguments.
    kwargs: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(Section):
    #: ``mlp``, ``cnn1d``, ``cnn2d`` or a ``module:function`` taking
    #: ``(input_shape, num_classes, **kwargs)`` and returning an ``nn.Module``.
    host: str = "mlp"
    #: Passed to the host, e.g. ``{hidden: [64, 64]}`` for the mlp (default ``[32, 32]``).
    kwargs: dict[str, Any] = Field(default_factory=dict)


class OptimizerConfig(Section):
    #: Any ``torch.optim`` class name.
    name: str = "Adam"
    #: Gave the seedless default host its best validation accuracy (swept 1e-3..2e-2, 30 epochs).
    lr: float = Field(0.02, gt=0.0)
    #: Passed to the optimizer class, e.g. ``{weight_decay: 1.0e-4}``.
    kwargs: dict[str, Any] = Field(default_factory=dict)
    #: Seed parameters on trial train at ``lr * seed_lr_multiplier``; fossilized seeds train
    #: at ``lr`` with the host.  1: a seed's objective in TRAINING has a finite optimum
    #: (``kasmina.target_delta_ratio``), so the full rate needs no brake, and nothing changes
    #: rate when a seed fossilizes (at 0.1 the 10x step was a loss spike).
    seed_lr_multiplier: float = Field(1.0, gt=0.0)
    #: Optimizer steps over which a new seed's learning rate ramps up from zero; a seed
    #: joining mid-ramp restarts it for the whole seed group (``tolaria.schedules``).
    seed_warmup_steps: int = Field(0, ge=0)
    #: Batches whose gradients add up to one optimizer step: ``data.batch_size * k`` samples
    #: per step at one batch's memory.  The LR schedule and ``global_step`` count steps, and
    #: an epoch's last step takes the batches left over (none carry into the next epoch).
    accumulate_batches: int = Field(1, ge=1)
    #: Before each step, rescale the gradients so their global L2 norm is at most this
    #: (``torch.nn.utils.clip_grad_norm_``, over every parameter trained); null: no clipping.
    clip_grad_norm: float | None = Field(None, gt=0.0)
    #: Before each step, clamp every gradient element into ``[-v, v]``; null: no clamping.
    #: With both set, values are clamped first, then the norm is bounded: both limits hold.
    clip_grad_value: float | None = Field(None, gt=0.0)


class SchedulerConfig(Section):
    #: A ``torch.optim.lr_scheduler`` class name, or null for a constant LR; not one built
    #: from functions or other schedulers (LambdaLR, SequentialLR, ChainedScheduler).
    #: Left-out ``T_max`` (CosineAnnealingLR) and ``total_steps`` (OneCycleLR) come from the run.
    name: str | None = None
    #: Passed to the scheduler class, e.g. ``{step_size: 10, gamma: 0.5}`` for StepLR.
    kwargs: dict[str, Any] = Field(default_factory=dict)
    #: Step the scheduler after every optimizer step or once per epoch
    #: (ReduceLROnPlateau always steps once per epoch, on the validation loss).
    interval: Literal["epoch", "step"] = "epoch"


class CheckpointConfig(Section):
    #: Durable checkpoint to ``<run_dir>/checkpoints`` every N epochs and at the end of
    #: the run (0: only at the end).
    every_epochs: int = Field(5, ge=0)
    #: Durable checkpoints kept on disk.
    keep: int = Field(2, ge=1)
    #: In-memory snapshots kept for fast rollback.
    memory_snapshots: int = Field(3, ge=1)
    #: The epoch metric that picks the best checkpoint and drives early stopping, named as
    #: in metrics.jsonl (``val_accuracy``, ``val_loss``, ``train_loss``); null keeps no best
    #: checkpoint.  The best is kept beside the last ``keep``, whatever its epoch.
    monitor: str | None = "val_accuracy"
    #: Whether a larger or a smaller ``monitor`` is better; ``auto``: smaller for a loss.
    mode: Literal["auto", "max", "min"] = "auto"
    #: The model the summary's test metrics describe: the best checkpoint (when the run keeps
    #: one: it needs a run directory and a monitor) or the last model.
    test_of: Literal["best", "last"] = "best"


class KasminaConfig(Section):
    #: Host modules whose output gets seeds, by fully qualified name or glob (``fnmatch``).
    #: MNIST-1D samples are 40-step signals: a seed on the flattened input can graft
    #: shift-equivariant filters (``signal_conv1d``), which a dense host cannot learn from
    #: 3,200 examples.  ``["flatten", "hidden.*"]`` grows the hidden layers too (``widen``:
    #: +5 points with seeds on ``hidden.*`` alone) but did not beat the input alone on the
    #: default job (docs/growth-sweep.md).  The CNN hosts have no ``flatten`` module: give
    #: them ``["hidden.*"]``, which every built-in host has.
    layers: list[str] = Field(default_factory=lambda: ["flatten"])
    #: Each instrumented output is split into this many chunks along dim 1, one seed each;
    #: 1 keeps the whole signal in one seed.
    chunks: int = Field(1, ge=1)
    #: Seeds measure their chunks' health (dead and saturated units, gradient norm), which
    #: is where Tamiyo grows; off, every location looks equally healthy.
    telemetry: bool = True
    #: Telemetry samples every N-th training batch of an epoch (the first always): the
    #: epoch's statistics are estimated from those batches.  1 measures every batch, at
    #: ~1.2x the epoch time of a small MLP on CPU; 16 keeps dormant seeds near 1.02x.
    telemetry_interval: int = Field(16, ge=1)
    #: A magnitude at or above this counts as saturated in telemetry.
    saturation_threshold: float = Field(3.0, gt=0.0)
    #: While TRAINING a seed learns the functional-gradient target ``d* = -c g``: ``g`` the
    #: loss gradient at its chunk, ``c`` chosen so that ``rms(d*)`` is this fraction of the
    #: chunk's RMS (``KasminaSeed``).  The host's outputs and gradients stay exactly its own.
    target_delta_ratio: float = Field(0.5, gt=0.0)
    #: Epochs over which a seed's alpha ramps from 0 to 1 while BLENDING.
    blend_epochs: int = Field(3, ge=1)
    #: The shape of that ramp.
    blend_schedule: Literal["linear", "cosine"] = "linear"
    #: Epochs a culled seed waits before it is DORMANT (and eligible) again.
    embargo_epochs: int = Field(3, ge=0)


class TamiyoConfig(Section):
    """The heuristic policy's knobs.  The growth and trial thresholds were tuned on the
    MNIST-1D MLP with seeds on ``hidden.*`` (30 epochs): grow as soon as learning slows, many
    seeds at once, short trials -- a seed grafted late has too few epochs left to pay for
    itself.  Every threshold is relative to the run's own scale (the plateau to its best
    loss, the budget to its host, the gains to its validation measures), and the defaults
    were checked on three tasks: MNIST-1D with seeds on the input or the hidden layers, and
    digits with a CNN host (``benchmarks/bench_growth``, docs/growth-sweep.md)."""

    # The absolute plateau's default (0.05 of loss): close to the relative one's on a loss
    # near 1, where the default job's lies.
    retired_defaults: ClassVar[dict[str, Any]] = {"plateau_min_delta": 0.05}

    #: ``heuristic``, ``learned`` (the academy's network: ACADEMY.md §1) or ``module:Class``.
    policy: str = "heuristic"
    #: The learned policy's version (``v3``); None: the academy's champion.
    policy_version: str | None = Field(None, pattern=r"^v\d+$")
    #: The learned policy samples from ``softmax(scores / temperature)``: exploration, and a
    #: propensity for the replay buffer.  0: greedy (evaluation).  Scores are reward
    #: estimates (a good graft scores ~0.1), so small values already explore.
    temperature: float = Field(0.02, ge=0.0)
    #: Epochs without ``plateau_min_improvement`` in validation loss = plateau.
    plateau_patience: int = Field(1, ge=1)
    #: Validation-loss improvement that counts as progress, as a fraction of the best loss so
    #: far (relative, as ReduceLROnPlateau's ``threshold_mode="rel"``): the same test on a
    #: task whose loss is 0.3 as on one whose loss is 2.
    plateau_min_improvement: float = Field(0.05, ge=0.0)
    #: No germination before this epoch, however flat the loss.
    min_epochs_before_growth: int = Field(0, ge=0)
    #: Seeds grafted at most per epoch (within ``max_active_seeds``).
    max_germinations_per_epoch: int = Field(4, ge=1)
    #: Blueprints the policy may graft, in order of preference.  A list is offered at every
    #: seeded layer; a mapping ``{glob: [blueprint, ...]}`` offers each seeded layer the list
    #: of the first glob (``fnmatch``, as in ``kasmina.layers``) matching its name; each
    #: seeded layer must then have a glob, and each blueprint fit where it is placed.  The
    #: default: shift-equivariant filters on a flat input read as a signal (MNIST-1D), new
    #: units (``widen``) everywhere else, ``residual_mlp`` if those are culled.
    blueprints: list[str] | dict[str, list[str]] = Field(
        default_factory=lambda: {
            "flatten": ["signal_conv1d", "residual_mlp"],
            "*": ["widen", "residual_mlp"],
        }
    )
    #: Arguments per blueprint, e.g. ``{residual_mlp: {hidden: 16}}``.
    blueprint_kwargs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: Grafted parameters allowed, as a fraction of the host's initial parameters.  On the
    #: default host (2,698) 4.0 leaves room for the conv (353) and a residual_mlp fallback
    #: (6,520), or for ``widen`` on both hidden layers (8,896).
    param_budget_fraction: float = Field(4.0, gt=0.0)
    #: Seeds on trial (germinated to probationary) at any one time.
    max_active_seeds: int = Field(8, ge=1)
    #: Where to grow: unhealthiness = w_dead * dead_fraction + w_saturated *
    #: saturated_fraction + w_gradient * grad_norm / (largest grad_norm among candidates).
    health_weight_dead: float = Field(1.0, ge=0.0)
    #: ``w_saturated`` of that sum.
    health_weight_saturated: float = Field(1.0, ge=0.0)
    #: ``w_gradient`` of that sum.
    health_weight_gradient: float = Field(1.0, ge=0.0)
    #: Epochs a seed trains in isolation (host output unchanged) before it may blend.
    min_training_epochs: int = Field(2, ge=1)
    #: A seed whose delta grew past this multiple of its layer's RMS while TRAINING is culled
    #: instead of blended: a safety net, as the TRAINING target holds a delta near
    #: ``kasmina.target_delta_ratio``.  Without that target, grafts that wrecked the default
    #: job's host measured 2.6-50.
    max_delta_ratio: float = Field(2.0, gt=0.0)
    #: Epochs a fully blended seed is on probation before it is judged.
    probation_epochs: int = Field(1, ge=1)
    #: Validation-score gain (seed vs. its alpha forced to 0) needed to fossilize: accuracy
    #: by default, the task's monitor (higher is better) in general.
    fossilize_min_gain: float = 0.0
    #: Validation-loss reduction (seed vs. its alpha forced to 0) needed to fossilize.
    fossilize_min_loss_gain: float = 1e-3
    #: Extra score subtracted from a (location, blueprint) pair each time it is culled.
    cull_penalty: float = Field(1.0, ge=0.0)
    #: Divergence from any epoch, the first included: a training or validation loss above
    #: this multiple of the chance level, the loss of an output that knows nothing (a uniform
    #: guess, ``ln(classes)`` for cross-entropy; regression: the training targets' mean).
    chance_loss_factor: float = Field(3.0, gt=1.0)
    #: Divergence: loss above ``divergence_factor`` x the best of the last
    #: ``divergence_window`` epochs, for ``divergence_epochs`` consecutive epochs.
    divergence_factor: float = Field(3.0, gt=1.0)
    #: Consecutive epochs above that line that make a divergence.
    divergence_epochs: int = Field(1, ge=1)
    #: Epochs whose best loss is the divergence reference.
    divergence_window: int = Field(5, ge=1)
    #: Losses below this are "fitted": the divergence reference never goes lower.
    divergence_loss_floor: float = Field(0.05, ge=0.0)
    #: Collapse: a validation score at or below chance + this (accuracy ``1 / classes``,
    #: R² 0; other monitors have no collapse check).
    collapse_margin: float = Field(0.02, ge=0.0)
    #: Decisions this many epochs before an incident are its suspects (never replayed).
    incident_lookback_epochs: int = Field(3, ge=0)
    #: Same incident this many times ends the run instead of rolling back again.
    max_repeated_failures: int = Field(3, ge=1)
    #: Epochs after a decision at which its outcome is logged.
    outcome_horizon: int = Field(3, ge=1)

    @field_validator("blueprints", mode="before")
    @classmethod
    def _blueprints_shape(cls, value: Any) -> Any:
        # Said once here: the union's own errors would name each of its two branches.
        mapping = isinstance(value, dict)
        lists = list(value.values()) if mapping else [value]
        well_formed = all(isinstance(glob, str) for glob in value) if mapping else True
        well_formed &= all(
            isinstance(names, list | tuple) and all(isinstance(n, str) for n in names)
            for names in lists
        )
        if not well_formed:
            raise PydanticCustomError(  # the braces as context: the template would eat them
                "blueprints", "expected a list of blueprint names or a mapping {mapping}",
                {"mapping": "{layer glob: [blueprint, ...]}"},
            )
        if mapping and not all(lists):
            empty = next(glob for glob, names in value.items() if not names)
            raise PydanticCustomError(
                "blueprints", "glob '{glob}' maps to no blueprints", {"glob": empty}
            )
        return value

    def blueprint_glob(self, module_fqn: str) -> str | None:
        """The glob of a ``blueprints`` mapping that places the seeded layer ``module_fqn``:
        the first that matches it, in mapping order; None if none does or for a list."""
        if isinstance(self.blueprints, list):
            return None
        return next((g for g in self.blueprints if fnmatch.fnmatchcase(module_fqn, g)), None)

    def blueprints_for(self, module_fqn: str) -> list[str]:
        """The blueprints offered, in preference order, to seeds on the layer ``module_fqn``
        ([] where a mapping places it nowhere: ``GraftCatalog.check`` refuses that)."""
        if isinstance(self.blueprints, list):
            return self.blueprints
        glob = self.blueprint_glob(module_fqn)
        return self.blueprints[glob] if glob is not None else []

    def blueprint_names(self) -> list[str]:
        """Every blueprint named anywhere in ``blueprints``, first mention first."""
        lists = self.blueprints.values() if isinstance(self.blueprints, dict) else [self.blueprints]
        return list(dict.fromkeys(name for names in lists for name in names))


#: The academy of runs whose ``academy.dir`` is null, when set.
ACADEMY_VARIABLE = "TOLARIA_ACADEMY"


class GatesConfig(Section):
    """The validation gates a nightly candidate must pass, each strictly (design §6.3,
    ACADEMY.md §4; docs/academy.md says what each measures)."""

    #: Candidate's final validation score over the champion's on the historical tasks
    #: (capped at 1 per task, averaged).
    history_score: float = Field(0.95, ge=0, le=1)
    #: Fraction of held-out decision points whose greedy choice survives hardware swaps and
    #: measurement noise.
    hardware_stability: float = Field(0.97, ge=0, le=1)
    #: Normalised entropy of the candidate's marginal action distribution, wait included.
    diversity_score: float = Field(0.4, ge=0, le=1)


class NightlyConfig(Section):
    """The nightly session: a LoRA adapter on the champion, trained in a sandbox process on
    the replay buffer with an EWC penalty, then gated (``tolaria nightly``, ACADEMY.md §4)."""

    #: LoRA rank and scaling (the update is ``alpha / rank · B·A``) on the scorer's layers.
    rank: int = Field(4, ge=1)
    alpha: float = Field(8.0, gt=0)
    #: Full-batch optimisation steps and their learning rate.
    steps: int = Field(300, ge=1)
    lr: float = Field(5e-3, gt=0)
    #: Weight of the EWC penalty on the adapter's update (0: none).  The Fisher is
    #: normalised to mean 1; against 1, 10 forgot less of the history's choices and
    #: generalised better, and an adapter on a workload's own replay passed every gate while
    #: one on corrupted rewards did not (docs/academy.md, "Nightly learning").
    ewc: float = Field(10.0, ge=0)
    #: Importance weights ``1/propensity`` are clipped at this.
    importance_clip: float = Field(10.0, ge=1)
    #: Held-out share of the new decision points (the stability and diversity gates' data).
    held_out: float = Field(0.2, gt=0, lt=1)
    #: Historical tasks the history gate continues (newest first), and for how many epochs.
    history_tasks: int = Field(3, ge=1)
    history_epochs: int = Field(8, ge=1)
    #: Fewer settled recent decision points than this (held-out ones aside): nothing to
    #: learn, and the session stops before training.
    min_points: int = Field(20, ge=1)
    #: Relative measurement noise of the hardware-stability gate's perturbations.
    noise: float = Field(0.01, ge=0)
    #: The sandbox process's address-space cap (GiB) and wall-clock budget (seconds): the
    #: session's allotted time.
    memory_gib: float = Field(4.0, gt=0)
    budget_s: float = Field(1800.0, gt=0)
    gates: GatesConfig = Field(default_factory=GatesConfig)


class AutoRevertConfig(Section):
    """Design §6.4 ``Emergency_Rollback -> Policy_vN``: a run whose trouble a newly deployed
    version caused reverts the champion (docs/academy.md, "Auto-revert")."""

    #: Runs of ``tamiyo.policy: learned`` revert the champion they run when it fails them
    #: (only a version with a parent; never from a run that pins ``tamiyo.policy_version``).
    enabled: bool = True
    #: Revert also when the version's incidents per run exceed its parent's by this much.
    incident_margin: float = Field(0.5, ge=0)
    #: Ended runs each side (the version, its parent) needs in the replay buffer before their
    #: incident rates are compared: below it, a rate is noise and never reverts.
    min_runs: int = Field(3, ge=1)


class MonitorConfig(Section):
    """Alert thresholds of the monitor (design §7 table, ACADEMY.md §5; docs/monitor.md).
    An alert fires when a metric is past its threshold: below the ``*_below`` ones, above
    the others."""

    #: Deploys / nightly attempts.
    policy_success_rate_below: float = Field(0.90, ge=0, le=1)
    #: Mean total-variation distance between candidate and champion on held-out points.
    validation_divergence_above: float = Field(0.1, ge=0, le=1)
    #: Wall time of a session's adapter training, seconds.
    adapter_training_s_above: float = Field(3600.0, gt=0)
    #: Hardware profiles tested / profiles seen in daytime runs.
    hardware_coverage_below: float = Field(0.95, ge=0, le=1)
    #: A failed nightly session or an auto-revert is an alert for this long after it, seconds
    #: (a week: the operator sees it over a weekend; the metrics keep the longer record).
    event_alert_s: float = Field(7 * 86400.0, gt=0)
    #: A running run whose heartbeat is older than this is stalled, seconds.
    heartbeat_stall_s: float = Field(60.0, gt=0)
    #: Rollbacks in one run from which it is alerted on.
    rollbacks_above: int = Field(0, ge=0)


class AcademyConfig(Section):
    """Where the academy keeps what runs teach it (docs/academy.md)."""

    #: The academy directory (replay buffer, policy versions); None: ``$TOLARIA_ACADEMY`` if
    #: set (one academy for every project on a machine, or a test session's own), else
    #: ``<run.runs_root>/academy``.
    dir: str | None = None
    #: Record every run with a run directory in the replay buffer (decision points, outcomes).
    replay: bool = True
    #: The nightly session that trains the next policy version.
    nightly: NightlyConfig = Field(default_factory=NightlyConfig)
    #: Reverting a deployed version that fails at run time.
    auto_revert: AutoRevertConfig = Field(default_factory=AutoRevertConfig)
    #: The monitor's alert thresholds (design §7).
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)


class MetricConfig(Section):
    """A metric: a built-in name or ``module:attr`` (``tolaria.task``), built with ``kwargs``."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    #: What the metric is called in packets, records and the summary (default: the built-in's
    #: name, or the attribute of ``module:attr``, e.g. ``MeanAbsoluteError``).
    label: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_reference(cls, value: Any) -> Any:
        # The short form: a bare name or "module:attr" string.
        return {"name": value} if isinstance(value, str) else value


class TaskConfig(Section):
    """What is learned and how it is scored (``tolaria.task``, docs/tasks.md)."""

    #: ``classification`` (integer class targets, one output per class) or ``regression``
    #: (real targets, one output per target dimension: the data's ``num_classes``).
    kind: Literal["classification", "regression"] = "classification"
    #: Null: the kind's default (``cross_entropy``; ``mse``).  Built-ins: ``cross_entropy``;
    #: ``mse``, ``mae`` (or ``l1``), ``huber``.  Or ``module:attr``: a function
    #: ``(output, target) -> scalar`` or a class (``torch.nn:SmoothL1Loss``) that builds one.
    loss: str | None = None
    #: Passed to the loss: to a class when it is built, to a function at every call.
    loss_kwargs: dict[str, Any] = Field(default_factory=dict)
    #: Null: the kind's defaults (``[accuracy]``; ``[mse, mae, r2]``).  Built-ins: ``accuracy``;
    #: ``mse``, ``mae``, ``rmse``, ``r2``.  Or ``module:attr``: an object or class with
    #: ``update``/``compute``/``reset`` (torchmetrics), or a function ``(output, target) ->
    #: number`` averaged over samples.  An entry may be ``{name, kwargs, label}``.
    metrics: list[MetricConfig] | None = None
    #: The score Tamiyo's evidence and the run's "best" use: a metric's label or ``loss``.
    #: Null: ``accuracy`` (classification), ``r2`` (regression).
    monitor: str | None = None
    #: Is a higher monitor better?  Null: known for the built-ins, ``loss`` and metrics with a
    #: ``higher_is_better`` attribute (torchmetrics); required for your other metrics.
    mode: Literal["max", "min"] | None = None


class TolariaConfig(Section):
    #: The run: its name, seed, length, device, where it is written and what watches it.
    run: RunConfig = Field(default_factory=RunConfig)
    #: The dataset and how it is split and batched.
    data: DataConfig = Field(default_factory=DataConfig)
    #: The host model, before any growth.
    model: ModelConfig = Field(default_factory=ModelConfig)
    #: What is learned and how it is scored: the loss, the metrics, the monitor.
    task: TaskConfig = Field(default_factory=TaskConfig)
    #: The optimizer, and how seeds on trial are trained.
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    #: The learning-rate schedule, kept across optimizer rebuilds.
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    #: Durable checkpoints on disk and in-memory snapshots for rollback.
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    #: Kasmina: where the seeds sit, what they measure, how grafts blend in.
    kasmina: KasminaConfig = Field(default_factory=KasminaConfig)
    #: Tamiyo: the growth policy and its thresholds, and emergency detection.
    tamiyo: TamiyoConfig = Field(default_factory=TamiyoConfig)
    #: The academy: where runs are recorded for the learned controller (docs/academy.md).
    academy: AcademyConfig = Field(default_factory=AcademyConfig)

    def academy_dir(self) -> Path:
        """Where the academy is: ``academy.dir``, ``$TOLARIA_ACADEMY``, or beside the runs."""
        if self.academy.dir is not None:
            return Path(self.academy.dir)
        return Path(os.environ.get(ACADEMY_VARIABLE) or Path(self.run.runs_root) / "academy")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TolariaConfig:
    """Build the run's configuration: the defaults, the file's fields, then overrides.

    Each override is ``dotted.key=value`` with ``value`` parsed as YAML, so
    ``--set run.epochs=5`` is an int and ``--set kasmina.layers=[a,b]`` a list.
    """
    source = str(path) if path is not None else "<built-in default>"
    data = {} if path is None else _read_file(Path(path), source)
    for override in overrides:
        _apply_override(data, override)
    return validate_config(data, source)


#: What ``tolaria resume --set`` may change: how long the run goes on (its epochs, when it
#: stops early), what watches it, how often it is saved, which model its summary tests, its
#: CPU threads (at most the last bits of a sum).  Every other field
#: shapes what a checkpoint continues (data, model, optimizer, schedule, seed, controller):
#: changed, the resumed run would no longer be the run it continues.
RESUMABLE_FIELDS = frozenset({
    "run.epochs",
    "run.progress",
    "run.tensorboard",
    "run.csv",
    "run.mlflow",
    "run.num_threads",
    "run.callbacks",
    "run.early_stopping",
    "run.distributed_timeout_s",
    "checkpoint.every_epochs",
    "checkpoint.keep",
    "checkpoint.test_of",
})


def config_for_resume(
    stored: TolariaConfig, overrides: list[str], source: str, *, checkpointed_epochs: int
) -> TolariaConfig:
    """``stored`` (a run directory's config, read from ``source``) with ``overrides`` applied,
    if each change keeps the resume exact; ``checkpointed_epochs`` is how many epochs the
    newest checkpoint holds."""
    data = stored.model_dump(mode="json")
    for override in overrides:
        _apply_override(data, override)
    config = validate_config(data, source)
    for field in changed_fields(stored, config):
        if field not in RESUMABLE_FIELDS:
            raise ConfigError(
                f"--set {field}: changing {field} would break exact resume; start a new run "
                f"(a resume may change {', '.join(sorted(RESUMABLE_FIELDS))})"
            )
    epochs = config.run.epochs
    if epochs != stored.run.epochs:
        if epochs < checkpointed_epochs:
            raise ConfigError(
                f"--set run.epochs={epochs}: the newest checkpoint already holds "
                f"{checkpointed_epochs} epochs"
            )
        from tolaria.schedules import horizon_arguments  # imports torch: only when asked

        derived = horizon_arguments(config.scheduler)
        if derived:
            raise ConfigError(
                f"--set run.epochs: scheduler {config.scheduler.name} takes {derived[0]} from "
                "run.epochs, so changing it would break exact resume; start a new run"
            )
    return config


def changed_fields(old: TolariaConfig, new: TolariaConfig) -> list[str]:
    """The ``section.field`` names whose values differ between ``old`` and ``new``."""
    changed = []
    for section in type(old).model_fields:
        before, after = getattr(old, section), getattr(new, section)
        changed += [
            f"{section}.{field}"
            for field in type(before).model_fields
            if getattr(before, field) != getattr(after, field)
        ]
    return changed


def _read_file(path: Path, source: str) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = _line_column(raw, exc.start)
        raise ConfigError(
            f"{source}: line {line}, column {column}: not UTF-8 text "
            f"(byte 0x{raw[exc.start]:02x})"
        ) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {_yaml_problem(exc, text)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    return data


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """Where in the file and what, in one line: PyYAML's own message spans several lines and
    names ``<unicode string>``, not the file."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        line, column = mark.line + 1, mark.column + 1
        # The standard tag prefix as a user writes it: !!python/object, not tag:yaml.org,...
        what = (exc.problem or "").replace("tag:yaml.org,2002:", "!!")
        if exc.context:
            at = exc.context_mark
            at = f" at line {at.line + 1}, column {at.column + 1}" if at is not None else ""
            what += f" ({exc.context}{at})"
    elif isinstance(exc, yaml.reader.ReaderError):
        line, column = _line_column(text, exc.position)
        what = f"character #x{exc.character:04x}: {exc.reason}"
    else:
        return f"not valid YAML ({' '.join(str(exc).split())})"
    return f"line {line}, column {column}: not valid YAML: {what}"


def _line_column(text: str | bytes, index: int) -> tuple[int, int]:
    newline = "\n" if isinstance(text, str) else b"\n"
    line_start = text.rfind(newline, 0, index) + 1
    return text.count(newline, 0, index) + 1, index - line_start + 1


def validate_config(data: dict[str, Any], source: str = "<dict>") -> TolariaConfig:
    try:
        return TolariaConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    node[leaf] = value


#: Keys an earlier release took, and what took their place: an old config names its fix.
REPLACED_KEYS = {
    "run.amp": "run.precision (amp: true was bf16 autocast on CUDA: precision: bf16)",
    "tamiyo.plateau_min_delta": "tamiyo.plateau_min_improvement (a fraction of the best "
                                "validation loss, no longer an absolute loss)",
}


def _describe(exc: ValidationError, source: str) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "<top level>"
        if where in REPLACED_KEYS and error["type"] == "extra_forbidden":
            problems.append(f"{where}: replaced by {REPLACED_KEYS[where]}")
        elif error["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key")
        else:
            problems.append(f"{where}: {error['msg']} (got {error.get('input')!r})")
    return f"{source}: " + "; ".join(problems)
