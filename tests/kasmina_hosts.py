"""Tiny hosts for the Kasmina tests: one per chunk rank (features, 1-D maps, 2-D maps)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from tolaria.config import KasminaConfig
from tolaria.kasmina import Blueprint, KasminaSeed, find_seeds, inject_seeds
from tolaria.kasmina.blueprints import blueprint_shapes


class TinyMLP(nn.Module):
    def __init__(self, inputs: int = 6, width: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.hidden = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(inputs, width), nn.ReLU()),
                nn.Sequential(nn.Linear(width, width), nn.Tanh()),
            ]
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.hidden:
            x = block(x)
        return self.head(x)


class TinyConv(nn.Module):
    """Convolutional host whose watched block keeps the spatial size."""

    def __init__(self, dims: int, channels: int = 8, size: int = 6, classes: int = 3) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.stem = conv(1, channels, 3, padding=1)
        self.block = conv(channels, channels, 3, padding=1)
        self.head = nn.Linear(channels * size**dims, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.tanh(self.block(x))
        return self.head(x.flatten(1))


#: name -> (host factory, Kasmina layers, input factory)
HOSTS = {
    "mlp": (lambda: TinyMLP(), ["hidden.*"], lambda n: torch.randn(n, 6)),
    "conv1d": (lambda: TinyConv(1), ["block"], lambda n: torch.randn(n, 1, 6)),
    "conv2d": (lambda: TinyConv(2), ["block"], lambda n: torch.randn(n, 1, 6, 6)),
}


def grown_pair(
    kind: str, *, seed: int = 0, **config: object
) -> tuple[nn.Module, nn.Module, torch.Tensor, list[KasminaSeed]]:
    """``(plain host, same host with seeds bound by one forward, input batch, seeds)``."""
    make_host, layers, make_input = HOSTS[kind]
    torch.manual_seed(seed)
    plain = make_host()
    model = copy.deepcopy(plain)
    inject_seeds(model, KasminaConfig(**{"layers": layers, "chunks": 2, **config}))
    x = make_input(5)
    model(x)
    return plain, model, x, find_seeds(model)


def host_for(blueprint: Blueprint) -> str:
    """The first host kind whose first seed ``blueprint`` supports."""
    for kind in HOSTS:
        _, _, _, seeds = grown_pair(kind)
        if blueprint.supports(*shapes_at(seeds[0], blueprint)):
            return kind
    raise LookupError("no test host fits")


def shapes_at(seed: KasminaSeed, blueprint: Blueprint) -> tuple:
    """What ``blueprint``'s methods take at ``seed`` (its chunk's shape, and its module
    input's for a blueprint that reads it)."""
    return blueprint_shapes(blueprint, seed.chunk_shape, seed.input_shape)
