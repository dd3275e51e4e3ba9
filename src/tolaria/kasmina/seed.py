"""``KasminaSeed``: one chunk's watcher, and the lifecycle of the blueprint it may graft.

The forward of a chunk ``h`` (``d`` is the blueprint's delta module, reading the chunk
``s = h`` -- or, for a blueprint that ``reads_input``, the host module's input ``s = x``)::

    DORMANT, CULLED, GERMINATED    h
    TRAINING                       h, while d(s') learns -c g      s' = s.detach()
    BLENDING                       h + alpha * d(s')               alpha ramps 0 -> 1
    PROBATIONARY                   h + d(s')                       alpha = 1
    FOSSILIZED                     h + d(s)                        part of the host

TRAINING leaves the host exactly as it is: the value is ``h``, and ``h``'s gradient is the
host's own, so the host's outputs and gradients are bitwise what they would be without the
seed.  The seed learns a functional-gradient target meanwhile.  With ``g = dL/dh`` the
loss gradient at its chunk, ``d`` minimises

    <g, d> + ||d||^2 / (2c),     gradient g + d / c,     minimiser d* = -c g,

the step of functional gradient descent on the loss that ``d`` would take if added, with
a finite optimum.  (Without the quadratic term ``d`` follows ``-g`` without bound: grafts
measured 2.6-50x their layer's RMS, and blended in they wrecked the host.)  ``c`` makes
``rms(d*) = kasmina.target_delta_ratio * rms(h)``, i.e. ``c = ratio * rms(h) / rms(g)``: a
correction at the chunk's own scale, whatever the scale of the loss or the learning rate.
``rms(h)`` and ``rms(g)`` are the chunk's telemetry of the epoch before (``pull = 1 / c``,
set by the layer's flush): a constant within the epoch, so the seed's gradient is linear in
``g`` and the same sum over any split of the batch -- several ranks train it exactly as one
process does.  Without telemetry the current batch measures them.  At ``d = 0`` the seed's
gradient is ``g``.

A custom autograd function gives all this (not ``h + (d - d.detach())``, which evaluates
to NaN wherever ``d`` overflows, letting a seed on trial poison the host).  Until
FOSSILIZED the seed's input is detached, so a seed on trial never changes the host's
gradients through its own input path.

Epoch counting is order-independent: a state entered at epoch boundary ``e`` has lived
no epoch yet, so ``on_epoch_end(e)`` does not count for it; each later, distinct
``on_epoch_end(e')`` counts once.  Controllers may therefore call ``transition`` before or
after ``on_epoch_end`` in the same step, and a repeated call is harmless.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tolaria.config import KasminaConfig
from tolaria.contracts import LEGAL_TRANSITIONS, SeedState, TransitionRecord
from tolaria.errors import BlueprintError, IllegalTransitionError
from tolaria.kasmina.blueprints import blueprint_shapes, get_blueprint

if TYPE_CHECKING:
    from tolaria.kasmina.layer import KasminaLayer


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().square().mean().sqrt()


class _FunctionalGradient(torch.autograd.Function):
    """Forward: the host chunk ``h`` exactly.  Backward: ``h``'s gradient ``g`` goes to ``h``
    unchanged; ``d`` receives ``g + pull * d`` with ``pull = 1 / c``: the gradient of
    ``<g, d> + ||d||^2 / (2c)``, whose minimiser is ``d* = -c g`` (see ``KasminaSeed``).
    ``pull`` None: measured on this batch, ``rms(g) / (ratio * rms(h))``."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, d: torch.Tensor, pull: float | None,
                ratio: float) -> torch.Tensor:
        ctx.save_for_backward(d)
        ctx.pull = pull
        ctx.scale = ratio * _rms(h) if pull is None else None  # c * rms(g)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        (d,) = ctx.saved_tensors
        pull = ctx.pull
        if pull is None:
            # A chunk of zeros gives no scale: no pull.  torch.where, not an if: no host sync.
            scale = ctx.scale
            pull = torch.where(scale > 0, _rms(grad) / scale, torch.zeros_like(scale))
            pull = pull.to(d.dtype)
        return grad, grad.to(d.dtype) + d.detach() * pull, None, None


def blend_alpha(progress: float, schedule: str) -> float:
    """The blending ramp at ``progress`` in [0, 1]: linear ``t`` or cosine ``(1 - cos pi t)/2``."""
    t = min(max(progress, 0.0), 1.0)
    return t if schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * t))


