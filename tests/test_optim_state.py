"""The manager's name-keyed state dict: survives JSON, parameter reordering, and bad input."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from test_optim import Host, Trial, train
from tolaria.config import OptimizerConfig, SchedulerConfig
from tolaria.errors import OptimizerManifestError
from tolaria.optim import DynamicOptimizerManager

OPTIMIZER = OptimizerConfig(name="Adam", lr=0.01, seed_warmup_steps=4, seed_lr_multiplier=0.5)
SCHEDULER = SchedulerConfig(name="StepLR", kwargs={"step_size": 2}, interval="step")


class ReversedHost(Host):
    """The same names as ``Host`` registered in the opposite order, so a positional
    (torch-style) optimizer state dict would hand each parameter another one's state."""

    def __init__(self, optimizer: str) -> None:
        super().__init__(optimizer)
        self._modules = dict(reversed(self._modules.items()))


def grown(cls: type[Host], trial: Trial, config: OptimizerConfig = OPTIMIZER):
    torch.manual_seed(0)
    model = cls(config.name)
    model.head.register_parameter("graft", nn.Parameter(torch.zeros(3)))
    trial.names = {"head.graft"}
    manager = DynamicOptimizerManager(model, config, SCHEDULER, trial_parameters=trial)
    return model, manager


def through_json(state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint does: tensors aside (copied), everything else through JSON text."""
    tensors: dict[str, torch.Tensor] = {}

    def strip(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = value.clone()
            return {"__tensor__": key}
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        return value

    def restore(value: Any) -> Any:
        if isinstance(value, dict):
            if "__tensor__" in value:
                return tensors[value["__tensor__"]]
            return {k: restore(v) for k, v in value.items()}
        return value

    return restore(json.loads(json.dumps(strip(state))))


def test_state_dict_restores_a_reordered_model_bit_for_bit() -> None:
    a, ma = grown(Host, Trial())
    train(a, ma, range(5))  # mid-warm-up would end at step 4; StepLR has stepped twice
    saved = through_json(ma.state_dict())
    b, mb = grown(ReversedHost, Trial())
    assert list(dict(b.named_parameters())) != list(dict(a.named_parameters()))
    b.load_state_dict(a.state_dict())
    mb.load_state_dict(saved)
    assert [g["lr"] for g in mb.get_optimizer().param_groups] == [
        g["lr"] for g in ma.get_optimizer().param_groups
    ]
    train(a, ma, range(5, 10))
    train(b, mb, range(5, 10))
    pb = dict(b.named_parameters())
    for name, pa in a.named_parameters():
        assert torch.equal(pa, pb[name]), name
        sa, sb = ma.get_optimizer().state[pa], mb.get_optimizer().state[pb[name]]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert [g["lr"] for g in mb.get_optimizer().param_groups] == [
        g["lr"] for g in ma.get_optimizer().param_groups
    ]


def test_loading_copies_so_the_snapshot_survives_further_steps() -> None:
    model, manager = grown(Host, Trial())
    train(model, manager, range(2))
    snapshot = through_json(manager.state_dict())
    frozen = {n: {k: v.clone() for k, v in s.items()} for n, s in snapshot["state"].items()}
    manager.load_state_dict(snapshot)
    train(model, manager, range(2, 4))
    for name, values in frozen.items():
        assert all(torch.equal(v, snapshot["state"][name][k]) for k, v in values.items())


def test_state_dict_metadata_is_json_text() -> None:
    model, manager = grown(Host, Trial())
    train(model, manager, range(1))
    state = manager.state_dict()
    meta = {k: v for k, v in state.items() if k != "state"}
    assert json.loads(json.dumps(meta)) == meta
    # Adam creates state lazily: only parameters that had a gradient (the graft had none).
    assert set(state["state"]) == set(manager.manifest()) - {"head.graft"}
    assert state["manifest"] == manager.manifest()


def edit(state: dict[str, Any], where: str, change) -> dict[str, Any]:
    state = {**state, where: dict(state[where])}
    change(state[where])
    return state


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda s: edit(s, "state", lambda d: d.update(ghost=d["head.bias"])),
            r"unknown parameter\(s\) ghost",
        ),
        (
            lambda s: edit(s, "manifest", lambda d: d.update({"embed.ghost": "host"})),
            r"unknown parameter\(s\) embed\.ghost",
        ),
        (
            lambda s: edit(s, "manifest", lambda d: d.pop("head.graft")),
            r"no saved entry for trainable parameter\(s\) head\.graft",
        ),
        (
            lambda s: edit(s, "manifest", lambda d: d.update({"head.graft": "host"})),
            r"role changed for head\.graft \(saved as host, now seed\)",
        ),
        (lambda s: {**s, "optimizer": "SGD"}, "saved by SGD, this run uses Adam"),
        (lambda s: {**s, "scheduler": None}, "lacks scheduler state"),
        (lambda s: {**s, "format": 0}, "format 0"),
    ],
)
def test_a_state_dict_that_does_not_fit_is_refused_and_changes_nothing(mutate, match) -> None:
    model, manager = grown(Host, Trial())
    train(model, manager, range(2))
    state = manager.get_optimizer().state
    before = {p: dict(s) for p, s in state.items()}
    lrs = [g["lr"] for g in manager.get_optimizer().param_groups]
    with pytest.raises(OptimizerManifestError, match=match):
        manager.load_state_dict(mutate(through_json(manager.state_dict())))
    assert before.keys() == state.keys()
    assert all(state[p][k] is v for p, s in before.items() for k, v in s.items())
    assert [g["lr"] for g in manager.get_optimizer().param_groups] == lrs
