"""The seams: events in lifecycle order, versioned records, callbacks from the config."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from plugins_for_seams import EventRecorder
from tolaria import records
from tolaria.build import build_trainer
from tolaria.config import CallbackConfig
from tolaria.errors import TolariaError
from tolaria.events import Callback, Callbacks, Event

# The tiny job never plateaus in two epochs: each epoch is one decision point, a wait.
EPOCH = [
    Event.EPOCH_START, Event.TRAIN_END, Event.VALIDATION_END, Event.PACKET_ASSEMBLED,
    Event.DECISION_POINT, Event.SIGNAL_RECEIVED,
]


def kinds(recorder: EventRecorder, *, batches: bool = False) -> list[Event]:
    return [r.kind for r in recorder.records if batches or r.kind is not Event.BATCH_END]


def test_a_callback_sees_every_event_in_lifecycle_order(tiny_config, tiny_data, tmp_path):
    tiny_config.run.epochs = 2
    tiny_config.checkpoint.every_epochs = 1
    recorder = EventRecorder()
    trainer = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run",
                            callbacks=[recorder])
    trainer.train()
    seen = kinds(recorder)
    one_epoch = [*EPOCH, Event.EPOCH_END, Event.CHECKPOINT_SAVED]
    assert seen == [Event.RUN_START, *one_epoch, *one_epoch, Event.RUN_END]
    batches = [r for r in recorder.records if r.kind is Event.BATCH_END]
    assert len(batches) == 2 * len(trainer.train_loader)
    assert [b.global_step for b in batches] == list(range(1, len(batches) + 1))


def test_rollback_and_resume_are_events_and_re_run_epochs_carry_their_attempt(
    tiny_config, tiny_data, tmp_path
):
    tiny_config.run.epochs = 3
    tiny_config.checkpoint.every_epochs = 1
    recorder = EventRecorder()
    trainer = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run",
                            callbacks=[recorder])
    poisoned = []

    def poison(module, args):  # the first training batch of epoch 1 turns to NaN, once
        if module.training and trainer.current_epoch == 1 and not poisoned:
            poisoned.append(True)
            return (args[0] * math.nan,)
        return None

    trainer.model.register_forward_pre_hook(poison)
    trainer.train()
    seen = kinds(recorder)
    rollback = seen.index(Event.ROLLBACK)
    assert seen[rollback - 1] is Event.SIGNAL_RECEIVED  # no rebuild, no checkpoint
    assert seen[rollback + 1] is Event.EPOCH_END
    ends = [r for r in recorder.records if r.kind is Event.EPOCH_END]
    assert [(e.epoch, e.attempt, e.rollback) for e in ends] == [
        (0, 1, False), (1, 1, True), (1, 2, False), (2, 1, False),
    ]

    # On disk: the failed attempt's loss is null with its flag, and the attempts tell which
    # line won; a resume is an event too, before the resumed run's run_start.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    failed = json.loads(lines[1])
    assert failed["schema"] == records.SCHEMA_VERSION and failed["event"] == "epoch_end"
    assert failed["train_loss"] is None and failed["nonfinite"]["train_loss"] == "nan"
    assert math.isnan(records.decode(lines[1])["train_loss"])
    (tmp_path / "run" / "summary.json").unlink()
    resumed = EventRecorder()
    again = build_trainer(tiny_config, data=tiny_data, run_dir=trainer.run_dir,
                          callbacks=[resumed])
    trainer.run_dir.lock.acquire()
    again.resume()
    again.train()
    assert kinds(resumed) == [Event.RESUME, Event.RUN_START, Event.RUN_END]
    assert resumed.records[0].checkpoint_epoch == 2


def test_batch_records_are_built_only_for_a_listener():
    class EpochsOnly(Callback):
        def on_epoch_end(self, trainer, record):
            pass

    class CatchAll:
        def on_event(self, trainer, record):
            pass

    assert not Callbacks([EpochsOnly(), CatchAll()]).listens(Event.BATCH_END)
    assert Callbacks([EventRecorder()]).listens(Event.BATCH_END)
    assert Callbacks([CatchAll()]).listens(Event.RESUME)


def test_callbacks_named_in_the_config_are_built_with_their_kwargs(tiny_config, tiny_data):
    tiny_config.run.epochs = 1
    tiny_config.run.callbacks = [
        "plugins_for_seams:EventRecorder",
        {"name": "plugins_for_seams:EventRecorder", "kwargs": {"tag": "second"}},
    ]
    assert all(isinstance(c, CallbackConfig) for c in tiny_config.run.callbacks)
    trainer = build_trainer(tiny_config, data=tiny_data)
    first, second = [c for c in trainer.callbacks if isinstance(c, EventRecorder)]
    assert second.tag == "second"
    trainer.train()
    assert kinds(first)[-1] is Event.RUN_END and kinds(second) == kinds(first)


def test_records_write_non_finite_numbers_as_null_and_refuse_a_newer_schema():
    line = records.encode({"a": math.inf, "b": [1.0, -math.inf], "c": {"d": math.nan}})
    data = json.loads(line)  # strict JSON
    assert data["a"] is None and data["b"] == [1.0, None]
    assert data["nonfinite"] == {"a": "inf", "b.1": "-inf", "c.d": "nan"}
    back = records.decode(line)
    assert back["a"] == math.inf and back["b"][1] == -math.inf and math.isnan(back["c"]["d"])
    with pytest.raises(TolariaError, match="schema 99 is newer"):
        records.decode(json.dumps({"schema": 99, "event": "epoch_end"}))


def test_importing_the_trainer_loads_no_display_monitor_or_academy():
    code = (
        "import sys, tolaria.trainer; "
        "print(sorted(m for m in sys.modules if m.startswith(('tolaria.monitor', "
        "'tolaria.academy', 'tolaria.progress', 'rich.progress', 'torch.utils.tensorboard', "
        "'torchmetrics'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_status_json_follows_the_run(tiny_config, tiny_data, tmp_path):
    tiny_config.run.epochs = 2
    phases = []

    class Watch(Callback):
        def on_train_end(self, trainer, record):
            phases.append(json.loads((tmp_path / "run" / "status.json").read_text()))

    build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run",
                  callbacks=[Watch()]).train()
    # Written before the user's callback runs: the run directory's callbacks come first.
    assert [(p["phase"], p["epoch"]) for p in phases] == [("validating", 0), ("validating", 1)]
    final = json.loads((tmp_path / "run" / "status.json").read_text())
    assert final["phase"] == "completed" and final["pid"] > 0 and final["heartbeat"] > 0
