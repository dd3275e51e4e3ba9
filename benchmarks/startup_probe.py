"""The child half of ``bench_startup``: a callback that notes when the first batch ended.

Named in the run's config (``run.callbacks``), so the measured process is the ordinary
``python -m tolaria train``; it imports nothing heavy, so it adds nothing to what it
measures.  It writes one JSON object to the file ``$TOLARIA_STARTUP_PROBE`` names.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

from tolaria.events import Callback

PROBE_ENV = "TOLARIA_STARTUP_PROBE"
#: Imports whose presence at the first batch tells where start-up time went.
WATCHED_MODULES = ("mnist1d", "matplotlib", "sklearn", "torch._dynamo", "tensorboard",
                   "torch.utils.tensorboard")


class FirstBatchClock(Callback):
    def __init__(self) -> None:
        self.done = False

    def on_batch_end(self, trainer, record) -> None:
        if self.done:
            return
        self.done = True
        usage = resource.getrusage(resource.RUSAGE_SELF)
        probe = {
            "first_batch_at": time.time(),  # wall clock: the parent's is the same clock
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "imported": [name for name in WATCHED_MODULES if name in sys.modules],
        }
        with open(os.environ[PROBE_ENV], "w") as file:
            json.dump(probe, file)
