"""``KasminaSeed``: one chunk's watcher, and the lifecycle of the blueprint it may graft.

The forward of a chunk ``h`` (``d`` is the blueprint's delta module)::

    DORMANT, CULLED, GERMINATED    h
    TRAINING                       h, with d(h') receiving h's gradient    h' = h.detach()
    BLENDING                       h + alpha * d(h')               alpha ramps 0 -> 1
    PROBATIONARY                   h + d(h')                       alpha = 1
    FOSSILIZED                     h + d(h)                        part of the host

TRAINING is straight-through: the value is the host's, so the host's output and its
gradients are exactly what they would be without the seed, while ``d`` receives the loss
gradient at the host output.  (A custom autograd function, not ``h + (d - d.detach())``:
that evaluates to NaN wherever ``d`` overflows, letting a seed on trial poison the host.)
Until FOSSILIZED the seed's input is detached, so a seed on trial never changes the
host's gradients through its own input path.

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
from tolaria.kasmina.blueprints import get_blueprint

if TYPE_CHECKING:
    from tolaria.kasmina.layer import KasminaLayer


class _StraightThrough(torch.autograd.Function):
    """Forward: the host chunk ``h`` exactly.  Backward: ``h``'s gradient goes to both."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        ctx.d_dtype = d.dtype
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, grad.to(ctx.d_dtype)


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
        self.state = SeedState.DORMANT
        self.alpha = 0.0
        self.register_module("blueprint", None)
        self.blueprint_name: str | None = None
        self.blueprint_kwargs: dict[str, Any] = {}
        self.chunk_shape: tuple[int, ...] | None = None
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
        self._hold(self.build_blueprint(blueprint, kwargs))
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

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        state, delta = self.state, self.blueprint
        if delta is None or self.ablated or state is SeedState.GERMINATED:
            return h
        if state is SeedState.FOSSILIZED:
            return h + delta(h)
        d = delta(h.detach())
        if state is SeedState.TRAINING:
            if self.training:
                self._watch_size(d)
            return _StraightThrough.apply(h, d)
        if state is SeedState.BLENDING:
            return h + self.alpha * d
        return h + d  # PROBATIONARY

    @torch.no_grad()
    def _watch_size(self, d: torch.Tensor) -> None:
        """Accumulate the delta's energy and size.  In TRAINING the delta never reaches the
        loss, so nothing stops it growing; the controller checks it before blending."""
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
        if not blueprint.supports(self.chunk_shape):
            raise BlueprintError(f"{where} does not support chunk shape {self.chunk_shape}")
        try:
            module = blueprint.build(self.chunk_shape, **kwargs)
            module.to(device=self._probe.device, dtype=self._probe.dtype)
            # Batch of 2: blueprints with batch statistics refuse a batch of one.
            probe = self._probe.new_zeros(2, *self.chunk_shape)
            with torch.no_grad():
                out = module(probe)
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
        self._hold(blueprint)
        self.state = SeedState(record["state"])
        self.alpha = float(record["alpha"])
        self.blueprint_name = record["blueprint"]
        self.blueprint_kwargs = dict(record["blueprint_kwargs"])
        self.epochs_in_state = int(record["epochs_in_state"])
        self.clock = int(record["clock"])
        self.history = [TransitionRecord.from_dict(r) for r in record["history"]]

    def _hold(self, blueprint: nn.Module | None) -> None:
        """Every change of ``blueprint`` goes through here so the layer's fast path knows."""
        self.blueprint = blueprint
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
