"""The trainer's side of the events: records stamped with their epoch and attempt.

``attempt`` counts how often an epoch has been started -- a rollback re-runs epochs -- so
every record says which run of its epoch it belongs to (``docs/events.md``).  A record
nobody listens to is never built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from tolaria import records
from tolaria.contracts import Adaptation
from tolaria.events import Callbacks


class Emitter:
    def __init__(self, trainer: Any, callbacks: Callbacks, epoch: Callable[[], int]) -> None:
        self.trainer, self.callbacks, self._epoch = trainer, callbacks, epoch
        self.attempts: dict[int, int] = {}  # epoch -> times it has been started

    def start(self, epoch: int) -> None:
        self.attempts[epoch] = self.attempts.get(epoch, 0) + 1

    def record(self, kind: type[records.EventRecord], **fields: Any) -> records.EventRecord:
        """``kind``'s record; ``epoch`` defaults to the trainer's current one."""
        fields.setdefault("epoch", self._epoch())
        return kind(attempt=self.attempts.get(fields["epoch"], 1), **fields)

    def __call__(self, kind: type[records.EventRecord], **fields: Any) -> None:
        if self.callbacks.listens(kind.kind):
            self.callbacks.emit(self.trainer, self.record(kind, **fields))

    def adaptations(self, adaptations: Iterable[Adaptation], **where: Any) -> None:
        for a in adaptations:
            self(records.AdaptationApplied, **vars(a), **where)

    def controller_event(self, kind: str, **fields: Any) -> None:
        """Tamiyo's sink: its decisions, outcomes and incidents become event records."""
        self(records.CONTROLLER_RECORDS[kind], **fields)

    def state_dict(self) -> tuple[int, ...]:
        """Attempts of epochs 0, 1, ...: a flat tuple of ints costs a snapshot no copy."""
        return tuple(self.attempts.get(e, 0) for e in range(1 + max(self.attempts, default=-1)))

    def load_state_dict(self, attempts: Iterable[int]) -> None:
        self.attempts = {epoch: n for epoch, n in enumerate(attempts) if n}
