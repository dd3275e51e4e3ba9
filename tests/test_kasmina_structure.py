"""The structure manifest: export, replay on a fresh host (or in place), then load weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kasmina_hosts import TinyConv
from tolaria.config import KasminaConfig
from tolaria.contracts import SeedState
from tolaria.errors import CheckpointError
from tolaria.kasmina import export_structure, find_seeds, inject_seeds, replay_structure

CONFIG = KasminaConfig(layers=["stem", "block"], chunks=2, blend_epochs=3, embargo_epochs=5)


def fresh_host(seed: int = 0) -> TinyConv:
    torch.manual_seed(seed)
    model = TinyConv(1)
    inject_seeds(model, CONFIG)
    return model


def grow(model: TinyConv) -> None:
    """Seeds in TRAINING, BLENDING, FOSSILIZED and CULLED, with trained-looking weights."""
    model(torch.randn(2, 1, 6))
    training, blending, fossil, culled = find_seeds(model)
    training.germinate("conv1d_residual", epoch=1, reason="plateau", kernel_size=5)
    training.transition(SeedState.TRAINING, epoch=1, reason="")
    blending.germinate("low_rank", epoch=1, rank=2)
    blending.transition(SeedState.TRAINING, epoch=1, reason="")
    blending.transition(SeedState.BLENDING, epoch=2, reason="")
    blending.on_epoch_end(3)
    fossil.germinate("se_gate", epoch=0)
    for to in (SeedState.TRAINING, SeedState.BLENDING, SeedState.PROBATIONARY):
        fossil.transition(to, epoch=0, reason="")
    fossil.transition(SeedState.FOSSILIZED, epoch=1, reason="gain")
    culled.germinate("residual_mlp", epoch=1)
    culled.transition(SeedState.CULLED, epoch=2, reason="no gain")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))


def test_round_trip_onto_a_fresh_host_gives_equal_outputs():
    grown = fresh_host()
    grow(grown)
    structure = json.loads(json.dumps(export_structure(grown)))  # plain JSON
    replica = fresh_host(seed=123)  # other init: weights must come from the state dict
    replay_structure(replica, structure)  # before any forward: chunk shapes come along
    replica.load_state_dict(grown.state_dict())
    x = torch.randn(4, 1, 6)
    assert torch.equal(replica(x), grown(x))
    assert export_structure(replica) == structure
    for a, b in zip(find_seeds(grown), find_seeds(replica), strict=True):
        assert (a.state, a.alpha, a.blueprint_kwargs) == (b.state, b.alpha, b.blueprint_kwargs)
        assert a.history == b.history and a.epochs_in_state == b.epochs_in_state
    # The replayed lifecycle continues where it left off: the culled seed's embargo.
    culled = find_seeds(replica)[3]
    for epoch in range(3, 8):
        culled.on_epoch_end(epoch)
    assert culled.state is SeedState.DORMANT and culled.history[-1].epoch == 7


def test_replay_in_place_rolls_back_without_replacing_seed_objects():
    model = fresh_host()
    grow(model)
    snapshot = export_structure(model)
    weights = copy.deepcopy(model.state_dict())
    seeds = find_seeds(model)
    kept = seeds[0].blueprint
    x = torch.randn(3, 1, 6)
    before = model(x)

    seeds[0].transition(SeedState.CULLED, epoch=4, reason="later")  # blueprint deleted
    seeds[1].transition(SeedState.PROBATIONARY, epoch=4, reason="later")
    for epoch in range(3, 8):  # embargo over: DORMANT
        seeds[3].on_epoch_end(epoch)
    seeds[3].germinate("low_rank", epoch=9)  # a graft the snapshot never had
    replay_structure(model, snapshot)
    model.load_state_dict(weights)

    assert all(a is b for a, b in zip(find_seeds(model), seeds, strict=True))
    assert seeds[3].blueprint is None and seeds[3].state is SeedState.CULLED
    assert seeds[0].blueprint is not kept, "rebuilt after the cull"
    assert torch.equal(model(x), before)
    assert export_structure(model) == snapshot


def test_replay_keeps_a_held_blueprint_module():
    model = fresh_host()
    grow(model)
    snapshot = export_structure(model)
    blending = find_seeds(model)[1]
    module = blending.blueprint
    blending.transition(SeedState.PROBATIONARY, epoch=5, reason="")
    replay_structure(model, snapshot)
    assert blending.blueprint is module, "an optimizer holding its parameters stays valid"
    assert blending.state is SeedState.BLENDING and blending.alpha == pytest.approx(2 / 3)


def test_a_structure_that_does_not_fit_changes_nothing():
    model = fresh_host()
    grow(model)
    good = export_structure(model)
    before = export_structure(model)

    other_ids = copy.deepcopy(good)
    other_ids["seeds"][0]["seed_id"] = "head.0"
    with pytest.raises(CheckpointError, match=r"only in the manifest \['head.0'\]"):
        replay_structure(model, other_ids)

    bad_blueprint = copy.deepcopy(good)
    bad_blueprint["seeds"][3].update(state="training", blueprint="nope", blueprint_kwargs={})
    bad_blueprint["seeds"][1].update(blueprint_kwargs={"rank": 1})  # would rebuild seed 1
    with pytest.raises(CheckpointError, match="unknown blueprint 'nope'"):
        replay_structure(model, bad_blueprint)

    wrong_shape = copy.deepcopy(good)
    wrong_shape["seeds"][2]["chunk_shape"] = [4, 7]
    with pytest.raises(CheckpointError, match="chunk shape"):
        replay_structure(model, wrong_shape)

    malformed = copy.deepcopy(good)
    del malformed["seeds"][2]["state"]
    with pytest.raises(CheckpointError, match=r"malformed.*state"):
        replay_structure(model, malformed)
    assert export_structure(model) == before
