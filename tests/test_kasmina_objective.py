"""What a seed learns while TRAINING (the functional-gradient target) and ``widen``, the
blueprint that reads its module's input: the host stays bitwise its own throughout."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kasmina_hosts import TinyMLP, grown_pair
from tolaria.config import KasminaConfig
from tolaria.contracts import SeedState
from tolaria.export import fold_grafts
from tolaria.kasmina import (
    Blueprint,
    export_structure,
    find_seeds,
    inject_seeds,
    register_blueprint,
    replay_structure,
    unregister_blueprint,
)


class _Free(nn.Module):
    """A delta that is a free tensor per sample: its gradient is the seed's objective's."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.zeros(shape))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.value[: h.shape[0]] + 0 * h  # (the graft probe runs a batch of 2)


class FreeDelta(Blueprint):
    name = "test_free_delta"

    def build(self, chunk_shape, batch: int = 5):
        return _Free((batch, *chunk_shape))


@pytest.fixture
def free_delta():
    register_blueprint(FreeDelta())
    yield
    unregister_blueprint(FreeDelta.name)


def _loss(out: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, torch.arange(out.shape[0]) % out.shape[1])


def _chunk_and_gradient(plain: nn.Module, x: torch.Tensor, width: int):
    """The first chunk of the plain host's ``hidden[0]`` output and the loss gradient there."""
    seen = {}

    def watch(module, args, out) -> None:
        seen["h"] = out
        out.register_hook(lambda g: seen.update(g=g))

    handle = plain.hidden[0].register_forward_hook(watch)
    _loss(plain(x)).backward()
    handle.remove()
    return seen["h"][:, :width].detach(), seen["g"][:, :width]


def test_a_training_seed_learns_the_functional_gradient_target(free_delta):
    """Its gradient is ``g + d / c`` with ``c = ratio * rms(h) / rms(g)``, and gradient descent
    on it alone settles at the finite ``d* = -c g`` -- the host's output never moves."""
    plain, model, x, seeds = grown_pair("mlp", target_delta_ratio=0.5)
    seed = seeds[0]  # the first chunk of hidden.0
    seed.germinate(FreeDelta.name, epoch=0)
    seed.transition(SeedState.TRAINING, epoch=0, reason="test")
    h, g = _chunk_and_gradient(plain, x, seed.chunk_shape[0])
    c = 0.5 * h.square().mean().sqrt() / g.square().mean().sqrt()
    value = seed.blueprint.value
    with torch.no_grad():
        value.normal_()
    _loss(model(x)).backward()
    torch.testing.assert_close(value.grad, g + value.detach() / c)

    optimizer = torch.optim.SGD([value], lr=0.5 * c.item())
    for _ in range(60):
        optimizer.zero_grad()
        out = model(x)
        assert torch.equal(out, plain(x))
        _loss(out).backward()
        optimizer.step()
    torch.testing.assert_close(value.detach(), -c * g, rtol=1e-4, atol=1e-6)
    assert value.detach().square().mean().sqrt() == pytest.approx(0.5 * h.square().mean().sqrt())


def _widened(kind: str):
    plain, model, x, seeds = grown_pair(kind)
    seed = seeds[-1]
    seed.germinate("widen", epoch=0, hidden=3)
    torch.manual_seed(1)
    for parameter in seed.blueprint.parameters():  # a non-zero delta, as after training
        nn.init.normal_(parameter)
    return plain, model, x, seed


@pytest.mark.parametrize("kind", ["mlp", "conv1d", "conv2d"])
def test_widen_adds_units_that_read_the_modules_input(kind):
    """On an nn.Sequential block (the mlp) and on a hooked module (the convs): its chunk
    becomes ``h + d(x)``, ``x`` the module's input; the other chunk is the host's."""
    plain, model, x, seed = _widened(kind)
    fqn = seed.seed_id.rpartition(".")[0]
    module, twin = model.get_submodule(fqn), plain.get_submodule(fqn)
    seen = {}
    module.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    module.register_forward_hook(lambda m, args, out: seen.update(h=out))
    seed.transition(SeedState.TRAINING, epoch=0, reason="test")
    assert torch.equal(model(x), plain(x))
    for state in (SeedState.BLENDING, SeedState.PROBATIONARY, SeedState.FOSSILIZED):
        seed.transition(state, epoch=0, reason="test")
    model(x)
    h = twin(seen["x"])  # the host's module on the grown model's input to it
    width = seed.chunk_shape[0]
    assert torch.equal(seen["h"][:, :-width], h[:, :-width])
    torch.testing.assert_close(seen["h"][:, -width:], h[:, -width:] + seed.blueprint(seen["x"]))
    assert seed.layer.block_input is None  # taken by its forward, never held after


