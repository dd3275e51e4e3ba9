"""Training snapshots of historical runs (design §6.2.1, ACADEMY.md §4 step 1).

:func:`create_training_snapshot` rebuilds a daytime run from its resolved config where it
*started* (epoch 0: a run's growth decisions happen across its whole length, so continuing
from its end would test nothing) and returns the design's four keys -- ``model`` (the host's
state dict), ``tamiyo`` (the controller's), ``optimizer`` (the optimizer manager's manifest),
``hardware_env`` (the run's hardware profile) -- plus ``config``, ``task`` and ``run_id``.

:func:`continue_snapshot` is what the history gate runs in the sandbox: the same system again,
with the policy under test choosing (greedy, nothing recorded), for a fixed number of epochs;
it returns the final validation score.  Same config, same seed: the rebuilt system is the
snapshot's, which is checked, not assumed.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tolaria.academy.job_inputs import read_policy
from tolaria.academy.registry import PolicyRegistry
from tolaria.build import build_trainer
from tolaria.config import TolariaConfig, validate_config
from tolaria.errors import CheckpointError, RepeatedFailureError, TolariaError

#: The keys of a snapshot: the design's four, then what the session needs to rebuild it.
SNAPSHOT_KEYS = ("model", "tamiyo", "optimizer", "hardware_env", "config", "task", "run_id")


def create_training_snapshot(
    config: Mapping[str, Any] | TolariaConfig,
    *,
    run_id: str,
    task: str,
    hardware_env: Mapping[str, Any],
) -> dict[str, Any]:
    """The snapshot of run ``run_id`` (its resolved ``config``, the runs table's) at epoch 0.

    A config that cannot be rebuilt here -- a plugin that is not importable, data that
    cannot be loaded -- is one :class:`TolariaError` line naming the run."""
    resolved = _resolved(config, run_id)
    trainer = _rebuild(resolved, run_id)
    return {
        "model": _detached(trainer.model.state_dict()),
        "tamiyo": trainer.tamiyo.state_dict(),
        "optimizer": trainer.optimizer_manager.manifest(),
        "hardware_env": dict(hardware_env),
        "config": resolved.model_dump(mode="json"),
        "task": task,
        "run_id": run_id,
    }


def save_snapshot(snapshot: Mapping[str, Any], path: Path) -> Path:
    path = Path(path)
    missing = [key for key in SNAPSHOT_KEYS if key not in snapshot]
    if missing:
        raise CheckpointError(f"{path}: not a training snapshot (lacks {', '.join(missing)})")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(snapshot), path)
    return path


def load_snapshot(path: Path) -> dict[str, Any]:
    """A snapshot :func:`save_snapshot` wrote; anything else is one line naming the file."""
    try:
        snapshot = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such training snapshot") from None
    except Exception as exc:  # torch.load raises whatever its unpickler met
        raise CheckpointError(f"{path}: not a training snapshot ({exc})") from None
    if not isinstance(snapshot, dict) or any(key not in snapshot for key in SNAPSHOT_KEYS):
        raise CheckpointError(f"{path}: not a training snapshot (lacks the snapshot's keys)")
    return snapshot


def continue_snapshot(
    snapshot: Mapping[str, Any], *, policy_dir: Path, epochs: int, scratch: Path
) -> float:
    """Train the snapshot's system for ``epochs`` epochs with the policy in ``policy_dir``
    (``policy.safetensors`` + ``card.json`` with the scorer's architecture) choosing
    greedily; returns the final validation score (the task's monitor, higher is better).

    The policy reaches the run the way a daytime run's does: registered as a version of a
    scratch academy (under ``scratch``, removed after) and pinned.  Nothing is recorded, no
    run directory is written; deterministic on CPU.  A run the policy drives into repeated
    failure (it stops) scores NaN: it did not finish."""
    run_id = snapshot["run_id"]
    architecture, tensors = read_policy(policy_dir)
    Path(scratch).mkdir(parents=True, exist_ok=True)
    academy = Path(tempfile.mkdtemp(prefix="continue-", dir=scratch))
    try:
        version = PolicyRegistry(academy).register(tensors, {
            "parent": None, "trained_on": {"copied_from": str(policy_dir)},
            "training_s": 0.0, "scorer": architecture,
        })
        config = _resolved(snapshot["config"], run_id).model_copy(deep=True)
        config.run.epochs = epochs
        config.run.progress = False
        config.run.callbacks = []  # the run's observers: they may write outside the scratch
        config.tamiyo.policy = "learned"
        config.tamiyo.policy_version = version.name
        config.tamiyo.temperature = 0.0
        config.academy.dir = str(academy)
        config.academy.replay = False
        trainer = _rebuild(config, run_id)
        _load_matching(trainer, snapshot)
        try:
            trainer.train()
        except RepeatedFailureError:
            return math.nan
    finally:
        shutil.rmtree(academy, ignore_errors=True)
    score = (trainer.last_record or {}).get("val_accuracy")
    return float(score) if score is not None else math.nan


def _resolved(config: Mapping[str, Any] | TolariaConfig, run_id: str) -> TolariaConfig:
    if isinstance(config, TolariaConfig):
        return config
    return validate_config(dict(config), f"run {run_id}'s config")


def _rebuild(config: TolariaConfig, run_id: str):
    """The run's system as ``build_trainer`` assembles it, without a run directory."""
    try:
        return build_trainer(config)
    except TolariaError as exc:
        raise TolariaError(f"run {run_id}: cannot be rebuilt here: {exc}") from None


def _load_matching(trainer: Any, snapshot: Mapping[str, Any]) -> None:
    """Load the snapshot's model and controller state into ``trainer``, rebuilt from the
    snapshot's config: they must be the same (the same config, the same seed), or the
    continuation would test another system.  The policy's own entry is the historical
    run's policy, not the one under test: the rebuilt policy keeps its own."""
    run_id = snapshot["run_id"]
    model = trainer.model.state_dict()
    if model.keys() != snapshot["model"].keys() or any(
        not torch.equal(model[name], snapshot["model"][name]) for name in model
    ):
        raise TolariaError(f"run {run_id}: the rebuilt host's weights differ from the snapshot's")
    tamiyo = trainer.tamiyo.state_dict()
    state = {**snapshot["tamiyo"], "policy": tamiyo["policy"]}
    if _plain(state) != _plain(tamiyo):
        raise TolariaError(f"run {run_id}: the rebuilt controller's state differs from the "
                           "snapshot's")
    if trainer.optimizer_manager.manifest() != snapshot["optimizer"]:
        raise TolariaError(f"run {run_id}: the rebuilt optimizer trains other parameters than "
                           "the snapshot's")
    trainer.model.load_state_dict(snapshot["model"])
    trainer.tamiyo.load_state_dict(state)


def _plain(state: Mapping[str, Any]) -> str:
    return json.dumps(state, sort_keys=True, default=str)


def _detached(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in state.items()}
