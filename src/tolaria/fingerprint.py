"""What exact resume depends on, recorded in every checkpoint and checked on restore.

A resumed run reproduces the uninterrupted one only if it trains the same model on the
same data with the same optimizer, growth settings and seed.  ``RunFingerprint`` is a
snapshot component: its state is that record, and loading a state that differs from the
live run's raises :class:`~tolaria.errors.RunMismatch` naming what changed -- a
changed dataset of the same shape would otherwise resume silently into another result.

It also makes a checkpoint self-describing: the model and Kasmina sections, the input shape
and the classes are what :func:`tolaria.inference.load_model` rebuilds the host from, and the
architecture digest tells it whether the rebuilt host is the one the run trained.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from tolaria.config import TolariaConfig
from tolaria.data import DataBundle
from tolaria.errors import RunMismatch

#: Items hashed from a dataset that is not held in tensors (reading all could take minutes).
SAMPLED_ITEMS = 64

#: Config sections whose every field exact resume depends on (the task's loss trains, its
#: metrics and monitor decide).
EXACT_SECTIONS = ("data", "model", "task", "optimizer", "scheduler", "kasmina", "tamiyo")
#: Fields of those sections that do not change a single number of the run.
INERT_FIELDS = {"data": ("cache_dir", "num_workers")}


def dataset_digest(dataset: Dataset | None) -> str:
    """SHA-256 of a dataset's content: every tensor of an in-memory dataset; for any other
    dataset its length and ``SAMPLED_ITEMS`` items spread over it."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous()
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
        elif isinstance(value, list | tuple):
            for item in value:
                feed(item)
        else:
            digest.update(repr(value).encode())

    def walk(ds: Dataset | None) -> None:
        if ds is None:
            digest.update(b"none")
        elif isinstance(ds, TensorDataset):
            feed(ds.tensors)
        elif isinstance(ds, Subset):
            feed(list(ds.indices))
            walk(ds.dataset)
        else:
            n = len(ds)  # type: ignore[arg-type]
            digest.update(str(n).encode())
            for i in range(0, n, max(n // SAMPLED_ITEMS, 1))[:SAMPLED_ITEMS]:
                feed(ds[i])

    walk(dataset)
    return digest.hexdigest()


def architecture_digest(model: nn.Module) -> str:
    """The model's class and every parameter and buffer by name, shape and dtype."""
    entries = [type(model).__qualname__]
    entries += [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in model.state_dict().items()]
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


class RunFingerprint:
    """The run's identity as a snapshot component (see the module docstring)."""

    state_is_private = True  # a new dict of strings on every call

    def __init__(self, config: TolariaConfig, data: DataBundle, model: nn.Module) -> None:
        self.values: dict[str, str] = {
            "run.seed": str(config.run.seed),
            **_settings(config),
            "data content": "/".join(dataset_digest(d) for d in (data.train, data.val, data.test)),
            "input shape": json.dumps(list(data.input_shape)),
            "classes": json.dumps(data.num_classes),
            "model architecture": architecture_digest(model),
        }

    def state_dict(self) -> dict[str, str]:
        return dict(self.values)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # A checkpoint written before a field existed ran as its default: the defaults are
        # what Tolaria did before the field was added (the task's are classification's).
        state = {**_settings(TolariaConfig()), **state}
        changed = sorted(k for k in self.values.keys() | state.keys()
                         if state.get(k) != self.values.get(k))
        if changed:
            shown = ", ".join(_describe(k, state.get(k), self.values.get(k)) for k in changed[:4])
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            raise RunMismatch(
                f"this run differs from the one that wrote the checkpoint in {shown}{more}; "
                "resuming would not reproduce it (start a new run, or resume --set only the "
                "fields that are safe to change)"
            )


def _settings(config: TolariaConfig) -> dict[str, str]:
    sections = config.model_dump(mode="json")
    return {
        f"{name}.{key}": json.dumps(value, sort_keys=True)
        for name in EXACT_SECTIONS
        for key, value in sections[name].items()
        if key not in INERT_FIELDS.get(name, ())
    }


def _describe(key: str, saved: str | None, live: str | None) -> str:
    if key in ("data content", "model architecture"):
        return key
    return f"{key} ({saved} -> {live})"
