"""Blueprints: the small modules a seed grafts onto its chunk, and the registry that names them.

A blueprint's ``build(chunk_shape, **kwargs)`` returns a *delta* module ``d``: it maps a
batch of chunks ``h`` of per-sample shape ``chunk_shape`` to a tensor of the same shape,
and the seed adds ``alpha * d(h)`` to the chunk.  Every built-in zero-initialises only its
output-side layer, so ``d(h) = 0`` at graft while its input-side weights are random: the
output layer's gradient ``dL/dW_out = g * a^T`` is then non-zero, and once it moves the
input side receives gradient too.  (Zeroing both sides would leave ReLU units whose
input and output weights never move.)

Most blueprints read the chunk they correct.  One that ``reads_input`` reads the host
module's *input* instead (``x`` of ``h = module(x)``): its methods take the input's
per-sample shape after the chunk's, ``build(chunk_shape, input_shape, **kwargs)``, and
``widen`` uses it to add new units to the module itself, which a function of ``h`` alone
cannot (a residual on a 32-wide layer stays 32 wide).

``param_cost(chunk_shape, **kwargs)`` is each built-in's closed-form parameter count, so
a controller can budget growth without building anything.  Users add their own with
``register_blueprint``; a subclass that does not override ``param_cost`` gets it by
building the module on the ``meta`` device (no memory, no compute).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from tolaria.errors import BlueprintError
from tolaria.registry import Registry

ChunkShape = tuple[int, ...]


#: What a learned policy knows of a blueprint beside its cost (descriptors, not ids, so a
#: blueprint registered later can still be scored).
BLUEPRINT_KINDS = ("mlp", "low_rank", "conv", "gate", "other")


class Blueprint(ABC):
    """A named recipe for a delta module.  Subclasses set ``name`` and implement ``build``;
    ``kind`` (one of :data:`BLUEPRINT_KINDS`) and ``receptive_field`` describe it.
    ``supports`` is the machine check of the chunks it fits, ``supports_text`` the same for
    a person (misfit errors name it): a subclass that overrides one overrides both."""

    name: str = ""
    kind: str = "other"
    #: Whether the delta reads the host module's input rather than the chunk (module
    #: docstring); its methods then take ``(chunk_shape, input_shape, ...)``.
    reads_input: bool = False
    #: The chunks ``supports`` accepts, in words with their per-sample shape.
    supports_text: str = "any chunk [C, ...]"

    @abstractmethod
    def build(self, chunk_shape: ChunkShape, **kwargs: Any) -> nn.Module:
        """A module mapping ``[batch, *chunk_shape]`` to the same shape, zero at init."""

    def supports(self, chunk_shape: ChunkShape) -> bool:
        """Whether ``build`` can fit a chunk of this per-sample shape."""
        return len(chunk_shape) >= 1

    def receptive_field(self, chunk_shape: ChunkShape, **kwargs: Any) -> float:
        """Fraction of the chunk one output of the delta reads (1: all of it)."""
        return 1.0

    def param_cost(self, *shapes: ChunkShape, **kwargs: Any) -> int:
        """Scalar parameters ``build(*shapes, **kwargs)`` creates."""
        with torch.device("meta"):
            module = self.build(*(tuple(shape) for shape in shapes), **kwargs)
        return sum(p.numel() for p in module.parameters())


def blueprint_shapes(
    blueprint: Blueprint, chunk_shape: ChunkShape, input_shape: ChunkShape | None
) -> tuple[ChunkShape, ...] | None:
    """The shapes ``blueprint``'s methods take at a seed: ``(chunk,)``, or ``(chunk, input)``
    for one that reads the module's input; None when that input's shape is unknown."""
    if not blueprint.reads_input:
        return (tuple(chunk_shape),)
    return None if input_shape is None else (tuple(chunk_shape), tuple(input_shape))


def fits(blueprint: Blueprint, chunk_shape: ChunkShape, input_shape: ChunkShape | None) -> bool:
    """Whether ``blueprint`` supports a seed with these shapes (an unknown input: no)."""
    shapes = blueprint_shapes(blueprint, chunk_shape, input_shape)
    return shapes is not None and blueprint.supports(*shapes)


def _zero_(layer: nn.Module) -> nn.Module:
    """Zero a layer's parameters so the delta it ends is exactly 0 at graft."""
    for parameter in layer.parameters():
        nn.init.zeros_(parameter)
    return layer


