"""TrainingSandbox (design §6.2.2, ACADEMY.md §4 step 2): a job run in a fresh Python process
that mirrors a production hardware profile and can change nothing but its scratch directory.

``TrainingSandbox(profile_or_snapshot, scratch=DIR, memory_gib=4).run("module:function",
payload, timeout_s=600)`` starts ``python -m tolaria.academy.sandbox IN OUT`` and returns the
job's answer.  The job is ``function(payload: dict, scratch: Path) -> dict``; JSON goes in
through a file and comes back through a file in the scratch directory -- never stdout, so a
chatty library cannot corrupt the answer (stdout and stderr go to files beside it).

What the child does before it imports the job, in this order:

* dies with its parent (``PR_SET_PDEATHSIG``): a session killed with -9 leaves no sandbox
  running on;
* caps its address space (``RLIMIT_AS`` = ``memory_gib``): an allocation past it fails
  inside the job, which the sandbox reports as the memory cap;
* confines its writes to the scratch directory with Landlock (:mod:`.confine`): writing
  anywhere else -- the registry, the replay buffer, the session's inputs -- is refused by the
  kernel.  Where the kernel has no Landlock, the parent instead compares the ``watch``
  directories before and after the job and fails it on any change (caught, not prevented);
* mirrors the profile: torch threads (the profile's CPUs, at most this machine's), default
  dtype, and the device type -- a CUDA profile on a machine without CUDA runs on the CPU and
  is reported as unmirrorable, never faked.  The device is in ``$TOLARIA_SANDBOX_DEVICE``.

cwd and ``$TMPDIR`` are the scratch directory.  The parent kills the child's whole process
group when the wall-clock budget runs out.  Every failure -- a crash, a timeout, the memory
cap, a write outside scratch -- is one :class:`~tolaria.errors.SandboxError` whose message is
the cause in one line (``timed out after 12 s``, ``exceeded its 0.5 GiB memory cap``,
``crashed (exit 1): <last stderr line>``).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tolaria.academy.confine import confine_writes
from tolaria.atomic import write_atomic
from tolaria.errors import SandboxError

GIB = 2**30
#: The environment variable naming the device the sandbox mirrors (``cpu``, ``cuda``).
DEVICE_VARIABLE = "TOLARIA_SANDBOX_DEVICE"
#: Where the plumbing of each run lies inside the scratch directory.
PLUMBING = ".sandbox"
#: stderr lines that mean an allocation failed, whoever raised it (Python, torch, C++).
_OUT_OF_MEMORY = ("MemoryError", "std::bad_alloc", "can't allocate memory",
                  "Cannot allocate memory", "out of memory", "failed to map segment")
_PR_SET_PDEATHSIG = 1


class TrainingSandbox:
    """Runs jobs in fresh processes that mirror ``profile_or_snapshot`` (a hardware profile
    as ``recorder.hardware_profile`` gives it, or a training snapshot, whose
    ``hardware_env`` is one).  ``watch``: directories the job must leave alone, compared
    before and after where the kernel cannot confine writes (see the module docstring)."""

    def __init__(
        self,
        profile_or_snapshot: Mapping[str, Any],
        *,
        scratch: Path,
        memory_gib: float,
        watch: Iterable[Path] = (),
        confine: bool = True,
    ) -> None:
        profile = profile_or_snapshot.get("hardware_env", profile_or_snapshot)
        self.profile = dict(profile)
        self.scratch = Path(scratch).resolve()
        self.memory_gib = memory_gib
        self.watch = [Path(p).resolve() for p in watch]
        #: False: rely on the after-the-fact check alone, as on a kernel without Landlock.
        self.confine = confine
        self._runs = 0

    def run(self, job: str, payload: Mapping[str, Any], *, timeout_s: float) -> dict[str, Any]:
        """The job's answer, plus ``"sandbox"``: what was mirrored, whether writes were
        confined, the wall time and the child's pid.  A failure is one SandboxError."""
        module, _, function = job.partition(":")
        if not module or not function:
            raise SandboxError(f"{job!r}: a sandbox job is 'module:function'")
        self._runs += 1
        plumbing = self.scratch / PLUMBING
        plumbing.mkdir(parents=True, exist_ok=True)
        stem = plumbing / f"{self._runs}-{function}"
        inbox, outbox = stem.with_suffix(".in.json"), stem.with_suffix(".out.json")
        request = {"job": job, "payload": dict(payload), "scratch": str(self.scratch),
                   "memory_bytes": int(self.memory_gib * GIB), "profile": self.profile,
                   "confine": self.confine, "parent": os.getpid()}
        try:
            write_atomic(inbox, json.dumps(request, allow_nan=False), durable=False)
        except (TypeError, ValueError) as exc:
            raise SandboxError(f"{job}: its payload is not plain JSON ({exc})") from None
        before = _survey(self.watch, self.scratch)
        started = time.monotonic()
        with open(stem.with_suffix(".stdout"), "wb") as out, \
                open(stem.with_suffix(".stderr"), "wb") as err:
            child = subprocess.Popen(
                [sys.executable, "-m", "tolaria.academy.sandbox", str(inbox), str(outbox)],
                cwd=self.scratch, env=self._environment(), stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, start_new_session=True,  # its own group, killed whole
            )
            try:
                returncode = child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise SandboxError(f"{job} timed out after {round(timeout_s, 1):g} s") from None
            finally:
                _kill_group(child)
        wall_s = time.monotonic() - started
        answer = _read_answer(outbox)
        if answer is None or "error" in answer:
            raise SandboxError(self._cause(job, returncode, answer, stem.with_suffix(".stderr")))
        if not answer["confined"]:
            changed = sorted({entry[0] for entry in before ^ _survey(self.watch, self.scratch)})
            if changed:
                raise SandboxError(f"{job} wrote outside its scratch: {changed[0]} "
                                   f"({answer['why_unconfined']})")
        result = answer["result"]
        result["sandbox"] = {**answer["mirror"], "confined": answer["confined"],
                             "wall_s": round(wall_s, 3), "pid": child.pid}
        return result

    def _environment(self) -> dict[str, str]:
        threads = str(torch_threads(self.profile))
        # The child imports what this process can: its sys.path, '' (the cwd) made absolute.
        path = os.pathsep.join(p or os.getcwd() for p in sys.path)
        return {**os.environ, "TMPDIR": str(self.scratch), "PYTHONPATH": path,
                "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                "PYTHONDONTWRITEBYTECODE": "1",
                # Each thread's malloc arena reserves 64 MiB of address space: without this
                # the cap would be spent on reservations, not on memory.
                "MALLOC_ARENA_MAX": "2"}

    def _cause(self, job: str, returncode: int, answer: dict | None, stderr: Path) -> str:
        error = (answer or {}).get("error", {})
        last = _last_line(stderr)
        if error.get("kind") == "memory" or any(s in last for s in _OUT_OF_MEMORY):
            return f"{job} exceeded its {self.memory_gib:g} GiB memory cap"
        if error:
            return f"{job} crashed (exit {returncode}): {error['message']}"
        how = (f"killed by {signal.Signals(-returncode).name}" if returncode < 0
               else f"exit {returncode}")
        return f"{job} crashed ({how}): {last or 'no output on stderr'}"


