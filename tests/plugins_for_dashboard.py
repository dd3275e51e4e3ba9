"""User code named by the dashboard's browser tests (``plugins_for_dashboard:...``)."""

from __future__ import annotations

import time

from tolaria.events import Callback


class SlowEpochs(Callback):
    """Sleeps after each epoch's records are written: a run a browser can watch advance."""

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds = seconds

    def on_epoch_end(self, trainer, record) -> None:
        time.sleep(self.seconds)