def _width(chunk_shape: ChunkShape, requested: int | None, ratio: float) -> int:
    return requested if requested is not None else max(1, math.ceil(chunk_shape[0] * ratio))


class ChannelLinear(nn.Module):
    """``nn.Linear`` over dim 1 (channels), applied at every position of dims 2..."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() == 2:
            return self.linear(h)
        return self.linear(h.movedim(1, -1)).movedim(-1, 1)


class ResidualMLP(Blueprint):
    """``d(h) = W2 relu(W1 h + b1) + b2`` over channels; ``hidden`` defaults to 2x the chunk.

    Cost ``C*H + H + H*C + C`` for ``C`` channels and ``H`` hidden units.
    """

    name = "residual_mlp"
    kind = "mlp"

    def build(
        self, chunk_shape: ChunkShape, hidden: int | None = None, ratio: float = 2.0
    ) -> nn.Module:
        c, h = chunk_shape[0], _width(chunk_shape, hidden, ratio)
        return nn.Sequential(ChannelLinear(c, h), nn.ReLU(), _zero_(ChannelLinear(h, c)))

    def param_cost(
        self, chunk_shape: ChunkShape, hidden: int | None = None, ratio: float = 2.0
    ) -> int:
        c, h = chunk_shape[0], _width(chunk_shape, hidden, ratio)
        return 2 * c * h + h + c


class LowRank(Blueprint):
    """Linear bottleneck adapter ``d(h) = B A h + b`` with ``A: C->r`` (no bias), ``B: r->C``.

    Cost ``r*C + C*r + C``.  ``rank`` defaults to a quarter of the chunk's channels.
    """

    name = "low_rank"
    kind = "low_rank"

    def build(self, chunk_shape: ChunkShape, rank: int | None = None) -> nn.Module:
        c, r = chunk_shape[0], _width(chunk_shape, rank, 0.25)
        return nn.Sequential(ChannelLinear(c, r, bias=False), _zero_(ChannelLinear(r, c)))

    def param_cost(self, chunk_shape: ChunkShape, rank: int | None = None) -> int:
        c, r = chunk_shape[0], _width(chunk_shape, rank, 0.25)
        return 2 * c * r + c


class _ConvResidual(Blueprint):
    """``conv(C->H, k) -> ReLU -> conv(H->C, k)``, second conv zeroed, ``padding=k//2``.

    An even ``kernel_size`` changes the length, which germination refuses as a shape
    mismatch.  Cost ``(C*H*k^n + H) + (H*C*k^n + C)`` for ``n`` spatial dims.
    """

    spatial_dims: int
    conv: type[nn.Module]
    kind = "conv"

    def receptive_field(self, chunk_shape: ChunkShape, **kwargs: Any) -> float:
        # Two stacked k-wide convolutions see 2k - 1 positions along each spatial axis.
        span = 2 * kwargs.get("kernel_size", 3) - 1
        return math.prod(min(1.0, span / n) for n in chunk_shape[1:])

    def supports(self, chunk_shape: ChunkShape) -> bool:
        return len(chunk_shape) == 1 + self.spatial_dims

    def build(
        self,
        chunk_shape: ChunkShape,
        hidden: int | None = None,
        kernel_size: int = 3,
        ratio: float = 1.0,
    ) -> nn.Module:
        c, h = chunk_shape[0], _width(chunk_shape, hidden, ratio)
        pad = kernel_size // 2
        return nn.Sequential(
            self.conv(c, h, kernel_size, padding=pad),
            nn.ReLU(),
            _zero_(self.conv(h, c, kernel_size, padding=pad)),
        )

    def param_cost(
        self,
        chunk_shape: ChunkShape,
        hidden: int | None = None,
        kernel_size: int = 3,
        ratio: float = 1.0,
    ) -> int:
        c, h = chunk_shape[0], _width(chunk_shape, hidden, ratio)
        taps = kernel_size**self.spatial_dims
        return 2 * c * h * taps + h + c


class Conv1dResidual(_ConvResidual):
    name, spatial_dims, conv = "conv1d_residual", 1, nn.Conv1d
    supports_text = "a 1-D feature map [C, L]"


class Conv2dResidual(_ConvResidual):
    name, spatial_dims, conv = "conv2d_residual", 2, nn.Conv2d
    supports_text = "a 2-D feature map [C, H, W]"


class _AsSignal(nn.Module):
    """Run ``body`` on ``[batch, L]`` features viewed as a one-channel signal ``[batch, 1, L]``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.body(h.unsqueeze(1)).squeeze(1)


