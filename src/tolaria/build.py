"""The initialization sequence of design §5, in its strict order.

1. configuration (given)            2. host model with Kasmina seeds injected
3. TamiyoController, every seed registered      4. TolariaTrainer     5. ``train()`` (caller)
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from tolaria.config import TolariaConfig
from tolaria.data import DataBundle, load_data
from tolaria.distributed import RankGroup, launched
from tolaria.errors import ConfigError, TolariaError
from tolaria.hosts import build_host, count_parameters
from tolaria.kasmina import bind_chunks, find_seeds, inject_seeds
from tolaria.plugins import make_callbacks
from tolaria.rundir import RunDirectory
from tolaria.tamiyo import TamiyoController, make_policy
from tolaria.task import Task
from tolaria.trainer import TolariaTrainer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_trainer(
    config: TolariaConfig,
    *,
    run_dir: RunDirectory | Path | None = None,
    model: nn.Module | None = None,
    data: DataBundle | None = None,
    callbacks: Iterable[object] = (),
) -> TolariaTrainer:
    """Assemble a ready-to-train system; pass your own ``model``/``data`` to bypass the config's.

    ``callbacks`` (see :mod:`tolaria.events`) observe the run after the run directory's
    own, and before those ``run.callbacks`` names.  Everything that can be checked is
    checked before a new run directory (given as a path) exists -- data, host, seeds, one
    forward pass on a sample batch, the task's loss and metrics on this model's output and
    this data's targets, every blueprint on every chunk, callbacks, device and optimizer --
    so a mistake in any of them leaves nothing behind.

    Launched by torchrun (``WORLD_SIZE`` set), the process first joins its group
    (``tolaria.distributed``); only rank 0 keeps ``run_dir`` and the ``run.callbacks``
    (``callbacks`` are the caller's, on every rank).
    """
    group = RankGroup.join(config) if launched() else None
    writer = group is None or group.is_writer
    if not writer:
        run_dir = None
    seed_everything(config.run.seed)
    task = Task(config.task)
    data = data if data is not None else load_data(config.data, config.run.seed)
    if model is None:
        model = build_host(config.model, data.input_shape, data.num_classes)
    host_parameters = count_parameters(model)
    if config.kasmina.layers:
        inject_seeds(model, config.kasmina)
    output = _forward_a_sample(model, data, config)
    tamiyo = TamiyoController(
        config.tamiyo,
        config.kasmina,
        chance=task.chance_level(data, output),
        host_parameters=host_parameters,
        epochs_total=config.run.epochs,
        policy=make_policy(
            config.tamiyo,
            seed=config.run.seed,
            academy_dir=config.academy_dir(),
        ),
    )
    for seed in find_seeds(model):
        tamiyo.register_seed(seed)
    tamiyo.check_grafts()
    callbacks = [*callbacks, *(make_callbacks(config.run.callbacks) if writer else [])]
    return TolariaTrainer(
        model, tamiyo, config, data=data, run_dir=run_dir, callbacks=callbacks, task=task,
        group=group,
    )


def _forward_a_sample(model: nn.Module, data: DataBundle, config: TolariaConfig) -> torch.Tensor:
    """The host must accept the data, and its seeds must fit their layers: try it on two
    training samples, on CPU, before anything is written; return the host's output."""
    sample = default_collate([data.train[i] for i in range(min(2, len(data.train)))])[0]
    try:
        return bind_chunks(model, sample)
    except TolariaError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"model.host={config.model.host!r}: a forward pass on a sample batch of shape "
            f"{tuple(sample.shape)} from data.dataset={config.data.dataset!r} failed: {exc!r}"
        ) from exc
