"""The epoch lifecycle as events, and the callbacks that observe it.

Every point of the lifecycle is an :class:`Event`.  The trainer emits one typed record
(:mod:`tolaria.records`) per event to a :class:`Callbacks` list; a callback is any
object with ``on_<event>(trainer, record)`` methods -- subclass :class:`Callback` and
override the ones you need -- and, optionally, a catch-all ``on_event(trainer, record)``
for every event it has no method of its own for (``batch_end`` excepted).  The run
directory's files, TensorBoard, the progress display and the summary are callbacks like
any user's (Lightning's ``Callback`` and Composer's ``Event`` are the anchors; ours is
smaller).

Order within one epoch::

    epoch_start -> batch_end (per batch) -> train_end -> validation_end
    -> packet_assembled -> [decision_point, decision, outcome, growth_outcome, incident,
    germination_failed]
    -> signal_received -> adaptation (per seed command)
    -> rollback | (optimizer_rebuild, checkpoint_saved) -> epoch_end

framed by ``run_start`` and ``run_end``; ``resume`` comes before the first ``run_start``
of a resumed run.  Callbacks are called in registration order; they observe, and must not
change the model, the optimizer or the controller.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any

from tolaria.errors import CallbackError, TolariaError


class Event(enum.StrEnum):
    RUN_START = "run_start"
    EPOCH_START = "epoch_start"
    BATCH_END = "batch_end"
    TRAIN_END = "train_end"
    VALIDATION_END = "validation_end"
    PACKET_ASSEMBLED = "packet_assembled"
    #: Tamiyo's decision log and incident memory (emitted from inside ``tamiyo.step``).
    DECISION = "decision"
    OUTCOME = "outcome"
    INCIDENT = "incident"
    GERMINATION_FAILED = "germination_failed"
    #: The growth choice of an epoch and, once its graft is settled, what came of it.
    DECISION_POINT = "decision_point"
    GROWTH_OUTCOME = "growth_outcome"
    SIGNAL_RECEIVED = "signal_received"
    ADAPTATION = "adaptation"
    ROLLBACK = "rollback"
    OPTIMIZER_REBUILD = "optimizer_rebuild"
    CHECKPOINT_SAVED = "checkpoint_saved"
    EPOCH_END = "epoch_end"
    RESUME = "resume"
    RUN_END = "run_end"


class Callback:
    """Base class with a no-op ``on_<event>`` per :class:`Event`; override what you need.

    Each method receives the trainer and the event's record.  Only overridden methods are
    ever called, so a callback that does not override ``on_batch_end`` costs the training
    loop nothing.
    """

    def on_run_start(self, trainer: Any, record: Any) -> None: ...
    def on_epoch_start(self, trainer: Any, record: Any) -> None: ...
    def on_batch_end(self, trainer: Any, record: Any) -> None: ...
    def on_train_end(self, trainer: Any, record: Any) -> None: ...
    def on_validation_end(self, trainer: Any, record: Any) -> None: ...
    def on_packet_assembled(self, trainer: Any, record: Any) -> None: ...
    def on_decision(self, trainer: Any, record: Any) -> None: ...
    def on_outcome(self, trainer: Any, record: Any) -> None: ...
    def on_incident(self, trainer: Any, record: Any) -> None: ...
    def on_germination_failed(self, trainer: Any, record: Any) -> None: ...
    def on_decision_point(self, trainer: Any, record: Any) -> None: ...
    def on_growth_outcome(self, trainer: Any, record: Any) -> None: ...
    def on_signal_received(self, trainer: Any, record: Any) -> None: ...
    def on_adaptation(self, trainer: Any, record: Any) -> None: ...
    def on_rollback(self, trainer: Any, record: Any) -> None: ...
    def on_optimizer_rebuild(self, trainer: Any, record: Any) -> None: ...
    def on_checkpoint_saved(self, trainer: Any, record: Any) -> None: ...
    def on_epoch_end(self, trainer: Any, record: Any) -> None: ...
    def on_resume(self, trainer: Any, record: Any) -> None: ...
    def on_run_end(self, trainer: Any, record: Any) -> None: ...


def _listener(callback: object, event: Event) -> Callable[..., None] | None:
    """What ``callback`` wants called for ``event``: its own ``on_<event>``, else its
    catch-all ``on_event`` -- except for ``batch_end``, which a callback must ask for by
    name, so that a catch-all never puts a call into every training step."""
    name = f"on_{event.value}"
    method = getattr(callback, name, None)
    if method is not None and getattr(type(callback), name, None) is not getattr(Callback, name):
        return method
    if event is Event.BATCH_END:
        return None
    return getattr(callback, "on_event", None)


class Callbacks:
    """The trainer's callbacks, indexed by event once so dispatch is a list walk."""

    def __init__(self, callbacks: Iterable[object] = ()) -> None:
        self.callbacks = list(callbacks)
        self._listeners: dict[Event, list[Callable[..., None]]] = {
            event: [m for cb in self.callbacks if (m := _listener(cb, event)) is not None]
            for event in Event
        }

    def listens(self, event: Event) -> bool:
        """True if any callback overrides ``on_<event>``: the trainer skips building the
        record of an event nobody listens to (``batch_end``, in the hot loop)."""
        return bool(self._listeners[event])

    def emit(self, trainer: Any, record: Any) -> None:
        for method in self._listeners[record.kind]:
            try:
                method(trainer, record)
            except TolariaError:
                raise
            except Exception as exc:  # a bug in a callback: one line naming it, not a trace
                raise CallbackError(
                    f"callback {method.__module__}:{method.__qualname__} raised "
                    f"{type(exc).__name__} at {record.kind.value} of epoch {record.epoch}: {exc}"
                ) from exc

    def __iter__(self):
        return iter(self.callbacks)
