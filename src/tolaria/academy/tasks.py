"""Synthetic task families for the replay campaign and its held-out benchmark.

Generated from a seed, nothing downloaded.  Each family rewards a different graft, so a
policy trained across them must learn *where* and *what* from the features rather than
memorise one task:

- ``motifs``: 1-D signals of ``length`` steps holding one of ``classes`` short motifs at a
  random position, in noise.  Position-invariant: a convolution on the input pays.
- ``clusters``: points in ``dims`` dimensions whose class is a product of signs of random
  projections (XOR-like).  Nonlinear in the raw input: capacity on the hidden layers pays.
- ``rings``: points whose class is the shell their radius falls in.  Held out of the
  campaign: the benchmark's unseen family.

Use as ``data.dataset: "tolaria.academy.tasks:synthetic"`` with ``data.kwargs: {family:
motifs, ...}``.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from tolaria.errors import ConfigError


def _motifs(g: torch.Generator, n: int, classes: int, length: int, noise: float):
    width = 5
    shapes = torch.randn(classes, width, generator=torch.Generator().manual_seed(1234))
    y = torch.randint(0, classes, (n,), generator=g)
    x = noise * torch.randn(n, length, generator=g)
    starts = torch.randint(0, length - width + 1, (n,), generator=g)
    columns = starts[:, None] + torch.arange(width)[None, :]
    x.scatter_add_(1, columns, shapes[y])
    return x, y


def _clusters(g: torch.Generator, n: int, classes: int, dims: int, noise: float):
    bits = max(1, (classes - 1).bit_length())
    projections = torch.randn(dims, bits, generator=torch.Generator().manual_seed(4321))
    x = torch.randn(n, dims, generator=g)
    code = ((x @ projections) > 0).long() * (2 ** torch.arange(bits))
    y = code.sum(dim=1) % classes
    return x + noise * torch.randn(n, dims, generator=g), y


def _rings(g: torch.Generator, n: int, classes: int, dims: int, noise: float):
    direction = torch.nn.functional.normalize(torch.randn(n, dims, generator=g), dim=1)
    y = torch.randint(0, classes, (n,), generator=g)
    radius = 1.0 + y.float() + noise * torch.randn(n, generator=g)
    return direction * radius[:, None], y


_FAMILIES = {"motifs": _motifs, "clusters": _clusters, "rings": _rings}


def synthetic(
    family: str = "motifs",
    n: int = 3000,
    classes: int = 6,
    size: int = 32,
    noise: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.25,
) -> tuple[TensorDataset, TensorDataset, int]:
    """``(train, test, classes)`` of one family; ``size`` is the signal length or dimension."""
    if family not in _FAMILIES:
        raise ConfigError(f"data.kwargs.family={family!r}: one of {sorted(_FAMILIES)}")
    g = torch.Generator().manual_seed(seed)
    x, y = _FAMILIES[family](g, n, classes, size, noise)
    cut = int(n * (1 - test_fraction))
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:]), classes
