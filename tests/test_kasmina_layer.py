"""Injection into hosts and per-chunk telemetry against a direct computation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kasmina_hosts import TinyConv, TinyMLP, shapes_at
from tolaria.config import KasminaConfig
from tolaria.contracts import SeedState
from tolaria.errors import ConfigError
from tolaria.hosts import CNN1dHost, CNN2dHost, MLPHost
from tolaria.kasmina import (
    KasminaLayer,
    available_blueprints,
    collect_telemetry,
    find_seeds,
    get_blueprint,
    inject_seeds,
)


def test_injection_matches_outermost_modules_and_keeps_host_names():
    model = TinyMLP()
    names_before = set(model.state_dict())
    layers = inject_seeds(model, KasminaConfig(layers=["hidden.*"], chunks=3))
    assert [layer.module_fqn for layer in layers] == ["hidden.0", "hidden.1"]
    assert model.hidden[0].kasmina is layers[0]
    assert [s.seed_id for s in find_seeds(model)] == [
        f"hidden.{i}.{c}" for i in range(2) for c in range(3)
    ]
    assert set(model.state_dict()) == names_before, "dormant seeds add no state"
    with pytest.raises(ConfigError, match="already has Kasmina seeds"):
        inject_seeds(model, KasminaConfig(layers=["hidden.0"], chunks=3))


def test_unmatched_pattern_and_unusable_outputs_are_config_errors():
    with pytest.raises(ConfigError, match=r"'blocks\.\*' match no module.*hidden\.0"):
        inject_seeds(TinyMLP(), KasminaConfig(layers=["hidden.0", "blocks.*"]))
    with pytest.raises(ConfigError, match="container"):
        inject_seeds(TinyMLP(), KasminaConfig(layers=["hidden"]))
    model = TinyMLP()
    inject_seeds(model, KasminaConfig(layers=["hidden.0"], chunks=9))
    with pytest.raises(ConfigError, match=r"chunks=9.*only 8 output channels"):
        model(torch.randn(2, 6))


def test_dormant_seeds_change_nothing_in_training():
    """Same init, same batches: outputs, gradients and trained weights are bit-identical."""
    torch.manual_seed(0)
    plain = TinyConv(1)
    model = copy.deepcopy(plain)
    inject_seeds(model, KasminaConfig(layers=["stem", "block"], chunks=3, telemetry_interval=1))
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (plain, model)]
    for _ in range(3):
        x, y = torch.randn(8, 1, 6), torch.randint(0, 3, (8,))
        for m, opt in zip((plain, model), optimizers, strict=True):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    for (name, p), q in zip(plain.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_hooks_survive_deepcopy_and_sequential_runs_layer_once():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 6), nn.ReLU()))
    inject_seeds(model, KasminaConfig(layers=["2"], chunks=2, telemetry_interval=1))
    model(torch.randn(5, 4))
    [record, _] = model[2].kasmina.flush_telemetry(0)
    assert record.samples == 5, "nn.Sequential must not apply the layer twice"
    twin = copy.deepcopy(model)
    seed = find_seeds(twin)[0]
    assert seed.layer is twin[2].kasmina and seed.layer is not model[2].kasmina
    twin(torch.randn(3, 4))
    assert twin[2].kasmina.flush_telemetry(0)[0].samples == 3
    assert model[2].kasmina.flush_telemetry(0)[0].samples == 0


def reference_stats(outputs: list[torch.Tensor], grads: list[torch.Tensor], lo: int, hi: int, t):
    chunk = torch.cat([o[:, lo:hi].flatten() for o in outputs]).double()
    grad_sq = torch.stack([g[:, lo:hi].double().square().sum() for g in grads])
    return {
        "activation_mean": chunk.mean().item(),
        "activation_var": chunk.var(unbiased=False).item(),
        "dead_fraction": (chunk == 0).double().mean().item(),
        "saturated_fraction": (chunk.abs() >= t).double().mean().item(),
        "grad_norm": grad_sq.mean().sqrt().item(),
    }


@pytest.mark.parametrize("kind", ["mlp", "conv2d"])
def test_telemetry_matches_a_direct_computation(kind):
    torch.manual_seed(1)
    model = TinyMLP() if kind == "mlp" else TinyConv(2)
    target = model.hidden[0] if kind == "mlp" else model.block
    inject_seeds(
        model,
        KasminaConfig(
            layers=["hidden.0" if kind == "mlp" else "block"],
            chunks=3,  # 8 channels: widths 3, 3, 2
            telemetry_interval=1,
            saturation_threshold=0.5,
        ),
    )
    outputs, grads = [], []

    def record(module, args, out):
        if module.training:
            outputs.append(out.detach().clone())
            out.register_hook(lambda g: grads.append(g.clone()))

    target.register_forward_hook(record)
    model.train()
    for n in (4, 7):
        shape = (n, 6) if kind == "mlp" else (n, 1, 6, 6)
        model(torch.randn(shape) * 3).square().sum().backward()
    model.eval()
    model(torch.randn(shape))  # evaluation never counts
    records = collect_telemetry(find_seeds(model), epoch=5)
    assert list(records) == [f"{target.kasmina.module_fqn}.{i}" for i in range(3)]
    for (lo, hi), record in zip([(0, 3), (3, 6), (6, 8)], records.values(), strict=True):
        assert record.epoch == 5 and record.samples == 11
        expected = reference_stats(outputs, grads, lo, hi, 0.5)
        assert 0 < expected["dead_fraction"] < 1 or kind == "conv2d"
        for field, value in expected.items():
            assert getattr(record, field) == pytest.approx(value, rel=1e-5, abs=1e-9), field
    assert all(r.samples == 0 for r in target.kasmina.flush_telemetry(6)), "flush resets"


def test_telemetry_interval_samples_every_nth_batch_and_can_be_off():
    model = TinyMLP()
    inject_seeds(model, KasminaConfig(layers=["hidden.0"], chunks=2, telemetry_interval=3))
    for n in range(1, 8):  # batches of 1..7 samples; batches 1, 4, 7 are sampled
        model(torch.randn(n, 6)).sum().backward()
    [record, _] = model.hidden[0].kasmina.flush_telemetry(0)
    assert record.samples == 1 + 4 + 7
    model(torch.randn(2, 6))  # the count restarts each epoch: the first batch is sampled
    assert model.hidden[0].kasmina.flush_telemetry(1)[0].samples == 2

    quiet = TinyMLP()
    [layer] = inject_seeds(quiet, KasminaConfig(layers=["hidden.1"], telemetry=False))
    quiet(torch.randn(3, 6))
    assert layer.flush_telemetry(0) == [] and isinstance(layer, KasminaLayer)


def test_a_first_forward_under_inference_mode_does_not_poison_training():
    model = TinyMLP()
    inject_seeds(model, KasminaConfig(layers=["hidden.*"], chunks=2, telemetry_interval=1))
    model.eval()
    with torch.inference_mode():
        model(torch.randn(2, 6))  # e.g. a baseline validation before the first epoch
        find_seeds(model)[0].germinate("residual_mlp", epoch=0)
    model.train()
    find_seeds(model)[0].transition(SeedState.TRAINING, epoch=0, reason="")
    model(torch.randn(3, 6)).sum().backward()
    assert model.hidden[0].kasmina.flush_telemetry(0)[0].samples == 3
    assert all(p.grad is not None for p in find_seeds(model)[0].parameters())


@pytest.mark.parametrize(
    ("host", "input_shape", "chunk_shape", "block_input"),
    [
        (MLPHost, (40,), (8,), (40,)),
        (CNN1dHost, (40,), (4, 40), (1, 40)),
        (CNN2dHost, (1, 8, 8), (4, 8, 8), (1, 8, 8)),
    ],
)
def test_hidden_seeds_fit_every_builtin_host(host, input_shape, chunk_shape, block_input):
    model = host(input_shape, 10)
    layers = inject_seeds(model, KasminaConfig(layers=["hidden.*"], chunks=4))
    assert [layer.module_fqn for layer in layers] == ["hidden.0", "hidden.1"]
    model(torch.randn(2, *input_shape))
    seed = find_seeds(model)[0]
    assert seed.chunk_shape == chunk_shape
    assert seed.input_shape == block_input  # what a widening blueprint reads
    fitting = [name for name in available_blueprints()
               if get_blueprint(name).supports(*shapes_at(seed, get_blueprint(name)))]
    assert "widen" in fitting and len(fitting) >= 4
    for name in fitting:
        seed.germinate(name, epoch=0)
        seed.transition(SeedState.CULLED, epoch=0, reason="next")
        seed.transition(SeedState.DORMANT, epoch=0, reason="next")


def test_a_training_seed_reports_its_delta_size_relative_to_its_chunk():
    from tolaria.kasmina import find_seeds, inject_seeds

    host = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    inject_seeds(host, KasminaConfig(layers=["1"], chunks=1, telemetry_interval=1))
    x = torch.randn(8, 4)
    host(x)
    seed = find_seeds(host)[0]
    seed.germinate("low_rank", epoch=0)
    seed.transition(SeedState.TRAINING, epoch=0, reason="test")
    seed.blueprint = _Scale(3.0)  # a known delta: d(h) = 3h
    host(x)
    (record,) = host[1].kasmina.flush_telemetry(epoch=0)
    assert record.delta_ratio == pytest.approx(3.0, rel=1e-6)
    host.eval()
    host(x)  # evaluation passes do not count
    (record,) = host[1].kasmina.flush_telemetry(epoch=1)
    assert record.delta_ratio is None


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, h):
        return self.factor * h