class KasminaSeed(nn.Module):
    """Watches one chunk of a host output and carries at most one blueprint through trial.

    ``alpha`` during the ``k``-th epoch of BLENDING (``k = 1..blend_epochs``) is
    ``ramp(k / blend_epochs)``; it is 0 before BLENDING and 1 after.
    """

    def __init__(self, seed_id: str, config: KasminaConfig) -> None:
        super().__init__()
        self.seed_id = seed_id
        self.blend_epochs = config.blend_epochs
        self.blend_schedule = config.blend_schedule
        self.embargo_epochs = config.embargo_epochs
        self.target_delta_ratio = config.target_delta_ratio
        #: ``1 / c`` of the TRAINING objective, from the last epoch's telemetry (None: none).
        self.pull: float | None = None
        self.state = SeedState.DORMANT
        self.alpha = 0.0
        self.register_module("blueprint", None)
        self.blueprint_name: str | None = None
        self.blueprint_kwargs: dict[str, Any] = {}
        self.chunk_shape: tuple[int, ...] | None = None
        #: Per-sample shape of the host module's input (what a ``reads_input`` delta reads).
        self.input_shape: tuple[int, ...] | None = None
        #: Whether the held blueprint reads the module's input (``Blueprint.reads_input``).
        self.reads_input = False
        self.epochs_in_state = 0
        #: The last epoch boundary this seed has accounted for (entered a state or counted).
        self.clock = -1
        self.history: list[TransitionRecord] = []
        self.ablated = False
        # Sum of squares and count of the delta's elements over this epoch's TRAINING
        # batches, on the device (read once per epoch by the layer's telemetry flush).
        self._delta_energy: torch.Tensor | None = None
        # Follows model.to(device/dtype) without entering the state_dict: where blueprints go.
        self.register_buffer("_probe", torch.empty(0), persistent=False)

    # -- lifecycle -------------------------------------------------------------------

    def germinate(self, blueprint: str, *, epoch: int, reason: str = "", **kwargs: Any) -> None:
        """DORMANT -> GERMINATED holding ``blueprint`` built for this chunk.

        Raises ``BlueprintError`` (the seed stays DORMANT) if the blueprint is unknown,
        does not support the chunk, fails to build, or its output shape differs.
        """
        self._check_legal(SeedState.GERMINATED)
        module = self.build_blueprint(blueprint, kwargs)
        self.reads_input = get_blueprint(blueprint).reads_input
        self._hold(module)
        self.blueprint_name, self.blueprint_kwargs = blueprint, dict(kwargs)
        self._enter(SeedState.GERMINATED, epoch, reason)

    def transition(self, to: SeedState, *, epoch: int, reason: str) -> None:
        """Move to ``to`` along a legal edge; entering CULLED deletes the blueprint."""
        to = SeedState(to)
        self._check_legal(to)
        if to is SeedState.GERMINATED:
            raise IllegalTransitionError(
                f"seed {self.seed_id}: use germinate(blueprint, ...) to leave DORMANT"
            )
        self._enter(to, epoch, reason)

    def on_epoch_end(self, epoch: int) -> None:
        """Count a lived epoch: advance the blending ramp, release a CULLED seed after embargo."""
        if epoch > self.clock:
            self.epochs_in_state += 1
            self.clock = epoch
        if self.state is SeedState.BLENDING:
            self.alpha = self._blend_alpha()
        elif self.state is SeedState.CULLED and self.epochs_in_state >= self.embargo_epochs:
            self._enter(SeedState.DORMANT, epoch, f"embargo of {self.embargo_epochs} epochs over")

    def param_count(self) -> int:
        return 0 if self.blueprint is None else sum(p.numel() for p in self.blueprint.parameters())

    @property
    def layer(self) -> KasminaLayer:
        """The ``KasminaLayer`` holding this seed (telemetry is flushed per layer)."""
        return self._layer

    # -- forward ---------------------------------------------------------------------

    def forward(self, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """``h``: the chunk; ``x``: the host module's input (read by a ``reads_input`` delta)."""
        state, delta = self.state, self.blueprint
        if delta is None or self.ablated or state is SeedState.GERMINATED:
            return h
        source = x if self.reads_input else h
        if state is SeedState.FOSSILIZED:
            return h + delta(source)
        d = delta(source.detach())
        if state is SeedState.TRAINING:
            if self.training:
                self._watch_size(d)
            return _FunctionalGradient.apply(h, d, self.pull, self.target_delta_ratio)
        if state is SeedState.BLENDING:
            return h + self.alpha * d
        return h + d  # PROBATIONARY

    @torch.no_grad()
    def _watch_size(self, d: torch.Tensor) -> None:
        """Accumulate the delta's energy and size: the controller checks it before blending
        (the target keeps it near ``target_delta_ratio``; a blueprint that cannot fit the
        target, or a user's objective, may still outgrow the chunk)."""
        energy = torch.stack((d.float().square().sum(), d.new_tensor(d.numel(), dtype=torch.float)))
        if self._delta_energy is None or self._delta_energy.device != energy.device:
            self._delta_energy = torch.zeros(2, dtype=torch.float64, device=energy.device)
        self._delta_energy += energy

    def flush_delta_ratio(self, reference_rms: float) -> float | None:
        """RMS of the delta in this epoch's TRAINING batches over ``reference_rms`` (the
        layer's activation RMS), then reset; None if the seed did not train.  The whole
        layer is the yardstick, not the chunk: a dead chunk has RMS 0 and is where growth
        is most wanted."""
        if self._delta_energy is None:
            return None
        delta_sq, count = self._delta_energy.tolist()
        self._delta_energy = None
        delta_rms = math.sqrt(delta_sq / count) if count else 0.0
        if delta_rms == 0.0:
            return 0.0
        return delta_rms / reference_rms if reference_rms > 0 else math.inf

    # -- internals shared with structure replay ---------------------------------------

    @torch.inference_mode(False)  # parameters made under inference mode could never train
    def build_blueprint(self, name: str, kwargs: dict[str, Any]) -> nn.Module:
        """Build ``name`` for this chunk on the host's device/dtype and check its output shape."""
        where = f"seed {self.seed_id}: blueprint {name!r}"
        if self.chunk_shape is None:
            raise BlueprintError(
                f"{where}: the chunk shape is unknown; run one forward pass before germinating"
            )
        blueprint = get_blueprint(name)
        try:
            json.dumps(kwargs)
        except TypeError:
            raise BlueprintError(f"{where}: kwargs {kwargs!r} are not plain JSON") from None
        shapes = blueprint_shapes(blueprint, self.chunk_shape, self.input_shape)
        if shapes is None:
            raise BlueprintError(
                f"{where} reads its module's input, whose shape is unknown; run one forward "
                "pass of the host before germinating"
            )
        if not blueprint.supports(*shapes):
            read = "chunk shape" if len(shapes) == 1 else "chunk and input shapes"
            raise BlueprintError(f"{where} does not support {read} {', '.join(map(str, shapes))}")
        try:
            module = blueprint.build(*shapes, **kwargs)
            module.to(device=self._probe.device, dtype=self._probe.dtype)
            # Batch of 2: blueprints with batch statistics refuse a batch of one.
            probe = self._probe.new_zeros(2, *self.chunk_shape)
            with torch.no_grad():
                out = module(self._probe.new_zeros(2, *shapes[-1]))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise BlueprintError(f"{where} cannot be built with {kwargs!r}: {exc}") from None
        if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
            got = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BlueprintError(
                f"{where} outputs per-sample shape {got}, but its chunk is {self.chunk_shape}"
            )
        return module

    def restore(self, record: dict[str, Any], blueprint: nn.Module | None) -> None:
        """Set every structural field from an ``export_structure`` record (no transition)."""
        name = record["blueprint"]
        self.reads_input = blueprint is not None and get_blueprint(name).reads_input
        self._hold(blueprint)
        self.state = SeedState(record["state"])
        self.alpha = float(record["alpha"])
        self.blueprint_name = record["blueprint"]
        self.blueprint_kwargs = dict(record["blueprint_kwargs"])
        self.epochs_in_state = int(record["epochs_in_state"])
        self.pull = record.get("pull")  # absent: a manifest from before the TRAINING target
        self.clock = int(record["clock"])
        self.history = [TransitionRecord.from_dict(r) for r in record["history"]]

    def _hold(self, blueprint: nn.Module | None) -> None:
        """Every change of ``blueprint`` goes through here so the layer's fast path knows."""
        self.blueprint = blueprint
        if blueprint is None:
            self.reads_input = False
        layer = self.__dict__.get("_layer")
        if layer is not None:
            layer.refresh_grafted()

    def _check_legal(self, to: SeedState) -> None:
        if to not in LEGAL_TRANSITIONS[self.state]:
            legal = ", ".join(s.name for s in LEGAL_TRANSITIONS[self.state]) or "none"
            raise IllegalTransitionError(
                f"seed {self.seed_id}: {self.state.name} -> {to.name} is not a legal transition "
                f"(legal from {self.state.name}: {legal})"
            )

    def _enter(self, to: SeedState, epoch: int, reason: str) -> None:
        self.history.append(TransitionRecord(epoch, self.state, to, reason, self.blueprint_name))
        self.state, self.epochs_in_state, self.clock = to, 0, epoch
        if to is SeedState.CULLED:
            self._hold(None)
            self.blueprint_name, self.blueprint_kwargs = None, {}
        if to is SeedState.BLENDING:
            self.alpha = self._blend_alpha()
        elif to in (SeedState.PROBATIONARY, SeedState.FOSSILIZED):
            self.alpha = 1.0
        else:
            self.alpha = 0.0

    def _blend_alpha(self) -> float:
        return blend_alpha((self.epochs_in_state + 1) / self.blend_epochs, self.blend_schedule)

    def extra_repr(self) -> str:
        return f"{self.seed_id}, {self.state.name}, alpha={self.alpha:.3f}"
