"""From one training batch's loss to the optimizer step: precision, accumulation, clipping.

* :class:`Precision` -- the forward pass's arithmetic on the run's device (``run.precision``):
  the autocast context and, for fp16, the gradient scaler;
* :class:`AccumulationWindows` -- how an epoch's batches group into optimizer steps
  (``optimizer.accumulate_batches``);
* :class:`BatchStepper` -- one batch's backward and, when it closes a window, the step:
  unscale, clip (``optimizer.clip_grad_value``, ``optimizer.clip_grad_norm``),
  ``optimizer.step()``, ``optimizer_manager.after_optimizer_step()``.

No host sync per batch (ARCHITECTURE §2 invariant 7): the clipped norm stays a tensor
nobody reads, and only fp16's scaler reads the device -- its inf check, once per step, on
CUDA.  The optimizer is never replaced (growth mutates its groups in place) and the scaler
reads the groups afresh at every step, so both simply carry on across a rebuild.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from tolaria.components import OptimizerManager
from tolaria.config import OptimizerConfig
from tolaria.errors import ConfigError

_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Reusable "no autocast" context: one object instead of one per batch.
_NO_AUTOCAST = contextlib.nullcontext()


class Precision:
    """``run.precision`` on ``device``; what the device cannot do is a ``ConfigError`` here,
    while the trainer is built, before the run directory exists."""

    def __init__(self, name: str, device: torch.device) -> None:
        if name == "fp16" and device.type != "cuda":
            raise ConfigError(
                f"run.precision='fp16' needs CUDA, the run is on {device.type}; use 'bf16' "
                "(float32's range, no gradient scaler) or 'fp32'"
            )
        if name == "bf16" and device.type == "cuda":
            with torch.cuda.device(device):
                supported = torch.cuda.is_bf16_supported()
            if not supported:
                raise ConfigError(
                    f"run.precision='bf16': {torch.cuda.get_device_name(device)} has no "
                    "bfloat16; use 'fp16' or 'fp32'"
                )
        self.name = name
        self.device_type = device.type
        self.dtype = _AUTOCAST_DTYPES[name]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of every forward pass, training and evaluation alike."""
        if self.dtype is None:
            return _NO_AUTOCAST
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for fp16, whose small gradients would underflow to zero without
        one; bf16 has float32's range and needs none."""
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


class AccumulationWindows:
    """An epoch's batches in windows of ``k``, one optimizer step each; the last window
    takes the batches left over, so no gradient crosses an epoch boundary and a snapshot
    there (rollback, checkpoint, resume) stays exact.

    Each batch's mean loss is weighted by its share of its window's samples, which makes a
    step over ``k`` batches of ``b`` samples the step over one batch of ``k * b`` (the loss
    must be a mean over the batch), a short last batch included.  The layout is the one
    ``tolaria.data.make_loaders`` builds: batches of ``batch_size``, the last one shorter.
    """

    def __init__(self, num_samples: int, batch_size: int, k: int) -> None:
        self.num_samples, self.batch_size, self.k = num_samples, batch_size, k
        self.batches = math.ceil(num_samples / batch_size)
        #: Optimizer steps per epoch: what the LR schedule and ``global_step`` count.
        self.steps_per_epoch = math.ceil(self.batches / k)

    def opens(self, batch: int) -> bool:
        return batch % self.k == 0

    def closes(self, batch: int) -> bool:
        return (batch + 1) % self.k == 0 or batch == self.batches - 1

    def weight(self, batch: int) -> float:
        """The factor of batch ``batch``'s mean loss: its samples / its window's samples."""
        start = batch - batch % self.k
        end = min(start + self.k, self.batches)
        window = self._samples_before(end) - self._samples_before(start)
        return (self._samples_before(batch + 1) - self._samples_before(batch)) / window

    def _samples_before(self, batch: int) -> int:
        return min(batch * self.batch_size, self.num_samples)


class BatchStepper:
    """Call it with each batch's loss, in the epoch's order: it runs the backward pass and,
    when the batch closes a window, the optimizer step; it returns whether it stepped.

    Clipping acts on the true gradients of every parameter the optimizer trains (unscaled
    first under fp16), the window's sum, just before the step.  A step the fp16 scaler skips
    (an inf or NaN gradient) still counts for the schedule, as in torch's AMP recipe: knowing
    would cost a sync.
    """

    def __init__(
        self,
        optimizer_manager: OptimizerManager,
        windows: AccumulationWindows,
        config: OptimizerConfig,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.optimizer_manager = optimizer_manager
        self.optimizer = optimizer_manager.get_optimizer()
        self.windows = windows
        self.clip_grad_norm = config.clip_grad_norm
        self.clip_grad_value = config.clip_grad_value
        #: Stateful (``state_dict``/``load_state_dict``): the trainer snapshots it when set.
        self.grad_scaler = grad_scaler
        self._weighted = windows.k > 1  # with k = 1 every weight is 1: skip the multiply

    def __call__(self, loss: torch.Tensor, batch: int) -> bool:
        windows = self.windows
        if windows.opens(batch):
            self.optimizer.zero_grad(set_to_none=True)
        if self._weighted:
            loss = loss * windows.weight(batch)
        if self.grad_scaler is not None:
            loss = self.grad_scaler.scale(loss)
        loss.backward()
        if not windows.closes(batch):
            return False
        self._clip()
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        self.optimizer_manager.after_optimizer_step()
        return True

    def _clip(self) -> None:
        if self.clip_grad_norm is None and self.clip_grad_value is None:
            return
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)  # the limits are for true gradients
        # Read at every step: a rebuild after growth edits the groups' parameter lists.
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.clip_grad_value is not None:
            nn.utils.clip_grad_value_(params, self.clip_grad_value)
        if self.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(params, self.clip_grad_norm)  # its returned norm: unread
