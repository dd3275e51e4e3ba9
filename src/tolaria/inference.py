"""The grown model back out of a run: ``load_model``, and measuring a model as the run does.

A checkpoint describes itself: its ``fingerprint`` component records the run's model and
Kasmina settings, the input shape and the classes, and a digest of the architecture the run
trained.  ``load_model`` rebuilds the host from those alone -- no dataset is loaded, no
``config.yaml`` is needed -- injects the seeds, checks the architecture against the digest,
replays the grown structure and loads the weights (structure before weights, as every
restore does).  Seeds still on trial are dropped (back to DORMANT, their blueprints gone)
or kept at the alpha they had; fossilized grafts are part of the host either way.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tolaria.checkpoint import CheckpointStore, ModelState, Snapshot, load_snapshot
from tolaria.checkpoint_io import MANIFEST_FILE
from tolaria.config import validate_config
from tolaria.contracts import EvalMetrics, SeedState
from tolaria.errors import CheckpointError, ConfigError, NoCheckpoint
from tolaria.fingerprint import architecture_digest
from tolaria.hosts import build_host
from tolaria.kasmina import KasminaSeed, inject_seeds

WHICH = ("best", "last")
TRIALS = ("drop", "keep")


def load_model(
    path: str | Path,
    which: str = "best",
    trials: str = "drop",
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """The grown ``nn.Module`` of a run, in eval mode, on ``map_location``.

    ``path`` is a run directory -- ``which`` picks its best checkpoint or its newest valid
    durable one (``"last"``; a damaged newer one is skipped with a warning) -- or one
    checkpoint directory, loaded as it is.  ``trials``: ``"drop"`` seeds still on trial, or
    ``"keep"`` them at their alpha (the model exactly as the run measured it).
    """
    _check_choice("trials", trials, TRIALS)
    checkpoint, snapshot = open_checkpoint(path, which, on_skip=_warn_skipped)
    model = restore_model(host_of(snapshot, checkpoint), snapshot["model"], trials)
    return model.to(map_location)


def open_checkpoint(
    path: str | Path, which: str = "best", *, on_skip=None
) -> tuple[Path, Snapshot]:
    """The checkpoint directory ``path`` names (see :func:`load_model`) and its verified
    snapshot; ``on_skip(path, reason)`` for each damaged durable checkpoint passed over."""
    _check_choice("which", which, WHICH)
    path = Path(path)
    if (path / MANIFEST_FILE).is_file():
        return path, load_snapshot(path)
    if not ((path / "config.yaml").is_file() or (path / "checkpoints").is_dir()):
        raise ConfigError(f"{path}: neither a run directory nor a checkpoint")
    store = CheckpointStore(path / "checkpoints", keep=1)
    if which == "best":
        best = store.best()
        if best is None:
            raise NoCheckpoint(
                f"{path}: no best checkpoint (a run keeps one when checkpoint.monitor is "
                "set, once an epoch has finished); the last checkpoint may do"
            )
        return best, load_snapshot(best)
    candidates = store.checkpoints()
    if not candidates:
        raise NoCheckpoint(f"{path}: no durable checkpoint yet")
    skipped: list[Path] = []

    def skip(checkpoint: Path, reason: str) -> None:
        skipped.append(checkpoint)
        if on_skip is not None:
            on_skip(checkpoint, reason)

    snapshot = store.load_latest(on_skip=skip)
    return next(c for c in reversed(candidates) if c not in skipped), snapshot


def host_of(snapshot: Snapshot, where: Path) -> nn.Module:
    """A fresh host with its seeds, built from what ``snapshot``'s fingerprint records."""
    try:
        fingerprint = snapshot["fingerprint"]
        sections = {
            section: {key.split(".", 1)[1]: json.loads(value) for key, value in fingerprint.items()
                      if key.startswith(f"{section}.")}
            for section in ("model", "kasmina")
        }
        input_shape = tuple(json.loads(fingerprint["input shape"]))
        classes = json.loads(fingerprint["classes"])
        digest = fingerprint["model architecture"]
    except KeyError as exc:
        raise CheckpointError(
            f"{where}: the checkpoint does not record {exc} (written by an older Tolaria: "
            "its model cannot be rebuilt without its data)"
        ) from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{where}: malformed fingerprint ({exc})") from None
    config = validate_config(sections, f"{where} (the model settings it records)")
    with torch.random.fork_rng(devices=[]):  # building a host must not move the caller's RNG
        model = build_host(config.model, input_shape, classes)
        if config.kasmina.layers:
            inject_seeds(model, config.kasmina)
    if architecture_digest(model) != digest:
        raise CheckpointError(
            f"{where}: model.host={config.model.host!r} with its kwargs builds another "
            "architecture than the run trained (was the run given its own model object?)"
        )
    return model


def restore_model(model: nn.Module, state: dict[str, Any], trials: str = "keep") -> nn.Module:
    """``model`` (a host with the run's seeds) set to the model component ``state``, seeds
    on trial dropped or kept (``trials``), in eval mode."""
    _check_choice("trials", trials, TRIALS)
    if trials == "drop":
        state = _without_trials(model, state)
    ModelState(model).load_state_dict(state)
    return model.eval()


def evaluate_model(trainer: Any, model: nn.Module, loader) -> EvalMetrics:
    """``model`` measured on ``loader`` by ``trainer``'s own evaluation, so that a model out
    of a checkpoint is scored by the very code that scored it during the run."""
    live = trainer.model
    trainer.model = model  # the evaluation reads the trainer's model; put the live one back
    try:
        return trainer.evaluate(loader)[0]
    finally:
        trainer.model = live


def _without_trials(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with every seed on trial DORMANT and its blueprint's weights gone."""
    modules = {seed.seed_id: name for name, seed in model.named_modules()
               if isinstance(seed, KasminaSeed)}
    try:
        seeds, dropped = [], []
        for record in state["structure"]["seeds"]:
            if SeedState(record["state"]).is_active and record["seed_id"] in modules:
                dropped.append(f"{modules[record['seed_id']]}.blueprint.")
                record = {**record, "state": SeedState.DORMANT.value, "alpha": 0.0,
                          "blueprint": None, "blueprint_kwargs": {}}
            seeds.append(record)
        weights = {name: tensor for name, tensor in state["weights"].items()
                   if not name.startswith(tuple(dropped))}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"structure manifest is malformed: {exc!r}") from None
    return {"structure": {**state["structure"], "seeds": seeds}, "weights": weights}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(map(repr, choices))}")


def _warn_skipped(path: Path, reason: str) -> None:
    warnings.warn(f"skipping checkpoint {path}: {reason}", stacklevel=3)
