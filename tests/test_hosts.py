"""Built-in hosts: shapes, the ``hidden.<i>`` naming seeds rely on, checked kwargs."""

from __future__ import annotations

import fnmatch

import pytest
import torch
from torch import nn

from tolaria.config import ModelConfig
from tolaria.errors import ConfigError
from tolaria.hosts import CNN1dHost, CNN2dHost, MLPHost, build_host, count_parameters

CASES = [
    ("mlp", (40,)),
    ("mlp", (1, 8, 8)),
    ("cnn1d", (40,)),
    ("cnn1d", (3, 40)),
    ("cnn2d", (1, 8, 8)),
    ("cnn2d", (3, 32, 32)),
]


@pytest.mark.parametrize(("host", "input_shape"), CASES)
def test_forward_shape_and_every_parameter_gets_a_gradient(host, input_shape):
    torch.manual_seed(0)
    model = build_host(ModelConfig(host=host), input_shape, num_classes=7)
    logits = model(torch.randn(5, *input_shape))
    assert logits.shape == (5, 7)
    logits.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize(("host", "input_shape"), CASES)
def test_seed_watchable_blocks_are_named_hidden_i(host, input_shape):
    model = build_host(ModelConfig(host=host), input_shape, num_classes=3)
    assert isinstance(model.hidden, nn.ModuleList) and len(model.hidden) == 2
    names = [name for name, _ in model.named_modules()]
    direct_children = [n for n in names if fnmatch.fnmatch(n, "hidden.*") and n.count(".") == 1]
    assert direct_children == ["hidden.0", "hidden.1"]
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 3


def test_kwargs_reach_the_constructor():
    model = build_host(ModelConfig(host="mlp", kwargs={"hidden": [8, 6, 4]}), (10,), 2)
    assert [block[0].out_features for block in model.hidden] == [8, 6, 4]
    conv_config = ModelConfig(host="cnn1d", kwargs={"channels": [4], "kernel_size": 3})
    conv = build_host(conv_config, (12,), 2)
    assert conv.hidden[0][0].out_channels == 4 and conv.hidden[0][0].kernel_size == (3,)


def test_cnn_blocks_keep_resolution_and_pooling_sits_between_them():
    model = CNN2dHost((1, 8, 8), 10, channels=(4, 6))
    seen = []
    model.hidden[1].register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    model(torch.randn(2, 1, 8, 8))
    assert seen == [(2, 6, 4, 4)]  # one pool before block 1, none inside it


def test_count_parameters():
    model = MLPHost((40,), 10)
    assert count_parameters(model) == (40 * 32 + 32) + (32 * 32 + 32) + (32 * 10 + 10)
    model.head.requires_grad_(False)
    assert count_parameters(model) == (40 * 32 + 32) + (32 * 32 + 32)
    assert count_parameters(model, trainable_only=False) == 2698
    shared = nn.Linear(3, 3)
    assert count_parameters(nn.Sequential(shared, shared)) == 12


def test_user_host():
    model = build_host(
        ModelConfig(host="plugins_for_data_tests:tiny_host", kwargs={"width": 9}), (6,), 4
    )
    assert model(torch.randn(2, 6)).shape == (2, 4)
    assert count_parameters(model) == (6 * 9 + 9) + (9 * 4 + 4)


@pytest.mark.parametrize(
    ("host", "kwargs", "input_shape", "message"),
    [
        ("mlp", {"hiden": [4]}, (4,), "'hiden'"),
        ("transformer", {}, (4,), "built-in: mlp, cnn1d, cnn2d"),
        ("plugins_for_data_tests:not_a_module", {}, (4,), "must return an nn.Module"),
        ("no_such_module_xyz:host", {}, (4,), "no_such_module_xyz"),
        ("mlp", {"hidden": [0]}, (4,), "positive ints"),
        ("cnn2d", {}, (40,), r"\(C, H, W\)"),
        ("cnn1d", {}, (1, 8, 8), r"\(L,\) or \(C, L\)"),
        ("cnn1d", {"channels": [2, 2, 2, 2]}, (8,), "fewer blocks"),
    ],
)
def test_config_mistakes_are_config_errors(host, kwargs, input_shape, message):
    with pytest.raises(ConfigError, match=message):
        build_host(ModelConfig(host=host, kwargs=kwargs), input_shape, 10)


def test_cnn1d_accepts_channel_first_and_channel_less_inputs():
    flat, channelled = CNN1dHost((40,), 10), CNN1dHost((1, 40), 10)
    channelled.load_state_dict(flat.state_dict())
    x = torch.randn(3, 40)
    assert torch.equal(flat(x), channelled(x.unsqueeze(1)))