class SignalConv1d(Blueprint):
    """``conv1d_residual`` on a flat chunk of ``L`` ordered features, read as a signal.

    ``d(h) = conv(H->1, k)(relu(conv(1->H, k)(h)))`` over the feature axis, second conv
    zeroed: ``H`` shift-equivariant feature detectors, so a seed on a flat input whose
    features are positions (a time series, e.g. MNIST-1D) adds the inductive bias a dense
    layer lacks.  Only meaningful where feature order means something, i.e. on inputs, not
    on hidden units.  Cost ``(H*k + H) + (H*k + 1)``; ``hidden`` defaults to 32.
    """

    name = "signal_conv1d"
    kind = "conv"
    supports_text = (
        "a flat chunk of ordered features [L] (a signal: an input such as MNIST-1D, "
        "not hidden units)"
    )

    def receptive_field(self, chunk_shape: ChunkShape, **kwargs: Any) -> float:
        return min(1.0, (2 * kwargs.get("kernel_size", 5) - 1) / chunk_shape[0])

    def supports(self, chunk_shape: ChunkShape) -> bool:
        return len(chunk_shape) == 1

    def build(self, chunk_shape: ChunkShape, hidden: int = 32, kernel_size: int = 5) -> nn.Module:
        return _AsSignal(Conv1dResidual().build((1, chunk_shape[0]), hidden, kernel_size))

    def param_cost(self, chunk_shape: ChunkShape, hidden: int = 32, kernel_size: int = 5) -> int:
        return Conv1dResidual().param_cost((1, chunk_shape[0]), hidden, kernel_size)


