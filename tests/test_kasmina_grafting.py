"""Grafting: every registered blueprint preserves the host at graft, learns in isolation,
and disappears when culled; bad blueprints are refused and the seed stays DORMANT."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from kasmina_hosts import TinyMLP, grown_pair, host_for, shapes_at
from tolaria.config import KasminaConfig
from tolaria.contracts import SeedState
from tolaria.errors import BlueprintError
from tolaria.kasmina import (
    Blueprint,
    ablated,
    available_blueprints,
    find_seeds,
    get_blueprint,
    inject_seeds,
    register_blueprint,
    seed_parameter_names,
    unregister_blueprint,
)

BUILTINS = [
    "conv1d_residual",
    "conv2d_residual",
    "low_rank",
    "residual_mlp",
    "se_gate",
    "signal_conv1d",
    "widen",
]


def task_loss(output: torch.Tensor) -> torch.Tensor:
    targets = torch.arange(output.shape[0]) % output.shape[1]
    return nn.functional.cross_entropy(output, targets)


def host_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if ".kasmina." not in f".{n}."}


def test_builtins_are_registered():
    assert set(BUILTINS) <= set(available_blueprints())


@pytest.mark.parametrize("name", BUILTINS)
def test_blueprint_graft_training_isolation_and_cull(name):
    kind = host_for(get_blueprint(name))
    plain, model, x, seeds = grown_pair(kind)
    seed = seeds[0]
    reference = model(x)

    seed.germinate(name, epoch=0, reason="test")
    assert seed.state is SeedState.GERMINATED
    blueprint = get_blueprint(name)
    assert seed.param_count() == blueprint.param_cost(*shapes_at(seed, blueprint)) > 0
    assert (model(x) - reference).abs().max() <= 1e-6

    seed.transition(SeedState.TRAINING, epoch=0, reason="test")
    out = model(x)
    assert torch.equal(out, plain(x)), "TRAINING must leave the host's output bit-identical"
    task_loss(out).backward()
    task_loss(plain(x)).backward()
    for n, g in host_grads(model).items():
        assert torch.equal(g, dict(plain.named_parameters())[n].grad), f"host grad {n} changed"
    grads = {n: p.grad for n, p in seed.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())

    # After one step on the seed alone every seed tensor gets gradient (no dead units).
    with torch.no_grad():
        for p in seed.parameters():
            p -= 0.5 * p.grad
    model.zero_grad()
    task_loss(model(x)).backward()
    for n, p in seed.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: {n} gets no gradient"
    assert torch.equal(model(x), plain(x))

    names = seed_parameter_names(model)
    assert names and all(".kasmina.seeds.0.blueprint." in n for n in names)
    seed.transition(SeedState.CULLED, epoch=1, reason="test")
    remaining = {n for n, _ in model.named_parameters()}
    assert not names & remaining
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    assert seed.blueprint is None and seed.param_count() == 0
    assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_blending_ramps_alpha_to_one_then_probation_and_fossil(schedule):
    plain, model, x, seeds = grown_pair("mlp", blend_epochs=4, blend_schedule=schedule)
    seed = seeds[1]
    seed.germinate("residual_mlp", epoch=0)
    seed.transition(SeedState.TRAINING, epoch=0, reason="")
    with torch.no_grad():
        for p in seed.parameters():
            p.add_(torch.randn_like(p))  # as if it had trained
    seed.transition(SeedState.BLENDING, epoch=1, reason="")
    alphas = [seed.alpha]
    for epoch in range(2, 7):
        seed.on_epoch_end(epoch)
        alphas.append(seed.alpha)
    assert alphas[0] > 0.0
    assert all(a < b for a, b in itertools.pairwise(alphas[:4]))
    assert alphas[3:] == [1.0, 1.0, 1.0]
    assert alphas[1] == pytest.approx(0.5)  # 2 of 4 epochs: both ramps are at one half
    assert alphas[0] == pytest.approx(0.25 if schedule == "linear" else (1 - 2**-0.5) / 2)

    # BLENDING output is host + alpha * delta, with the delta's input detached.
    seed.alpha = 0.25
    h = model.hidden[0][1](model.hidden[0][0](x)).detach()
    chunk = h[:, 4:]
    assert torch.allclose(seed(chunk), chunk + 0.25 * seed.blueprint(chunk))
    seed.transition(SeedState.PROBATIONARY, epoch=7, reason="")
    assert seed.alpha == 1.0
    assert not torch.equal(model(x), plain(x))
    assert seed_parameter_names(model)
    assert torch.equal(input_grad(seed), torch.ones(3, 4)), "on trial the input is detached"
    seed.transition(SeedState.FOSSILIZED, epoch=8, reason="")
    assert seed.alpha == 1.0 and seed_parameter_names(model) == set()
    assert not torch.equal(input_grad(seed), torch.ones(3, 4)), "fossilized: no isolation"


def input_grad(seed) -> torch.Tensor:
    """d sum(seed(chunk)) / d chunk: all ones iff no gradient flows through the delta."""
    chunk = torch.randn(3, 4, requires_grad=True)
    seed(chunk).sum().backward()
    return chunk.grad


def test_ablated_forces_host_output_and_restores_everything():
    plain, model, x, seeds = grown_pair("mlp", telemetry_interval=1)
    seed = seeds[0]
    seed.germinate("low_rank", epoch=0)
    for to in (SeedState.TRAINING, SeedState.BLENDING, SeedState.PROBATIONARY):
        seed.transition(to, epoch=0, reason="")
    with torch.no_grad():
        for p in seed.parameters():
            p.add_(1.0)
    grown = model(x)
    assert not torch.equal(grown, plain(x))
    model.train()
    layer = seed.layer
    layer.flush_telemetry(0)
    with ablated(model, [seed.seed_id]):
        assert seed.alpha == 0.0
        assert torch.equal(model(x), plain(x))
    assert layer.flush_telemetry(1)[0].samples == 0, "the counterfactual pass counted"
    assert seed.alpha == 1.0 and seed.state is SeedState.PROBATIONARY
    assert torch.equal(model(x), grown)
    with pytest.raises(KeyError, match="nope"), ablated(model, ["nope"]):
        pass


def test_unknown_blueprint_and_early_germination_are_refused():
    model = TinyMLP()
    inject_seeds(model, KasminaConfig(layers=["hidden.*"], chunks=2))
    seed = find_seeds(model)[0]
    with pytest.raises(BlueprintError, match="forward"):
        seed.germinate("residual_mlp", epoch=0)
    model(torch.randn(2, 6))
    with pytest.raises(BlueprintError, match="unknown blueprint 'nope'"):
        seed.germinate("nope", epoch=0)
    with pytest.raises(BlueprintError, match="does not support"):
        seed.germinate("conv2d_residual", epoch=0)
    with pytest.raises(BlueprintError, match="cannot be built"):
        seed.germinate("residual_mlp", epoch=0, widht=3)
    assert seed.state is SeedState.DORMANT and seed.history == []
    assert seed.blueprint is None


class WrongShape(Blueprint):
    name = "test_wrong_shape"

    def build(self, chunk_shape, extra=1):
        return nn.Linear(chunk_shape[0], chunk_shape[0] + extra)


class Scaled(Blueprint):
    """A user blueprint relying on the default (meta-device) ``param_cost``."""

    name = "test_scaled"

    def build(self, chunk_shape):
        layer = nn.Linear(chunk_shape[0], chunk_shape[0])
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
        return layer


@pytest.fixture
def user_blueprints():
    register_blueprint(WrongShape())
    register_blueprint(Scaled())
    yield
    unregister_blueprint(WrongShape.name)
    unregister_blueprint(Scaled.name)


def test_shape_mismatch_is_refused_and_training_goes_on(user_blueprints):
    _, model, x, seeds = grown_pair("mlp")
    seed = seeds[0]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BlueprintError, match=r"outputs per-sample shape \(5,\).*chunk is \(4,\)"):
        seed.germinate(WrongShape.name, epoch=3)
    assert seed.state is SeedState.DORMANT and seed.blueprint is None
    assert model.state_dict().keys() == before.keys()
    task_loss(model(x)).backward()  # the model still trains
    seed.germinate(Scaled.name, epoch=3)
    assert seed.param_count() == Scaled().param_cost(seed.chunk_shape) == 4 * 4 + 4
    with pytest.raises(BlueprintError, match="already registered"):
        register_blueprint(Scaled())


def test_blueprint_kwargs_must_be_plain_json():
    _, _, _, seeds = grown_pair("mlp")
    with pytest.raises(BlueprintError, match="not plain JSON"):
        seeds[0].germinate("residual_mlp", epoch=0, hidden=object())


@pytest.mark.parametrize("dtype", [torch.float64])
def test_blueprint_follows_host_dtype(dtype):
    plain, model, x, seeds = grown_pair("mlp")
    model.to(dtype)
    seeds[0].germinate("residual_mlp", epoch=0, hidden=3)
    assert {p.dtype for p in seeds[0].parameters()} == {dtype}
    assert seeds[0].param_count() == 2 * 4 * 3 + 3 + 4
    assert torch.equal(model(x.to(dtype)), plain.to(dtype)(x.to(dtype)))


def test_signal_conv1d_is_shift_equivariant_over_features():
    """It reads a flat chunk as a signal: shifting the features shifts the delta (away from
    the zero-padded borders), which no dense blueprint does."""
    torch.manual_seed(0)
    delta = get_blueprint("signal_conv1d").build((40,), hidden=8, kernel_size=5)
    for p in delta.parameters():
        nn.init.normal_(p)  # give the zeroed output conv weights, so the delta is non-trivial
    x = torch.randn(3, 40)
    shifted = delta(torch.roll(x, 3, dims=1))
    expected = torch.roll(delta(x), 3, dims=1)
    # Receptive field 2 * (k // 2) = 4 on each side: positions 7..35 see no border or wrap.
    torch.testing.assert_close(shifted[:, 7:36], expected[:, 7:36])
    assert not torch.allclose(shifted, delta(x))


def test_a_training_seed_that_overflows_cannot_poison_the_host():
    """Straight-through must return the host's value even where the delta is inf/NaN."""
    from tolaria.config import KasminaConfig
    from tolaria.contracts import SeedState
    from tolaria.kasmina import find_seeds, inject_seeds

    host = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU())
    inject_seeds(host, KasminaConfig(layers=["1"], chunks=1))
    x = torch.randn(5, 4)
    expected = host(x).detach()
    seed = find_seeds(host)[0]
    seed.germinate("residual_mlp", epoch=0)
    seed.transition(SeedState.TRAINING, epoch=0, reason="test")
    with torch.no_grad():
        for parameter in seed.blueprint.parameters():
            parameter.fill_(float("inf"))
    out = host(x)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert torch.isfinite(host[0].weight.grad).all()
