"""The run directory: everything a run leaves behind for the researcher, kept live.

```
<run_dir>/
  config.yaml      the resolved configuration (what `tolaria resume` rebuilds from)
  metrics.jsonl    one epoch_end record per epoch run (docs/events.md)
  events.jsonl     every decision, outcome, adaptation, incident, rollback, checkpoint
  status.json      phase, epoch, heartbeat, pid, host: rewritten as the run goes
  metrics.csv      one row per epoch run, for a spreadsheet (tolaria.csv_logger)
  mlflow.json      the MLflow run this one logs to, so a resume continues it
  tensorboard/     scalars for `tensorboard --logdir <run_dir>`
  checkpoints/     durable checkpoints (see tolaria.checkpoint)
  summary.json     written when the run ends
  .lock            held (flock) by the one process writing this directory
```

A run directory has one writer: :class:`RunDirectory` takes an exclusive lock when it is
created or opened and holds it until :meth:`RunDirectory.close`.  A second ``train`` or
``resume`` is refused with one line naming the holder; the kernel drops the lock of a
process that dies, so a stale lock of a killed run is simply taken over.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tolaria import records
from tolaria.atomic import write_atomic
from tolaria.checkpoint import CheckpointStore
from tolaria.components import SnapshotStore
from tolaria.config import TolariaConfig, load_config
from tolaria.errors import CheckpointError, ConfigError, RunDirectoryInUse, RunWriteError
from tolaria.events import Callback
from tolaria.loggers import make_loggers

LOCK_FILE = ".lock"
STATUS_FILE = "status.json"
#: What a run writes besides ``config.yaml`` (which ``--overwrite`` replaces last, atomically,
#: so the folder never holds records without the config they came from).
RUN_OUTPUTS = ("metrics.jsonl", "events.jsonl", STATUS_FILE, "summary.json", "curves.png",
               "metrics.csv", "mlflow.json", "tensorboard", "checkpoints", "export")
#: Seconds between heartbeats inside an epoch (a dashboard calls a run stalled after a few).
HEARTBEAT_S = 5.0


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock``, which also names its holder."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_FILE
        self._file = None

    def acquire(self) -> None:
        file = open(self.path, "a+")  # noqa: SIM115 -- held open for the run's life
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise RunDirectoryInUse(
                f"{self.path.parent} is in use by {holder}; wait for it to end or stop it"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


class RunDirectory:
    """Owns the files of one run.  ``create`` refuses a folder that already holds a run."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.checkpoint_dir = self.path / "checkpoints"
        self.lock = RunLock(self.path)
        #: Why writing stopped (see ``_write``); None while every write succeeds.
        self.write_failure: str | None = None

    @classmethod
    def create(cls, path: Path, config: TolariaConfig) -> RunDirectory:
        run = cls.claim(path)  # before the check: two `train --run-dir D` at once, one wins
        try:
            cls.check_free(run.path)
            run.write_config(config)
        except BaseException:
            run.close()
            raise
        return run

    @classmethod
    def claim(cls, path: Path) -> RunDirectory:
        """``path`` (made if missing), locked before anything in it is read or changed."""
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot create the run directory ({exc.strerror})") from None
        run = cls(path)
        run.take()
        return run

    def replace(self, config: TolariaConfig) -> None:
        """Start this folder over with ``config`` (``train --overwrite``): what an earlier run
        wrote is removed, nothing else.  The caller holds the lock."""
        try:
            for name in RUN_OUTPUTS:
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"{self.path}: cannot remove the previous run's {exc.filename} ({exc.strerror})"
            ) from None
        self.write_config(config)

    @staticmethod
    def check_free(path: Path) -> None:
        if (Path(path) / "config.yaml").exists():
            raise ConfigError(
                f"{path} already holds a run; continue it with `tolaria resume {path}`, "
                "replace it with --overwrite or choose another --run-dir"
            )

    @classmethod
    def open_existing(cls, path: Path, *, lock: bool = True) -> tuple[RunDirectory, TolariaConfig]:
        """An earlier run's folder (locked, unless only read) and the configuration it ran
        with."""
        path = Path(path)
        config_file = path / "config.yaml"
        if not config_file.exists():
            raise ConfigError(f"{path}: not a run directory (no config.yaml)")
        run = cls(path)
        if lock:
            run.take()
        try:
            return run, load_config(config_file)
        except BaseException:
            run.close()
            raise

    def take(self) -> None:
        """Become the directory's one writer, and clear what a killed writer left half-done
        (temporary files of atomic writes: nobody else can be writing them now)."""
        self.lock.acquire()
        for temp in self.path.glob(".*.tmp-*"):
            temp.unlink(missing_ok=True)

    @staticmethod
    def default_path(config: TolariaConfig) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return Path(config.run.runs_root) / f"{config.run.name}-{stamp}"

    # -- streams -------------------------------------------------------------------------
    def log_metrics(self, record: dict[str, Any]) -> None:
        self._append("metrics.jsonl", record)

    def log_event(self, record: dict[str, Any]) -> None:
        self._append("events.jsonl", {**record, "time": time.time()})

    def metrics(self) -> list[dict[str, Any]]:
        return self._read("metrics.jsonl")

    def events(self) -> list[dict[str, Any]]:
        return self._read("events.jsonl")

    def rewind(self, last_epoch: int) -> None:
        """Forget the records of epochs after ``last_epoch``: a resumed run runs them again,
        and must log no decision or outcome twice."""
        for name in ("metrics.jsonl", "events.jsonl"):
            kept = [r for r in self._read(name) if r.get("epoch", last_epoch) <= last_epoch]
            self.write_text(name, "".join(records.encode(r) + "\n" for r in kept))

    def write_config(self, config: TolariaConfig) -> None:
        self.write_text("config.yaml", config.to_yaml())

    def write_text(self, name: str, text: str) -> None:
        """``name`` replaced whole by ``text``, atomically."""
        self._write(name, lambda path: write_atomic(path, text))

    def append_line(self, name: str, line: str) -> None:
        """``line`` added to ``name`` in one write, flushed at once: a killed run keeps every
        complete line (and a reader drops a last one without its newline)."""

        def append(path: Path) -> None:
            with open(path, "a") as stream:
                stream.write(line + "\n")

        self._write(name, append)

    def write_summary(self, summary: dict[str, Any]) -> None:
        text = records.encode(summary, indent=2) + "\n"
        self._write("summary.json", lambda path: write_atomic(path, text))

    def write_status(self, status: dict[str, Any]) -> None:
        text = records.encode(status, indent=2) + "\n"
        self._write(STATUS_FILE, lambda path: write_atomic(path, text, durable=False))

    def close(self) -> None:
        self.lock.release()

    # -- helpers -------------------------------------------------------------------------
    def _append(self, name: str, record: dict[str, Any]) -> None:
        self.append_line(name, records.encode(record))

    def _write(self, name: str, write: Callable[[Path], None]) -> None:
        """Every write of the run's files: a full disk (or any OSError) is one line, once.

        After the first failure nothing more is written -- each attempt would fail the
        same way and bury the first message -- and what was written before stays.
        """
        if self.write_failure is not None:
            return
        try:
            write(self.path / name)
        except OSError as exc:
            self.write_failure = f"cannot write {self.path / name} ({exc.strerror or exc})"
            raise RunWriteError(
                f"{self.write_failure}; the run stopped, and the files written before stay"
            ) from None

    def _read(self, name: str) -> list[dict[str, Any]]:
        file = self.path / name
        if not file.exists():
            return []
        lines = [line for line in file.read_text().splitlines() if line.strip()]
        found = []
        for number, line in enumerate(lines, start=1):
            try:
                found.append(records.decode(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise CheckpointError(f"{file}: line {number} is not JSON") from None
                # A last line cut short by a crash mid-write: the record never completed.
        return found


class RunLogger(Callback):
    """Writes ``events.jsonl``, ``metrics.jsonl`` and ``summary.json`` from the records."""

    def __init__(self, run_dir: RunDirectory) -> None:
        self.run_dir = run_dir

    def on_event(self, trainer: Any, record: records.EventRecord) -> None:
        if record.logged:
            self.run_dir.log_event(record.to_dict())

    def on_epoch_end(self, trainer: Any, record: records.EpochEnd) -> None:
        self.run_dir.log_metrics(record.to_dict())

    def on_resume(self, trainer: Any, record: records.Resume) -> None:
        self.run_dir.rewind(record.checkpoint_epoch)
        self.on_event(trainer, record)

    def on_run_end(self, trainer: Any, record: records.RunEnd) -> None:
        self.on_event(trainer, record)
        self.run_dir.write_summary(dict(record.summary))


class StatusWriter(Callback):
    """Keeps ``status.json`` current: what the run is doing, and that it is alive."""

    def __init__(self, run_dir: RunDirectory) -> None:
        self.run_dir = run_dir
        self.started = time.time()
        self._last_beat = 0.0

    def _write(self, trainer: Any, record: records.EventRecord, phase: str) -> None:
        self._last_beat = time.monotonic()
        self.run_dir.write_status({
            "schema": records.SCHEMA_VERSION,
            "phase": phase,
            "epoch": record.epoch,
            "epochs": trainer.config.run.epochs,
            "attempt": record.attempt,
            "heartbeat": time.time(),
            "started": self.started,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        })

    def on_run_start(self, trainer: Any, record: Any) -> None:
        self._write(trainer, record, "starting")

    def on_epoch_start(self, trainer: Any, record: Any) -> None:
        self._write(trainer, record, "training")

    def on_batch_end(self, trainer: Any, record: Any) -> None:
        if time.monotonic() - self._last_beat >= HEARTBEAT_S:
            self._write(trainer, record, "training")

    def on_train_end(self, trainer: Any, record: Any) -> None:
        self._write(trainer, record, "validating")

    def on_validation_end(self, trainer: Any, record: Any) -> None:
        self._write(trainer, record, "deciding")

    def on_run_end(self, trainer: Any, record: records.RunEnd) -> None:
        self._write(trainer, record, record.status)


def attach_run_directory(
    run_dir: RunDirectory | Path | None, config: TolariaConfig
) -> tuple[RunDirectory | None, list, SnapshotStore | None]:
    """A trainer's run directory (created, if given as a path), the callbacks that keep it
    written (files, status, the loggers ``run`` asks for, the academy's replay buffer) and its
    checkpoint store, cleared of what an interrupted write left (the directory is locked:
    ours alone)."""
    if run_dir is None:
        return None, [], None
    path = run_dir.path if isinstance(run_dir, RunDirectory) else Path(run_dir)
    loggers = make_loggers(config.run, path)  # first: a logger that cannot start leaves no folder
    if config.academy.replay:
        from tolaria.academy.recorder import ReplayRecorder  # sqlite: only for runs it records

        # Opened before the run directory is made: a buffer of a newer schema refuses the run
        # with nothing written; one that cannot be opened now leaves the run unrecorded.
        recorder = ReplayRecorder.for_run(config.academy_dir(), path)
        loggers += [recorder] if recorder is not None else []
    if config.tamiyo.policy == "learned" and config.academy.auto_revert.enabled:
        from tolaria.academy.auto_revert import AutoRevert  # only where a version can fail

        loggers.append(AutoRevert(config, path))  # after the recorder: it reads the run's row
    if not isinstance(run_dir, RunDirectory):
        run_dir = RunDirectory.create(path, config)
    callbacks: list = [RunLogger(run_dir), StatusWriter(run_dir), *loggers]
    store = CheckpointStore(run_dir.checkpoint_dir, config.checkpoint.keep)
    store.remove_leftovers()
    return run_dir, callbacks, store
