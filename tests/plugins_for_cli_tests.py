"""User code that fails, named as ``module:function`` by test_cli_hardening.py."""

from __future__ import annotations

from tolaria.events import Callback


def raising_dataset():
    raise ValueError("boom")


def raising_host(input_shape, num_classes):
    raise RuntimeError("no such layer")


def interrupted_dataset():
    """As if Ctrl-C came while the data is made: before any run directory exists."""
    raise KeyboardInterrupt


class InterruptAt(Callback):
    """Ctrl-C at a chosen point of a run: when ``event`` fires for ``epoch``."""

    def __init__(self, event: str, epoch: int) -> None:
        self.event, self.epoch = event, epoch

    def on_event(self, trainer, record) -> None:
        if record.kind == self.event and record.epoch == self.epoch:
            raise KeyboardInterrupt


class FailsAtEpoch(Callback):
    """A callback with a bug: its ``on_epoch_end`` raises at ``epoch``."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_epoch_end(self, trainer, record) -> None:
        if record.epoch == self.epoch:
            raise ValueError("boom")