def torch_threads(profile: Mapping[str, Any]) -> int:
    """The profile's torch threads (its CPUs unless it names them), at most this machine's."""
    wanted = profile.get("torch_threads") or profile.get("cpu_count") or 1
    return max(1, min(int(wanted), os.cpu_count() or 1))


def _kill_group(child: subprocess.Popen) -> None:
    """The child and everything it started: a job's own workers die with it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def _read_answer(outbox: Path) -> dict | None:
    try:
        answer = json.loads(outbox.read_bytes())
    except (OSError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


def _last_line(path: Path) -> str:
    try:
        lines = path.read_bytes().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _survey(directories: Iterable[Path], skip: Path) -> frozenset[tuple[str, int, int]]:
    """Every file under ``directories`` (``skip`` excepted) with its size and mtime: two
    surveys differ where a file was written, created or removed."""
    entries = set()
    for directory in directories:
        for root, dirs, files in os.walk(directory):
            if Path(root) == skip or skip in Path(root).parents:
                dirs.clear()
                continue
            for name in files:
                path = os.path.join(root, name)
                try:
                    info = os.stat(path)
                except OSError:
                    continue  # removed while we looked
                entries.add((path, info.st_size, info.st_mtime_ns))
    return frozenset(entries)


# -- the child ------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    # Not Linux: no such call, and the parent's timeout alone ends the child.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _mirror(profile: Mapping[str, Any]) -> dict[str, Any]:
    """Set torch's threads, default dtype and device from ``profile``; say what was set."""
    import torch

    threads = torch_threads(profile)
    torch.set_num_threads(threads)
    dtype = str(profile.get("default_dtype", "float32"))
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise SandboxError(f"profile's default_dtype {dtype!r} is not a torch dtype")
    torch.set_default_dtype(getattr(torch, dtype))
    wanted = str(profile.get("device_type", "cpu"))
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    unmirrorable = None
    device = wanted
    if not available.get(wanted, False):
        unmirrorable = f"no {wanted} device on this machine"
        device = "cpu"
    os.environ[DEVICE_VARIABLE] = device
    return {"device_type": device, "torch_threads": threads, "default_dtype": dtype,
            "profile_device_type": wanted, "unmirrorable": unmirrorable}


def _child(inbox: Path, outbox: Path) -> int:
    request = json.loads(inbox.read_bytes())
    _die_with_parent(request["parent"])
    scratch = Path(request["scratch"])
    answer: dict[str, Any] = {}
    try:
        cap = request["memory_bytes"]
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        why = (confine_writes([scratch]) if request["confine"]
               else "write confinement was turned off")
        answer = {"confined": why is None, "why_unconfined": why,
                  "mirror": _mirror(request["profile"])}
        module, _, function = request["job"].partition(":")
        job = getattr(importlib.import_module(module), function)
        answer["result"] = job(request["payload"], scratch)
        if not isinstance(answer["result"], dict):
            raise TypeError(f"it returned {type(answer['result']).__name__}, not a dict")
        text = json.dumps(answer, allow_nan=False)
    except MemoryError:
        text = json.dumps({"error": {"kind": "memory", "message": "MemoryError"}})
    except BaseException as exc:  # every failure is reported, in one line
        traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        kind = "memory" if any(s in message for s in _OUT_OF_MEMORY) else "exception"
        text = json.dumps({"error": {"kind": kind, "message": message}})
    write_atomic(outbox, text, durable=False)
    return 0 if "error" not in json.loads(text) else 1


if __name__ == "__main__":
    sys.exit(_child(Path(sys.argv[1]), Path(sys.argv[2])))
