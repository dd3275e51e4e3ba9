"""The nightly session (ACADEMY.md §4, design §6.1): replay → snapshots → adapter → gates →
deploy or keep, one session per academy at a time, safe under kill -9 at any moment.

``run_session(academy_dir, config)`` does, in order:

1. **lock** ``<academy>/nightly/.lock`` (flock; the holder's pid and session are in it): a
   second session is refused in one line naming the holder (``NightlyInUse``, exit 2);
2. **clean the debris** of killed sessions: a ``session.json`` still ``running`` (no live
   session can be, under the lock) is finished as ``failed``, cause ``killed`` -- or as
   ``deployed`` if its candidate had already become champion --, its attempt row recorded if
   it is missing, its scratch removed; a registered candidate it never promoted keeps its
   version, and its card's ``decision`` says it was never promoted;
3. **choose the data** (:mod:`.nightly_data`): recent, held-out and history points, written
   to ``data/`` -- or stop early with status ``skipped``, cause ``nothing to learn: ...``
   (no attempt row: nothing was attempted, and the monitor's success rate counts attempts);
4. the steps, each recorded in ``session.json`` with its times and status as it goes:
   ``snapshot`` (``create_training_snapshot`` at the start of the newest run of each of up
   to ``history_tasks`` tasks), ``train`` (the adapter, in the sandbox), ``validate`` (the
   gates, in the sandbox), ``deploy`` (register the candidate -- every candidate that
   trained --, promote it when every gate passed);
5. the attempt row (``kind="nightly"``), then the final ``session.json``, then the scratch
   directory goes.

Every write is atomic (``session.json``, the registry's versions and CHAMPION, the replay's
rows), so whatever instant a kill lands on, CHAMPION names the old champion or the new one,
every version directory loads, and the next session finds a record that says how far this
one got.  ``docs/academy.md`` ("The nightly session") says what each kill leaves.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tolaria.academy import nightly_data
from tolaria.academy.registry import CARD_FILE, PolicyRegistry
from tolaria.academy.replay import ReplayBuffer
from tolaria.academy.sandbox import TrainingSandbox
from tolaria.atomic import write_atomic
from tolaria.config import TolariaConfig
from tolaria.errors import NightlyInUse, SandboxError, TolariaError
from tolaria.monitor.academy import publish_to_tensorboard

SESSIONS_DIR = "nightly"
SESSION_FILE = "session.json"
LOCK_FILE = ".lock"
_SESSION_ID = re.compile(r"\d{8}T\d{6}Z")
#: The session's outcomes; ``skipped`` is a session that had nothing to learn.
FINISHED = ("deployed", "rejected", "failed", "skipped")
#: The gates the validate job reports, in the design's order (§6.3).
GATES = ("history_score", "hardware_stability", "diversity_score")


@dataclass(frozen=True)
class Jobs:
    """What each step runs, as ``module:function``; tests substitute their own."""

    snapshot: str = "tolaria.academy.snapshot:create_training_snapshot"
    train: str = "tolaria.academy.adapter:train_job"
    validate: str = "tolaria.academy.gates:validate_job"


class SessionListener:
    """What a display hears of a session (every method optional)."""

    def on_cleaned(self, record: dict) -> None: ...
    def on_start(self, record: dict) -> None: ...
    def on_step_start(self, record: dict, step: dict) -> None: ...
    def on_step_end(self, record: dict, step: dict) -> None: ...
    def on_registered(self, record: dict, version: str) -> None: ...
    def on_end(self, record: dict) -> None: ...


def sessions_dir(academy_dir: Path) -> Path:
    return Path(academy_dir) / SESSIONS_DIR


def run_session(
    academy_dir: Path,
    config: TolariaConfig,
    *,
    jobs: Jobs = Jobs(),
    listener: SessionListener | None = None,
) -> dict[str, Any]:
    """One nightly session on ``academy_dir`` (see the module docstring); returns its
    final record.  ``config`` supplies ``academy.nightly``, ``run.seed`` (the jobs' seed)
    and ``tamiyo.temperature`` (the daytime policy's, for the Fisher)."""
    listener = listener or SessionListener()
    with session_lock(academy_dir) as claim:
        for cleaned in clean_debris(academy_dir):
            listener.on_cleaned(cleaned)
        session = _Session(academy_dir, config, jobs, listener)
        claim(session.id)
        return session.run()


# -- the lock -------------------------------------------------------------------------------


@contextmanager
def session_lock(academy_dir: Path) -> Iterator[Callable[[str], None]]:
    """Hold the academy's nightly lock; yields ``claim(session_id)``, which writes who holds
    it (for the refusal another session prints).  The kernel releases a flock when its
    holder dies, kill -9 included: a dead session never blocks the next."""
    directory = sessions_dir(academy_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / LOCK_FILE, "a+")  # noqa: SIM115 -- held below
    except OSError as exc:
        raise TolariaError(f"{directory}: cannot write ({exc.strerror or exc})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise NightlyInUse(
                f"{academy_dir}: a nightly session is already running ({holder})"
            ) from None

        def claim(session_id: str) -> None:
            lock.seek(0)
            lock.truncate()
            lock.write(f"session {session_id}, pid {os.getpid()}, since {_iso(time.time())}")
            lock.flush()

        claim("starting")
        yield claim


# -- debris of killed sessions --------------------------------------------------------------


def clean_debris(academy_dir: Path) -> list[dict]:
    """Finish the records of sessions that were killed (call with the lock held); returns
    the records it finished."""
    finished = []
    registry = PolicyRegistry(academy_dir)
    directory = sessions_dir(academy_dir)
    for path in _session_dirs(directory):
        record_file = path / SESSION_FILE
        if not record_file.exists():  # killed before its first record: nothing in it
            shutil.rmtree(path, ignore_errors=True)
            continue
        try:
            record = json.loads(record_file.read_bytes())
        except ValueError:  # written atomically, so never torn: someone else's edit
            continue
        if record.get("status") == "running":
            _finish_killed(academy_dir, registry, path, record)
            finished.append(record)
        shutil.rmtree(path / "scratch", ignore_errors=True)
    return finished


def _finish_killed(academy_dir: Path, registry: PolicyRegistry, path: Path, record: dict) -> None:
    now = time.time()
    with ReplayBuffer.in_academy(academy_dir) as replay:
        attempt = next((a for a in replay.attempts() if a["kind"] == "nightly"
                        and a["detail"].get("session") == record["session"]), None)
    # Registered but killed before the record said so: its card names the session.
    candidate = record["candidate"] or next(
        (name for name, found in registry.survey()
         if not isinstance(found, Exception) and found.card.get("session") == record["session"]),
        None,
    )
    record["candidate"] = candidate
    champion = registry.champion(warn=lambda line: None).name
    if attempt is not None:  # killed after its attempt row: that says how it ended
        record["status"] = attempt["outcome"]
    elif candidate is not None and champion == candidate:
        record["status"], record["cause"] = "deployed", "killed after its promote"
    else:
        record["status"], record["cause"] = "failed", "killed"
    running = [s["name"] for s in record["steps"] if s["status"] == "running"]
    record["killed_during"] = running[0] if running else None
    for step in record["steps"]:
        if step["status"] == "running":
            step.update(status="failed", finished=_iso(now))
    record["finished"] = _iso(now)
    passed = bool(record["gates"]) and record["failed_gate"] is None
    if attempt is None and passed and candidate is not None and champion != candidate:
        # Its card says "deployed", but the kill came first (a kept one's says so already).
        _note_on_card(registry, candidate,
                      f"never promoted: session {record['session']} was killed before its promote")
    if attempt is None:
        _record_attempt(academy_dir, record, started=record["started_ts"], finished=now)
    write_atomic(path / SESSION_FILE, _json(record))


def _note_on_card(registry: PolicyRegistry, name: str, decision: str) -> None:
    """The card's ``decision`` rewritten (atomically): the tensors and their SHA-256 stay,
    so the version loads as before."""
    card_file = registry.path_of(name) / CARD_FILE
    card = json.loads(card_file.read_bytes())
    card["decision"] = decision
    write_atomic(card_file, json.dumps(card, indent=1) + "\n")


# -- the session ----------------------------------------------------------------------------


class _Session:
    def __init__(self, academy_dir: Path, config: TolariaConfig, jobs: Jobs,
                 listener: SessionListener) -> None:
        self.academy_dir = Path(academy_dir).resolve()
        self.config, self.settings = config, config.academy.nightly
        self.jobs, self.listener = jobs, listener
        self.registry = PolicyRegistry(self.academy_dir)
        self.clock = time.monotonic()
        self.id = _new_id(sessions_dir(self.academy_dir))
        self.path = sessions_dir(self.academy_dir) / self.id
        self.scratch = self.path / "scratch"
        self.champion = champion = self.registry.champion()
        self.data: dict[str, Path] = {}  # data/*.json, once chosen
        now = time.time()
        self.record: dict[str, Any] = {
            "session": self.id, "pid": os.getpid(), "started": _iso(now), "started_ts": now,
            "finished": None, "status": "running", "champion": champion.name,
            "candidate": None, "cause": None, "steps": [], "gates": {}, "failed_gate": None,
            "adapter_training_s": None, "session_training_s": 0.0,
            "allotted_s": self.settings.budget_s, "validation_divergence": None,
            "profiles_seen": [], "profiles_tested": [], "profiles_unmirrorable": [],
            "replay": {},
        }
        self.path.mkdir(parents=True)
        self._save()

    def run(self) -> dict[str, Any]:
        self.listener.on_start(self.record)
        try:
            selection = self._choose_data()
            if selection is not None:
                self._steps(selection)
        except TolariaError as exc:
            self._end("failed", cause=str(exc))
        except BaseException as exc:  # a bug or Ctrl-C: still a finished record, then up
            cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._end("failed", cause=cause.splitlines()[0])
            raise
        return self.record

    # -- the pipeline ---------------------------------------------------------------------
    def _choose_data(self) -> nightly_data.Selection | None:
        until = time.time()
        with ReplayBuffer.in_academy(self.academy_dir) as replay:
            points, runs, attempts = replay.points(), replay.runs(), replay.attempts()
        selection = nightly_data.choose(points, runs, since=nightly_data.last_until(attempts),
                                        until=until, held_out=self.settings.held_out)
        self.record["replay"] = selection.summary()
        self.record["profiles_seen"] = selection.profiles_seen()
        settled, needed = selection.settled_recent(), self.settings.min_points
        if not selection.held_out_runs or settled < needed:
            why = (f"{len(selection.runs)} recent run(s); a session needs two (one is held "
                   "out for the gates)"
                   if not selection.held_out_runs
                   else f"{settled} settled recent decision points (fewer than {needed})")
            self._end("skipped", cause=f"nothing to learn: {why}")
            return None
        self.data = selection.write(self.path / "data")
        self._save()
        return selection

    def _steps(self, selection: nightly_data.Selection) -> None:
        snapshots = self._step("snapshot", self._snapshots)["paths"]
        profile = selection.runs[-1]["hardware"]  # the newest recent run's machine
        sandbox = TrainingSandbox(profile, scratch=self.scratch,
                                  memory_gib=self.settings.memory_gib,
                                  watch=[self.registry.directory, self.path])
        settings = self.settings.model_dump(mode="json")
        seed = self.config.run.seed
        trained = self._step("train", lambda: self._sandboxed(sandbox, self.jobs.train, {
            "base": str(self.champion.path), "recent": str(self.data["recent"]),
            "history": str(self.data["history"]), "settings": settings, "seed": seed,
            "temperature": self.config.tamiyo.temperature,
        }))
        self.record["adapter_training_s"] = trained["wall_s"]
        tensors = self._candidate_tensors(trained["candidate"])
        try:
            gates = self._step("validate", lambda: self._sandboxed(sandbox, self.jobs.validate, {
                "candidate": trained["candidate"], "champion": str(self.champion.path),
                "held_out": str(self.data["held_out"]), "snapshots": snapshots,
                "profiles": self.record["profiles_seen"], "settings": settings, "seed": seed,
                "temperature": self.config.tamiyo.temperature,
            }))
        except SandboxError as exc:  # it trained, so it is registered, never promoted
            failure = str(exc)
            self._step("deploy", lambda: self._deploy(tensors, trained, failure))
            raise
        self._take_gates(gates)
        self._step("deploy", lambda: self._deploy(tensors, trained, None))
        self._end("rejected" if self.record["failed_gate"] else "deployed")

    def _snapshots(self) -> dict[str, Any]:
        """A snapshot at the start of the newest run of each of the newest tasks (any run
        of the replay: the history gate is about what the champion already does well)."""
        from tolaria.academy.snapshot import save_snapshot

        module, _, function = self.jobs.snapshot.partition(":")
        create = getattr(importlib.import_module(module), function)
        with ReplayBuffer.in_academy(self.academy_dir) as replay:
            runs = replay.runs()
        newest: dict[str, dict] = {}
        for run in sorted(runs, key=lambda r: r["started"], reverse=True):
            newest.setdefault(run["task"], run)
        made, skipped = [], []
        for task, run in newest.items():
            if len(made) == self.settings.history_tasks:
                break
            try:
                snapshot = create(run["config"], run_id=run["run_id"], task=task,
                                  hardware_env=run["hardware"])
            except TolariaError as exc:  # a run this machine cannot rebuild: the next task
                skipped.append({"task": task, "run_id": run["run_id"], "why": str(exc)})
                continue
            path = save_snapshot(snapshot, self.path / "snapshots" / f"{len(made)}.pt")
            made.append({"task": task, "run_id": run["run_id"], "path": str(path)})
        if not made:
            why = skipped[0]["why"] if skipped else "the replay has no runs"
            raise TolariaError(f"no training snapshot could be made: {why}")
        return {"snapshots": made, "skipped": skipped, "paths": [m["path"] for m in made]}

    def _sandboxed(self, sandbox: TrainingSandbox, job: str, payload: dict) -> dict:
        remaining = self.settings.budget_s - (time.monotonic() - self.clock)
        if remaining <= 0:
            raise SandboxError(f"{job} not started: the session's budget of "
                               f"{self.settings.budget_s:g} s is spent")
        started = time.monotonic()
        try:
            answer = sandbox.run(job, payload, timeout_s=remaining)
        finally:  # a job that failed spent its time too
            self.record["session_training_s"] = round(
                self.record["session_training_s"] + time.monotonic() - started, 3)
        report = answer.pop("sandbox")
        if report["unmirrorable"]:
            self.record["profiles_unmirrorable"] = nightly_data.distinct(
                [*self.record["profiles_unmirrorable"],
                 {"profile": sandbox.profile, "why": report["unmirrorable"]}])
        return {**answer, "wall_s": report["wall_s"], "sandbox": report}

    def _candidate_tensors(self, candidate: str) -> dict:
        """The candidate's merged tensors, which must be the champion's scorer's."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(candidate)
        if self.scratch not in path.resolve().parents:
            raise TolariaError(f"the train job's candidate {path} is not in its scratch")
        try:
            tensors = load_file(path / "policy.safetensors")
        except (OSError, SafetensorError) as exc:
            raise TolariaError(f"{path / 'policy.safetensors'}: unreadable ({exc})") from None
        shapes = {key: tuple(t.shape) for key, t in tensors.items()}
        expected = {key: tuple(t.shape) for key, t in self.champion.tensors.items()}
        if shapes != expected:
            raise TolariaError(f"{path}: the candidate's tensors are not the scorer's "
                               f"({sorted(set(shapes) ^ set(expected)) or 'shapes differ'})")
        return tensors

    def _take_gates(self, answer: dict) -> None:
        gates = {name: answer["gates"][name] for name in GATES if name in answer["gates"]}
        failed = answer.get("failed_gate")
        if failed is None and not all(g["passed"] for g in gates.values()):
            failed = next(name for name, g in gates.items() if not g["passed"])
        self.record.update(
            gates=gates, failed_gate=failed,
            validation_divergence=answer.get("validation_divergence"),
            profiles_tested=answer.get("profiles_tested", []),
            profiles_unmirrorable=nightly_data.distinct(
                [*self.record["profiles_unmirrorable"], *answer.get("profiles_unmirrorable", [])]
            ),
        )

    def _deploy(self, tensors: dict, trained: dict, failure: str | None) -> dict[str, Any]:
        """Register the candidate; promote it when every gate passed (``failure``: why its
        gates were not measured)."""
        failed = self.record["failed_gate"]
        if failure is not None:
            decision = f"kept {self.champion.name}: its gates were not measured ({failure})"
        elif failed is not None:
            decision = f"kept {self.champion.name}: gate {failed} failed"
        else:
            decision = f"deployed: every gate passed (was {self.champion.name})"
        draft = _draft_card(Path(trained["candidate"]))  # what the train job knows
        card = {
            "parent": self.champion.name,
            "trained_on": {**draft.get("trained_on", {}), "session": self.id,
                           **self.record["replay"]},
            "gates": {**self.record["gates"], "failed_gate": failed},
            "training_s": trained.get("training_s", trained["wall_s"]),
            "scorer": draft.get("scorer", self.champion.card["scorer"]),
            "session": self.id,
            "decision": decision,
        }
        adapter = Path(trained["candidate"]) / "adapter"
        version = self.registry.register(tensors, card,
                                         adapter=adapter if adapter.is_dir() else None)
        self.record["candidate"] = version.name
        self._save()
        self.listener.on_registered(self.record, version.name)
        promoted = failure is None and failed is None
        if promoted:
            self.registry.promote(version.name, reason=f"nightly {self.id}: passed its gates")
        return {"registered": version.name, "promoted": promoted}

    # -- the record -----------------------------------------------------------------------
    def _step(self, name: str, work: Callable[[], dict]) -> dict:
        step = {"name": name, "started": _iso(time.time()), "finished": None,
                "status": "running", "detail": {}}
        self.record["steps"].append(step)
        self._save()
        self.listener.on_step_start(self.record, step)
        try:
            detail = work()
        except BaseException as exc:
            step.update(status="failed", finished=_iso(time.time()),
                        detail={"cause": str(exc) or type(exc).__name__})
            self._save()
            self.listener.on_step_end(self.record, step)
            raise
        step.update(status="ok", finished=_iso(time.time()),
                    detail={k: v for k, v in detail.items() if k not in ("paths",)})
        self._save()
        self.listener.on_step_end(self.record, step)
        return detail

    def _end(self, status: str, *, cause: str | None = None) -> None:
        now = time.time()
        self.record.update(status=status, cause=cause, finished=_iso(now))
        if status != "skipped":
            _record_attempt(self.academy_dir, self.record, started=self.record["started_ts"],
                            finished=now)
            # The §7 metrics with this attempt in them, for `tensorboard --logdir <academy>`.
            publish_to_tensorboard(self.academy_dir, self.config.academy.monitor)
        self._save()
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.listener.on_end(self.record)

    def _save(self) -> None:
        write_atomic(self.path / SESSION_FILE, _json(self.record))


#: What the attempt row's ``detail`` keeps of the session record: the monitor reads these,
#: and the next session where its replay range ends.
ATTEMPT_DETAIL = ("session", "gates", "failed_gate", "cause", "adapter_training_s",
                  "session_training_s", "allotted_s", "validation_divergence",
                  "profiles_seen", "profiles_tested", "replay")


def _record_attempt(academy_dir: Path, record: Mapping[str, Any], *, started: float,
                    finished: float) -> None:
    with ReplayBuffer.in_academy(academy_dir) as replay:
        replay.record_attempt(
            version=record["candidate"] or "", parent=record["champion"], kind="nightly",
            outcome=record["status"], detail={key: record.get(key) for key in ATTEMPT_DETAIL},
            started=started, finished=finished,
        )


def _draft_card(candidate: Path) -> dict[str, Any]:
    """The train job's ``card.json`` draft in the candidate directory ({} without one)."""
    try:
        draft = json.loads((candidate / CARD_FILE).read_bytes())
    except (OSError, ValueError):
        return {}
    return draft if isinstance(draft, dict) else {}


def _new_id(directory: Path) -> str:
    """``YYYYMMDDTHHMMSSZ`` now -- or a second after the newest session, so that two
    sessions within one second still get ordered, distinct ids."""
    stamp = datetime.now(UTC).replace(microsecond=0)
    taken = [p.name for p in _session_dirs(directory)]
    if taken:
        newest = datetime.strptime(taken[-1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        stamp = max(stamp, newest.fromtimestamp(newest.timestamp() + 1, UTC))
    return stamp.strftime("%Y%m%dT%H%M%SZ")


def _session_dirs(directory: Path) -> list[Path]:
    """The session directories in ``directory``, oldest first (nothing else there)."""
    return sorted(p for p in directory.iterdir() if p.is_dir() and _SESSION_ID.fullmatch(p.name))


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def _json(record: Mapping[str, Any]) -> str:
    return json.dumps(record, indent=1, allow_nan=False) + "\n"
