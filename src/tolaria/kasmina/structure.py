"""The grown structure as plain JSON, counterfactual ablation, and the seed/host boundary.

``export_structure`` records, per seed, everything that shapes the module tree or the
forward (state, blueprint name and kwargs, alpha, chunk shape, counters, history).
``replay_structure`` makes an injected host match such a record *in place*, reusing a
seed's blueprint module when it already holds the recorded one, so that afterwards
``model.load_state_dict`` sees exactly the recorded parameter names (design: structure
before weights).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from tolaria.contracts import SeedState
from tolaria.errors import BlueprintError, CheckpointError
from tolaria.kasmina.layer import KasminaLayer, find_seeds
from tolaria.kasmina.seed import KasminaSeed

STRUCTURE_VERSION = 1


def export_structure(model: nn.Module) -> dict[str, Any]:
    """``{"version": 1, "seeds": [record, ...]}`` in ``find_seeds`` order; JSON-able."""
    return {
        "version": STRUCTURE_VERSION,
        "seeds": [
            {
                "seed_id": seed.seed_id,
                "state": seed.state.value,
                "alpha": seed.alpha,
                "blueprint": seed.blueprint_name,
                "blueprint_kwargs": dict(seed.blueprint_kwargs),
                "chunk_shape": None if seed.chunk_shape is None else list(seed.chunk_shape),
                "input_shape": None if seed.input_shape is None else list(seed.input_shape),
                "epochs_in_state": seed.epochs_in_state,
                "pull": seed.pull,
                "clock": seed.clock,
                "history": [record.to_dict() for record in seed.history],
            }
            for seed in find_seeds(model)
        ],
    }


def replay_structure(model: nn.Module, structure: dict[str, Any]) -> None:
    """Make every seed of ``model`` match ``structure``, mutating the seeds in place.

    All blueprints are built before any seed changes, so a structure that does not fit
    (other seed ids, other chunk shapes, a blueprint that fails) raises ``CheckpointError``
    and leaves the model as it was.
    """
    try:
        if structure["version"] != STRUCTURE_VERSION:
            raise CheckpointError(
                f"structure manifest version {structure['version']!r} is not "
                f"{STRUCTURE_VERSION}; written by another Tolaria version"
            )
        records = {record["seed_id"]: record for record in structure["seeds"]}
        seeds = {seed.seed_id: seed for seed in find_seeds(model)}
        if records.keys() != seeds.keys():
            raise CheckpointError(
                "structure manifest does not fit this host: seeds only in the manifest "
                f"{sorted(records.keys() - seeds.keys())}, only in the host "
                f"{sorted(seeds.keys() - records.keys())} (same kasmina config?)"
            )
        plans = [_plan(seeds[seed_id], record) for seed_id, record in records.items()]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"structure manifest is malformed: {exc!r}") from None
    except BlueprintError as exc:
        raise CheckpointError(f"structure manifest cannot be replayed: {exc}") from None
    for seed, record, blueprint in plans:
        seed.restore(record, blueprint)


def _plan(seed: KasminaSeed, record: dict[str, Any]) -> tuple[KasminaSeed, dict, nn.Module | None]:
    shape = None if record["chunk_shape"] is None else tuple(record["chunk_shape"])
    if seed.chunk_shape is not None and shape is not None and seed.chunk_shape != shape:
        raise CheckpointError(
            f"seed {seed.seed_id}: manifest chunk shape {shape}, host's {seed.chunk_shape}"
        )
    if seed.chunk_shape is None:
        seed.chunk_shape = shape  # the shape a forward would record; needed to build
    if seed.input_shape is None and record.get("input_shape") is not None:  # absent: older
        seed.input_shape = tuple(record["input_shape"])
    if not SeedState(record["state"]).holds_blueprint:
        return seed, record, None
    name, kwargs = record["blueprint"], record["blueprint_kwargs"]
    held = (seed.blueprint_name, seed.blueprint_kwargs)
    if seed.blueprint is not None and held == (name, kwargs):
        return seed, record, seed.blueprint
    return seed, record, seed.build_blueprint(name, kwargs)


@contextlib.contextmanager
def ablated(model: nn.Module, seed_ids: Iterable[str]) -> Iterator[None]:
    """Within the block the named seeds output their chunk unchanged (alpha forced to 0).

    For counterfactual validation: seed states, alphas and counters are restored on exit,
    and telemetry of every layer is paused so the extra pass never counts as training.
    """
    seeds = {seed.seed_id: seed for seed in find_seeds(model)}
    wanted = list(seed_ids)
    unknown = [seed_id for seed_id in wanted if seed_id not in seeds]
    if unknown:
        raise KeyError(f"ablated: no seeds {unknown} in this model")
    chosen = [seeds[seed_id] for seed_id in wanted]
    layers = [m for m in model.modules() if isinstance(m, KasminaLayer)]
    saved_seeds = [(seed, seed.alpha, seed.ablated) for seed in chosen]
    saved_layers = [(layer, layer.paused) for layer in layers]
    try:
        for seed in chosen:
            seed.alpha, seed.ablated = 0.0, True
        for layer in layers:
            layer.paused = True
        yield
    finally:
        for seed, alpha, was_ablated in saved_seeds:
            seed.alpha, seed.ablated = alpha, was_ablated
        for layer, paused in saved_layers:
            layer.paused = paused


def seed_parameter_names(model: nn.Module) -> set[str]:
    """FQNs of parameters owned by seeds on trial (GERMINATED..PROBATIONARY).

    A FOSSILIZED seed's parameters are host parameters and are not included.
    """
    return {
        param_name
        for name, module in model.named_modules()
        if isinstance(module, KasminaSeed) and module.state.is_active
        for param_name, _ in module.named_parameters(prefix=name)
    }