class SqueezeExcitationDelta(nn.Module):
    """``d(h) = h * tanh(g(mean_spatial(h)))``: a per-channel gain in ``(0, 2)`` once added."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU())
        self.out = _zero_(nn.Linear(hidden, channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pooled = h.flatten(2).mean(2) if h.dim() > 2 else h
        gain = torch.tanh(self.out(self.gate(pooled)))
        return h * gain.view(*gain.shape, *(1,) * (h.dim() - 2))


class SqueezeExcitation(Blueprint):
    """Squeeze-excitation gate; ``hidden`` defaults to ``ceil(C / reduction)``.

    Cost ``C*H + H + H*C + C``.
    """

    name = "se_gate"
    kind = "gate"

    def build(
        self, chunk_shape: ChunkShape, hidden: int | None = None, reduction: int = 4
    ) -> nn.Module:
        c = chunk_shape[0]
        return SqueezeExcitationDelta(c, _width(chunk_shape, hidden, 1 / reduction))

    def param_cost(
        self, chunk_shape: ChunkShape, hidden: int | None = None, reduction: int = 4
    ) -> int:
        c, h = chunk_shape[0], _width(chunk_shape, hidden, 1 / reduction)
        return 2 * c * h + h + c


class Widen(Blueprint):
    """``H`` new units of the host module, read from its input ``x`` and projected onto the
    chunk: ``d(x) = W2 relu(W1 x + b1) + b2`` with ``W2`` zeroed, so ``h + d(x)`` is the
    module made ``H`` units wider, the next layer reading the new units through ``W2``.

    On a flat module (``x: [F]``, chunk ``[C]``) ``W1`` is ``Linear(F, H)`` and ``W2``
    ``Linear(H, C)``; on a feature map (``x: [C_in, *S]``, chunk ``[C, *S]``, the same
    spatial size) ``W1`` is a ``kernel_size`` convolution (padding ``k // 2``) and ``W2`` a
    1x1 one.  ``hidden`` defaults to ``ratio`` (2) x the chunk's channels.  Cost
    ``F*H*k^n + H + H*C + C`` (``k^n = 1`` when flat).
    """

    name = "widen"
    kind = "mlp"
    reads_input = True
    supports_text = ("a module whose input has the chunk's layout: flat [F] -> [C], or a "
                     "feature map [C_in, *S] -> [C, *S] of the same spatial size")

    def receptive_field(self, chunk_shape: ChunkShape, input_shape: ChunkShape,
                        **kwargs: Any) -> float:
        return 1.0

    def supports(self, chunk_shape: ChunkShape, input_shape: ChunkShape) -> bool:
        same_layout = len(chunk_shape) == len(input_shape) and chunk_shape[1:] == input_shape[1:]
        return same_layout and 1 <= len(chunk_shape) <= 4  # flat, or 1-D to 3-D feature maps

    def build(
        self,
        chunk_shape: ChunkShape,
        input_shape: ChunkShape,
        hidden: int | None = None,
        ratio: float = 2.0,
        kernel_size: int = 3,
    ) -> nn.Module:
        c, f, h = chunk_shape[0], input_shape[0], _width(chunk_shape, hidden, ratio)
        spatial = len(chunk_shape) - 1
        if spatial == 0:
            return nn.Sequential(nn.Linear(f, h), nn.ReLU(), _zero_(nn.Linear(h, c)))
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial - 1]
        return nn.Sequential(
            conv(f, h, kernel_size, padding=kernel_size // 2), nn.ReLU(), _zero_(conv(h, c, 1))
        )

    def param_cost(
        self,
        chunk_shape: ChunkShape,
        input_shape: ChunkShape,
        hidden: int | None = None,
        ratio: float = 2.0,
        kernel_size: int = 3,
    ) -> int:
        c, f, h = chunk_shape[0], input_shape[0], _width(chunk_shape, hidden, ratio)
        taps = kernel_size ** (len(chunk_shape) - 1)
        return f * h * taps + h + h * c + c


_REGISTRY: Registry[Blueprint] = Registry("blueprint", "tamiyo.blueprints")


def register_blueprint(blueprint: Blueprint, *, replace: bool = False) -> Blueprint:
    """Make ``blueprint`` available by its ``name``; returns it (usable as a decorator result)."""
    if not isinstance(blueprint, Blueprint):
        raise BlueprintError(
            f"register_blueprint: expected a Blueprint instance, got {type(blueprint).__name__}"
        )
    if not blueprint.name:
        raise BlueprintError(f"register_blueprint: {type(blueprint).__name__} has no name")
    try:
        return _REGISTRY.register(blueprint.name, blueprint, replace=replace)
    except ValueError as exc:
        raise BlueprintError(str(exc)) from None


def unregister_blueprint(name: str) -> None:
    """Remove a user blueprint (tests and plugins that register temporarily)."""
    _REGISTRY.unregister(name)


def get_blueprint(name: str) -> Blueprint:
    # Registered names only, never a module:attr reference: checkpoint manifests name
    # blueprints too, and restoring one must not import whatever module it names.
    if name not in _REGISTRY:
        raise BlueprintError(
            f"unknown blueprint {name!r} (available: {', '.join(available_blueprints())})"
        )
    return _REGISTRY.get(name)


def available_blueprints() -> list[str]:
    return sorted(_REGISTRY.names())


for _builtin in (
    ResidualMLP(),
    LowRank(),
    Conv1dResidual(),
    Conv2dResidual(),
    SignalConv1d(),
    SqueezeExcitation(),
    Widen(),
):
    register_blueprint(_builtin)
