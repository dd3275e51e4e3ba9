"""ReplayRecorder: the callback that appends a run to the academy's replay buffer.

=================  ==========================================================================
event              what it writes
=================  ==========================================================================
``resume``         forgets what the run recorded after its checkpoint (it runs those again)
``run_start``      the run's row: task, fingerprint, config, hardware profile, policy
``decision_point`` the point; a wait's outcome (reward 0) at once
``growth_outcome`` the graft's outcome and its :func:`~tolaria.academy.reward.reward`
``run_end``        the run's status and summary
=================  ==========================================================================

Recording never costs a run its training: a buffer that cannot be opened or written (a full
disk, a lock held past the timeout) is reported in one warning line, and the run goes on
unrecorded from there.  The one exception is a file this Tolaria must not write at all (a
newer schema, another program's database: ``ReplaySchemaError``): ``attach_run_directory``
opens the buffer before the run directory exists, so that refuses the run in one line
before anything is written -- a run recorded nowhere would be lost to the academy unseen.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tolaria import records
from tolaria.academy.replay import POINT_FIELDS, ReplayBuffer
from tolaria.academy.reward import reward
from tolaria.errors import ReplayError, ReplaySchemaError, TolariaError
from tolaria.events import Callback

#: Host arguments that are its widths: they lead the task key, ``mnist1d/mlp[32,32]``.
WIDTH_ARGUMENTS = ("hidden", "channels")
GIB = 2**30


def _warn_on_stderr(message: str) -> None:
    print(f"tolaria: warning: {message}", file=sys.stderr, flush=True)


class ReplayRecorder(Callback):
    """Writes one run (``run_id``: its directory's resolved path) to ``buffer``."""

    def __init__(self, buffer: ReplayBuffer, run_id: str,
                 warn: Callable[[str], None] = _warn_on_stderr) -> None:
        self.buffer: ReplayBuffer | None = buffer
        self.run_id = run_id
        self.warn = warn

    @classmethod
    def for_run(cls, academy_dir: Path, run_dir: Path,
                warn: Callable[[str], None] = _warn_on_stderr) -> ReplayRecorder | None:
        """The recorder of the run in ``run_dir`` (which need not exist yet), its buffer open.

        A file this Tolaria must not write (``ReplaySchemaError``) refuses the run; a buffer
        that cannot be opened now (a full disk, a lock held past the timeout) is a warning,
        and None: the run trains unrecorded.
        """
        try:
            buffer = ReplayBuffer.in_academy(academy_dir)
        except ReplaySchemaError:
            raise
        except ReplayError as exc:
            warn(f"{exc}; this run is not recorded in the replay buffer, training goes on")
            return None
        return cls(buffer, str(Path(run_dir).resolve()), warn)

    def on_resume(self, trainer: Any, record: records.Resume) -> None:
        self._write(lambda b: b.rewind(self.run_id, record.checkpoint_epoch))

    def on_run_start(self, trainer: Any, record: records.RunStart) -> None:
        config = trainer.config
        fingerprint = task_fingerprint(config, trainer.data, trainer.params_initial)
        self._write(lambda b: b.begin_run(
            self.run_id,
            task=task_key(fingerprint),
            fingerprint=fingerprint,
            config=config.model_dump(mode="json"),
            hardware=hardware_profile(trainer.hardware_monitor.current()),
            policy=config.tamiyo.policy,
            policy_version=getattr(trainer.tamiyo.policy, "version", None),
        ))

    def on_decision_point(self, trainer: Any, record: Any) -> None:
        fields = record.to_dict()
        point = {name: fields[name] for name in POINT_FIELDS}
        settled = {}
        if record.chosen == 0:  # a wait has no growth_outcome to come: it is settled now
            wait = {"result": "wait", "epoch": record.epoch, "attempt": record.attempt}
            settled = {"outcome": wait, "reward": reward(wait, trainer.params_initial)}
        self._write(lambda b: b.add_point(self.run_id, point, **settled))

    def on_growth_outcome(self, trainer: Any, record: Any) -> None:
        outcome = {k: v for k, v in record.to_dict().items()
                   if k not in ("schema", "event", "point_id")}
        self._write(lambda b: b.add_outcome(self.run_id, record.point_id, outcome,
                                            reward(outcome, trainer.params_initial)))

    def on_run_end(self, trainer: Any, record: records.RunEnd) -> None:
        self._write(lambda b: b.end_run(self.run_id, status=record.status,
                                        metrics=dict(record.summary)))
        self.close()

    def close(self) -> None:
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None

    def _write(self, write: Callable[[ReplayBuffer], None]) -> None:
        if self.buffer is None:
            return  # stopped: every further write would fail the same way
        try:
            write(self.buffer)
        except ReplayError as exc:
            self.close()
            self.warn(f"{exc}; the replay buffer stopped recording this run, training goes on")


# -- what identifies a run's task and machine -----------------------------------------------


def task_fingerprint(config: Any, data: Any, host_params: int) -> dict[str, Any]:
    """What the task is (ACADEMY §2): dataset, host and its arguments, input shape, classes
    and the host's parameter count."""
    return {
        "dataset": data.name,
        "dataset_kwargs": dict(config.data.kwargs),
        "host": config.model.host,
        "host_kwargs": host_arguments(config.model.host, config.model.kwargs),
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "params": host_params,
    }


def host_arguments(host: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the host's own defaults filled in: the default mlp is ``[32, 32]``
    whether the config says so or not, and both runs are the same task."""
    from tolaria.hosts import BUILTIN_HOSTS  # imports torch: the trainer has already

    try:
        parameters = inspect.signature(BUILTIN_HOSTS.get(host)).parameters.values()
    except (TolariaError, TypeError, ValueError):
        parameters = ()  # a host without a signature: only what the config says
    defaults = {p.name: p.default for p in list(parameters)[2:]
                if p.default is not p.empty and _plain_value(p.default)}
    return records.decode(records.encode({**defaults, **kwargs}))


def _plain_value(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return all(_plain_value(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def task_key(fingerprint: Mapping[str, Any]) -> str:
    """A short name that groups runs of one task: ``mnist1d/mlp[32,32]``,
    ``digits/cnn2d[8,16](kernel_size=3)``, ``synthetic(family=rings,size=8)/mlp[32,32]``."""
    kwargs = dict(fingerprint["host_kwargs"])
    widths = next((kwargs.pop(n) for n in WIDTH_ARGUMENTS if isinstance(kwargs.get(n), list)),
                  None)
    dataset = fingerprint["dataset"].rpartition(":")[2]  # a module:function: its function
    if options := fingerprint.get("dataset_kwargs"):
        dataset += "(" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + ")"
    key = f"{dataset}/{fingerprint['host']}"
    if widths is not None:
        key += "[" + ",".join(map(str, widths)) + "]"
    if kwargs:
        key += "(" + ",".join(f"{k}={v}" for k, v in sorted(kwargs.items())) + ")"
    return key


def hardware_profile(context: Any) -> dict[str, Any]:
    """A ``HardwareContext`` reduced to what identifies a machine class (not its load)."""
    profile = {
        "device_type": context.device_type,
        "device_name": context.device_name,
        "cpu_count": context.cpu_count,
        "memory_gib": round(context.system_memory_total_bytes / GIB),
    }
    if context.cuda_memory_total_bytes is not None:
        profile["cuda_memory_gib"] = round(context.cuda_memory_total_bytes / GIB)
    return profile