def test_a_widened_model_folds_and_replays_exactly():
    _, model, x, seed = _widened("mlp")
    for state in (SeedState.TRAINING, SeedState.BLENDING, SeedState.PROBATIONARY,
                  SeedState.FOSSILIZED):
        seed.transition(state, epoch=0, reason="test")
    model.eval()
    expected = model(x)
    torch.testing.assert_close(fold_grafts(model)(x), expected, rtol=0, atol=0)

    # A fresh host that never ran a forward learns the input shape from the manifest.
    fresh = TinyMLP()
    inject_seeds(fresh, KasminaConfig(layers=["hidden.*"], chunks=2))
    replay_structure(fresh, export_structure(model))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.eval()(x), expected)


def test_widen_refuses_a_module_that_changes_the_spatial_size():
    host = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU())
    inject_seeds(host, KasminaConfig(layers=["0"], chunks=1))
    host(torch.randn(2, 1, 6, 6))
    seed = find_seeds(host)[0]
    assert seed.chunk_shape == (4, 3, 3) and seed.input_shape == (1, 6, 6)
    from tolaria.errors import BlueprintError

    with pytest.raises(BlueprintError, match=r"does not support chunk and input shapes"):
        seed.germinate("widen", epoch=0)
    assert seed.state is SeedState.DORMANT
    copy.deepcopy(host)(torch.randn(2, 1, 6, 6))  # the stash hook survives a deepcopy


def test_the_pull_comes_from_the_last_epochs_telemetry(free_delta):
    """After an epoch the layer's flush sets ``pull = rms(g) / (ratio * rms(h))`` of the
    chunk's measured batches, and TRAINING then uses that constant, not the batch's own."""
    plain, model, x, seeds = grown_pair("mlp", target_delta_ratio=0.25, telemetry_interval=1)
    seed = seeds[0]
    h, g = _chunk_and_gradient(plain, x, seed.chunk_shape[0])
    seed.layer.flush_telemetry(epoch=-1)  # forget grown_pair's binding forward
    _loss(model(x)).backward()  # one measured training batch: the epoch
    seed.layer.flush_telemetry(epoch=0)
    expected = (g.square().sum() / h.square().sum()).sqrt().item() / 0.25
    assert seed.pull == pytest.approx(expected, rel=1e-5)

    seed.germinate(FreeDelta.name, epoch=0)
    seed.transition(SeedState.TRAINING, epoch=0, reason="test")
    value = seed.blueprint.value
    with torch.no_grad():
        value.normal_()
    model.zero_grad()
    _loss(model(x)).backward()
    torch.testing.assert_close(value.grad, g + value.detach() * seed.pull)
    assert export_structure(model)["seeds"][0]["pull"] == seed.pull  # resumes with it


def test_the_input_hook_is_there_only_while_something_reads_the_input():
    """A pre-hook puts a module on PyTorch's slower call path: after the first forward
    (which learns the input's shape) it stays only while a seed holds ``widen``."""
    from tolaria.kasmina.layer import _kasmina_input_hook

    _, model, x, seeds = grown_pair("mlp")
    block, seed = model.hidden[0], seeds[0]

    def hooked() -> bool:
        return _kasmina_input_hook in block._forward_pre_hooks.values()

    assert not hooked() and seed.input_shape == (6,)
    seed.germinate("widen", epoch=0)
    assert hooked()
    copy.deepcopy(model)(x)  # the copy's hook feeds the copy's layer
    seed.transition(SeedState.CULLED, epoch=0, reason="test")
    assert not hooked() and seed.layer.block_input is None
    seed.transition(SeedState.DORMANT, epoch=0, reason="test")
    seed.germinate("residual_mlp", epoch=0)
    assert not hooked()
