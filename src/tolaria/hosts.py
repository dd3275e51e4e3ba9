"""Built-in host models, and the user's own via ``module:function``.

Every built-in host names the blocks a seed should watch ``hidden.<i>`` (an
``nn.ModuleList``), so ``kasmina.layers: ["hidden.*"]`` fits all of them (the default
job's ``["flatten"]`` fits only the mlp), and ends in a ``head`` that maps features to
class logits.  Blocks hold no normalisation: seeds see the raw post-activation values,
which is what their telemetry (dead and saturated fractions) is defined on.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from tolaria.config import ModelConfig
from tolaria.errors import ConfigError
from tolaria.plugins import check_kwargs, construct
from tolaria.registry import Registry


def _widths(values: Sequence[int], what: str) -> tuple[int, ...]:
    if isinstance(values, int | str) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
    ):
        raise ConfigError(f"model.kwargs.{what}: expected a list of positive ints, got {values!r}")
    return tuple(values)


class MLPHost(nn.Module):
    """``flatten -> [Linear -> ReLU] x len(hidden) -> Linear head``."""

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (32, 32)
    ) -> None:
        super().__init__()
        widths = (math.prod(input_shape), *_widths(hidden, "hidden"))
        self.flatten = nn.Flatten()
        self.hidden = nn.ModuleList(
            nn.Sequential(nn.Linear(w_in, w_out), nn.ReLU())
            for w_in, w_out in itertools.pairwise(widths)
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        for block in self.hidden:
            x = block(x)
        return self.head(x)


class _ConvHost(nn.Module):
    """``[Conv -> ReLU] -> MaxPool`` per block, then ``flatten -> Linear head``.

    Pooling sits between blocks, outside ``hidden.<i>``, so a seed sees its block's
    output at full resolution.  Convolutions keep the spatial size (``padding="same"``);
    each pool halves it (floor).
    """

    conv: type[nn.Module]
    pool: type[nn.Module]
    spatial_dims: int

    def __init__(
        self,
        channels_in: int,
        spatial: tuple[int, ...],
        num_classes: int,
        channels: Sequence[int],
        kernel_size: int,
    ) -> None:
        super().__init__()
        widths = (channels_in, *_widths(channels, "channels"))
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ConfigError(
                f"model.kwargs.kernel_size: expected a positive int, got {kernel_size!r}"
            )
        out_spatial = tuple(s // 2 ** (len(widths) - 1) for s in spatial)
        if min(out_spatial) < 1:
            raise ConfigError(
                f"model.kwargs.channels: {len(widths) - 1} pooled blocks shrink input "
                f"{spatial} to nothing; use fewer blocks"
            )
        self.hidden = nn.ModuleList(
            nn.Sequential(self.conv(c_in, c_out, kernel_size, padding="same"), nn.ReLU())
            for c_in, c_out in itertools.pairwise(widths)
        )
        self.downsample = self.pool(2)
        self.head = nn.Linear(widths[-1] * math.prod(out_spatial), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == self.spatial_dims + 1:  # no channel axis: one channel
            x = x.unsqueeze(1)
        for block in self.hidden:
            x = self.downsample(block(x))
        return self.head(x.flatten(1))


class CNN1dHost(_ConvHost):
    """1-D convolutional host for ``(L,)`` or ``(C, L)`` inputs (e.g. MNIST-1D)."""

    conv, pool, spatial_dims = nn.Conv1d, nn.MaxPool1d, 1

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (16, 32),
        kernel_size: int = 5,
    ) -> None:
        shape = tuple(input_shape)
        if len(shape) not in (1, 2):
            raise ConfigError(f"model.host='cnn1d' needs (L,) or (C, L) inputs, got {shape}")
        c_in, length = (1, shape[0]) if len(shape) == 1 else shape
        super().__init__(c_in, (length,), num_classes, channels, kernel_size)


class CNN2dHost(_ConvHost):
    """2-D convolutional host for ``(C, H, W)`` inputs (digits, CIFAR-10)."""

    conv, pool, spatial_dims = nn.Conv2d, nn.MaxPool2d, 2

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (16, 32),
        kernel_size: int = 3,
    ) -> None:
        shape = tuple(input_shape)
        if len(shape) != 3:
            raise ConfigError(f"model.host='cnn2d' needs (C, H, W) inputs, got {shape}")
        super().__init__(shape[0], shape[1:], num_classes, channels, kernel_size)


BUILTIN_HOSTS: Registry[Callable[..., nn.Module]] = Registry("host", "model.host")
BUILTIN_HOSTS.register("mlp", MLPHost)
BUILTIN_HOSTS.register("cnn1d", CNN1dHost)
BUILTIN_HOSTS.register("cnn2d", CNN2dHost)


def build_host(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Construct ``config.host`` for inputs of per-sample ``input_shape``; kwargs are checked."""
    factory = BUILTIN_HOSTS.get(config.host)
    check_kwargs(factory, config.kwargs, "model.kwargs", positional=2)
    model = construct(
        factory, f"model.host={config.host!r}", tuple(input_shape), num_classes, **config.kwargs
    )
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.host={config.host!r}: must return an nn.Module, got {type(model).__name__}"
        )
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
