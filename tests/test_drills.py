"""Fault drills: `kill -9`, damaged and planted checkpoints, NaN from a user's model, a full
disk, two writers.  Each drill records its outcome as a row of docs/reliability.md (see
tests/drills.py) and only then asserts, so the document reports failures too.

Every resumed run is held to the uninterrupted reference run: the same ``metrics.jsonl``,
byte for byte, and the same ``summary.json`` but for ``wall_time_s``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from drills import (
    DRILL_SETTINGS,
    CliResult,
    FullDisk,
    Launcher,
    PlantedPickle,
    delete,
    events,
    flip_byte,
    metrics,
    run_cli,
    summary_without_clock,
    train_args,
    tree_bytes,
    truncate,
    wait_until,
)
from tolaria.checkpoint import CheckpointStore
from tolaria.checkpoint_io import MANIFEST_FILE, STATE_FILE, TENSORS_FILE

pytestmark = pytest.mark.drill

FILES = (TENSORS_FILE, STATE_FILE, MANIFEST_FILE)
DAMAGES = {"byte flipped": flip_byte, "truncated": truncate, "deleted": delete}


@dataclass(frozen=True)
class Reference:
    run_dir: Path
    cache: Path
    metrics: str
    summary: dict
    #: Seconds from the run directory's creation to its summary: the span a kill can hit.
    window: float

    def reproduced_by(self, run_dir: Path) -> bool:
        """``run_dir`` ended as this run did."""
        file = run_dir / "metrics.jsonl"
        return (file.exists() and file.read_text() == self.metrics
                and summary_without_clock(run_dir) == self.summary)

    def copy(self, destination: Path) -> Path:
        """The finished run as a killed one would leave it: no summary, so resumable."""
        shutil.copytree(self.run_dir, destination)
        (destination / "summary.json").unlink()
        return destination


@pytest.fixture(scope="session")
def reference(tmp_path_factory, launcher) -> Reference:
    """The run every drill breaks, uninterrupted: by a plain `python -m tolaria.cli train`,
    and again by the launcher, which must compute the same (the drills' runs are forked or
    in-process) and whose timing the kills aim at (a fresh interpreter's first epoch is
    slower)."""
    root = tmp_path_factory.mktemp("reference")
    run_dir, cache = root / "run", root / "cache"
    done = subprocess.run(
        [sys.executable, "-m", "tolaria.cli", *train_args(run_dir, cache)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    records = metrics(run_dir)
    assert [r["epoch"] for r in records] == list(range(6))
    assert records[-1]["params"] > records[0]["params"]  # it grew: structure is at stake
    forked = root / "forked"
    process = launcher.start(train_args(forked, cache), root / "forked.log")
    process.join(timeout=300)
    assert process.exitcode == 0, (root / "forked.log").read_text()
    span = (forked / "summary.json").stat().st_mtime - (forked / "config.yaml").stat().st_mtime
    reference = Reference(run_dir, cache, (run_dir / "metrics.jsonl").read_text(),
                          summary_without_clock(run_dir), span)
    assert reference.reproduced_by(forked)
    return reference


@pytest.fixture(scope="session")
def launcher() -> Launcher:
    return Launcher()


def checkpoints(run_dir: Path) -> list[Path]:
    return CheckpointStore(run_dir / "checkpoints", keep=2).checkpoints()


def newest_checkpoint(run_dir: Path) -> Path:
    return checkpoints(run_dir)[-1]


def dot_entries(run_dir: Path, prefix: str = ".") -> list[str]:
    """Leftovers of an interrupted write (``.tmp-*``) or prune (``.trash-*``)."""
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(n for n in os.listdir(directory) if n.startswith(prefix))


def skip_lines(result: CliResult) -> list[str]:
    return [line for line in result.err.splitlines() if "skipping checkpoint" in line]


def resumed_from(run_dir: Path) -> list[int]:
    return [e["checkpoint_epoch"] for e in events(run_dir) if e["event"] == "resume"]


# -- 1. kill -9 ----------------------------------------------------------------------------


@dataclass
class KillTrial:
    aim: str
    epochs_logged: int = 0
    checkpoints: int = 0
    finished_first: bool = False  # the run ended before the kill landed
    caught: bool = False  # a leftover of the watched write or prune proves the kill hit it
    resume: CliResult | None = None
    exact: bool = False
    leftovers: list[str] = field(default_factory=list)

    @property
    def survived(self) -> bool:
        return self.resume.code == 0 and "Traceback" not in self.resume.err

    @property
    def acceptable(self) -> bool:
        """Resumed exactly -- or killed before the first checkpoint existed, when a
        one-line refusal would be an answer too (a resume starts such a run over)."""
        return (self.survived and self.exact) or (
            self.checkpoints == 0 and self.resume.one_line_error
        )


def kill_and_resume(launcher: Launcher, reference: Reference, run_dir: Path, aim: str,
                    until_kill: Callable[[object], None], watched: str = "") -> KillTrial:
    """Train into ``run_dir``, kill -9 once ``until_kill(victim)`` returns, resume."""
    victim = launcher.start(train_args(run_dir, reference.cache), run_dir.with_suffix(".log"))
    until_kill(victim)
    if victim.is_alive():
        os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    trial = KillTrial(aim, finished_first=victim.exitcode == 0)
    trial.checkpoints = len(checkpoints(run_dir))
    trial.epochs_logged = len(metrics(run_dir))
    trial.caught = bool(watched and dot_entries(run_dir, watched))
    trial.resume = run_cli(["resume", str(run_dir)])
    trial.exact = reference.reproduced_by(run_dir)
    trial.leftovers = dot_entries(run_dir)
    return trial


def at_fraction(reference: Reference, run_dir: Path, fraction: float):
    """Wait until ``fraction`` of the reference run's span has passed since this run's
    directory appeared."""
    def until_kill(victim) -> None:
        wait_until(lambda: (run_dir / "config.yaml").exists(), victim)
        started = (run_dir / "config.yaml").stat().st_mtime
        time.sleep(max(0.0, started + fraction * reference.window - time.time()))
    return until_kill


def inside(run_dir: Path, prefix: str, occurrence: int):
    """Spin until the ``occurrence``-th write (``prefix=".tmp-"``) or prune (``".trash-"``)
    of a checkpoint shows under ``checkpoints/``, or a later one: they last ~3 ms and
    ~0.6 ms here, too short for a timed kill to hit on purpose.  The n-th write or prune
    handles the checkpoint of sequence number n - 1, which its directory's name carries,
    so a glimpse missed earlier does not shift the count."""
    directory = run_dir / "checkpoints"
    pattern = re.compile(re.escape(prefix) + r"ckpt-(\d+)-")

    def appeared() -> bool:
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(directory):
                match = pattern.match(name)
                if match and int(match.group(1)) >= occurrence - 1:
                    return True
        return False

    return lambda victim: wait_until(appeared, victim, poll=0)


def record_kills(reliability, drill: str, trials: list[KillTrial], notes: list[str]) -> None:
    landed = ", ".join(
        "finished first" if t.finished_first else f"{t.epochs_logged}/{t.checkpoints}"
        for t in trials
    )
    refused = sum(not t.survived and t.checkpoints == 0 for t in trials)
    if refused:
        notes.append(f"{refused} killed before the first checkpoint: resume refused in one "
                     "line, there was nothing to resume")
    left = sum(bool(t.leftovers) for t in trials)
    if left:
        notes.append(f"{left} left a `.tmp-`/`.trash-` directory behind after the resume")
    reliability(drill, trials=len(trials), survived=sum(t.survived for t in trials),
                exact=sum(t.exact for t in trials), bad_inputs="",
                notes=f"epochs logged/checkpoints at each kill: {landed}. " + "; ".join(notes))


@pytest.mark.slow
def test_kill_9_at_moments_spread_over_the_run(launcher, reference, tmp_path, reliability):
    # Short of the end: runs vary by a tenth either way, and a kill after the end is no trial.
    fractions = [0.9 * (i + 0.5) / 8 for i in range(8)]
    trials = [
        kill_and_resume(launcher, reference, tmp_path / f"run{i}", f"{f:.0%}",
                        at_fraction(reference, tmp_path / f"run{i}", f))
        for i, f in enumerate(fractions)
    ]
    record_kills(reliability, "kill -9 at moments spread over the run", trials,
                 [f"kills at {', '.join(t.aim for t in trials)} of the "
                  f"{reference.window:.1f} s from run directory to summary"])
    for trial in trials:
        assert trial.acceptable, (trial, trial.resume.err)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("drill", "prefix", "occurrences", "what"),
    [
        ("kill -9 inside a checkpoint write", ".tmp-", (2, 4, 6), "write"),
        ("kill -9 inside a checkpoint prune", ".trash-", (1, 3, 4), "prune"),
    ],
)
def test_kill_9_inside_a_checkpoint_write_or_prune(
    launcher, reference, tmp_path, reliability, drill, prefix, occurrences, what
):
    trials = [
        kill_and_resume(launcher, reference, tmp_path / f"run{n}", f"{what} {n}",
                        inside(tmp_path / f"run{n}", prefix, n), watched=prefix)
        for n in occurrences
    ]
    caught = sum(t.caught for t in trials)
    record_kills(reliability, drill, trials, [
        f"aimed at {what}s {', '.join(map(str, occurrences))} of the run (or the next one "
        f"seen) by watching for `{prefix}*`; {caught} of {len(trials)} kills landed inside "
        "(the directory was still there)"
    ])
    for trial in trials:
        assert trial.acceptable, (trial, trial.resume.err)


def test_an_epochs_records_are_written_before_its_checkpoint(reference, tmp_path, reliability,
                                                             monkeypatch):
    """The kill drills found a kill between a checkpoint save and its epoch's metrics line
    losing that line for good (the resume starts after it).  The trainer now writes the
    line first; checked at the moment of every durable save of a real run."""
    saves = []
    real_save = CheckpointStore.save

    def save(store, snapshot):
        run_dir = store.directory.parent
        logged = [json.loads(line)["epoch"] for line in
                  (run_dir / "metrics.jsonl").read_text().splitlines()]
        saves.append(snapshot.epoch in logged)
        return real_save(store, snapshot)

    monkeypatch.setattr(CheckpointStore, "save", save)
    result = run_cli(train_args(tmp_path / "run", reference.cache))
    reliability("epoch's records written before its checkpoint", trials=len(saves),
                survived=sum(saves), exact=sum(saves),
                bad_inputs="a durable save of every epoch, inspected as it starts",
                notes="the state a kill between a save (or its prune) and the record would "
                      "have left can no longer arise")
    assert result.code == 0, result.err
    assert saves and all(saves)


# -- 2. damaged checkpoints ----------------------------------------------------------------


def test_a_damaged_newest_checkpoint_is_skipped_in_one_line(reference, tmp_path, reliability):
    outcomes = []
    for file in FILES:
        for damage_name, damage in DAMAGES.items():
            run_dir = reference.copy(tmp_path / f"{file}-{damage_name.replace(' ', '-')}")
            *_, previous, newest = checkpoints(run_dir)
            damage(newest / file)
            result = run_cli(["resume", str(run_dir)])
            lines = skip_lines(result)
            reported = len(lines) == 1 and f"{newest.name}/{file}" in lines[0]
            fell_back = resumed_from(run_dir) == [int(previous.name.rsplit("-", 1)[1])]
            outcomes.append((result.code == 0 and reported and fell_back,
                             reference.reproduced_by(run_dir), (file, damage_name, result.err)))
    reliability("damaged newest checkpoint", trials=len(outcomes),
                survived=sum(o[0] for o in outcomes), exact=sum(o[1] for o in outcomes),
                bad_inputs=f"each of {', '.join(FILES)}: {', '.join(DAMAGES)}",
                notes="survived: resume named the file in one `skipping checkpoint` line and "
                      "continued from the checkpoint before")
    for survived, exact, what in outcomes:
        assert survived and exact, what


def test_every_checkpoint_damaged_is_refused_and_changes_nothing(
    reference, tmp_path, reliability
):
    outcomes = []
    for file, (damage_name, damage) in zip(FILES, DAMAGES.items(), strict=True):
        run_dir = reference.copy(tmp_path / file)
        for checkpoint in checkpoints(run_dir):
            damage(checkpoint / file)
        # The lock file names the last process to open the run: rewriting it is the lock's
        # job, not a change to the run.
        before = {k: v for k, v in tree_bytes(run_dir).items() if k != ".lock"}
        result = run_cli(["resume", str(run_dir)])
        after = {k: v for k, v in tree_bytes(run_dir).items() if k != ".lock"}
        refused = result.one_line_error and "none of the 2 checkpoints" in result.err
        outcomes.append((refused and len(skip_lines(result)) == 2 and before == after,
                         (file, damage_name, result.err)))
    reliability("every checkpoint damaged", trials=len(outcomes),
                survived=sum(o[0] for o in outcomes),
                bad_inputs=", ".join(f"{f} {d}" for f, d in zip(FILES, DAMAGES, strict=True))
                + " in both checkpoints",
                notes="survived: one skip line per checkpoint, then a one-line refusal, and no "
                      "file of the run changed (but `.lock`, which names the last opener)")
    for refused, what in outcomes:
        assert refused, what


# -- 3. planted pickles --------------------------------------------------------------------


def plant(checkpoint: Path, files: tuple[str, ...], payload: bytes) -> None:
    """Replace ``files`` with ``payload`` and, like a careful attacker, fix the manifest's
    checksums for them while the manifest is still JSON."""
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    for name in files:
        (checkpoint / name).write_bytes(payload)
        if name in manifest["files"]:
            manifest["files"][name] = {"sha256": hashlib.sha256(payload).hexdigest(),
                                       "bytes": len(payload)}
    if MANIFEST_FILE not in files:
        (checkpoint / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_a_planted_pickle_never_runs_and_is_reported_in_one_line(
    reference, tmp_path, reliability
):
    marker = tmp_path / "the-payload-ran"
    pickled = pickle.dumps({"weights": PlantedPickle(marker)})
    saved = tmp_path / "saved.pt"
    torch.save({"weights": PlantedPickle(marker)}, saved)
    plantings = {
        "pickle as tensors.safetensors": ((TENSORS_FILE,), pickled),
        "pickle as state.json": ((STATE_FILE,), pickled),
        "pickle as manifest.json": ((MANIFEST_FILE,), pickled),
        "pickle as all three files": (FILES, pickled),
        "torch.save file as tensors.safetensors": ((TENSORS_FILE,), saved.read_bytes()),
    }
    outcomes = []
    for name, (files, payload) in plantings.items():
        run_dir = reference.copy(tmp_path / name.replace(" ", "-"))
        plant(newest_checkpoint(run_dir), files, payload)
        result = run_cli(["resume", str(run_dir)])
        lines = skip_lines(result)
        reported = len(lines) == 1 and "valid" in lines[0]
        outcomes.append((result.code == 0 and reported and not marker.exists(),
                         reference.reproduced_by(run_dir), (name, result.err)))
    reliability("planted pickle in the newest checkpoint", trials=len(outcomes),
                survived=sum(o[0] for o in outcomes), exact=sum(o[1] for o in outcomes),
                bad_inputs=", ".join(plantings) + " (checksums fixed to match)",
                notes="payload `os.system('touch …')`; survived: it never ran, one line called "
                      "the checkpoint not valid, and the previous one was used")
    for survived, exact, what in outcomes:
        assert survived and exact, what
    pickle.loads(pickled)  # the payload is live: unpickling it does run it
    assert marker.exists()


# -- 4. NaN and inf from a user's model ----------------------------------------------------


def poisoned_run(tmp_path: Path, reference: Reference, poison: str, stop: int | None):
    run_dir = tmp_path / f"{poison}-{stop}"
    settings = [*DRILL_SETTINGS, "model.host=plugins_for_drills:poisoned_mlp",
                f"model.kwargs.poison={poison}", "model.kwargs.start=2"]
    if stop is not None:
        settings.append(f"model.kwargs.stop={stop}")
    return run_dir, run_cli(train_args(run_dir, reference.cache, settings))


@pytest.mark.parametrize(
    ("drill", "stop", "expect"),
    [
        ("NaN/inf logits from a user model, once", 3, "recovers"),
        ("NaN/inf logits from a user model, every epoch from 2", None, "stops"),
    ],
)
def test_nan_and_inf_from_a_user_model_roll_back(
    reference, tmp_path, reliability, drill, stop, expect
):
    outcomes = []
    for poison in ("nan", "inf"):
        run_dir, result = poisoned_run(tmp_path, reference, poison, stop)
        summary = summary_without_clock(run_dir) or {}
        rollbacks = summary.get("rollbacks", 0)
        if expect == "recovers":
            ok = (result.code == 0 and summary.get("status") == "completed" and rollbacks >= 1
                  and math.isfinite(summary["final_val_loss"]))
        else:
            ok = result.one_line_error and summary.get("status") == "failed" and rollbacks >= 1
        ended = f"{result.ending}, status {summary.get('status')}, {rollbacks} rollback(s)"
        outcomes.append((ok and "Traceback" not in result.err, f"{poison}: {ended}",
                         (poison, result.err)))
    reliability(drill, trials=len(outcomes), survived=sum(o[0] for o in outcomes),
                bad_inputs="all-NaN logits, all-inf logits from epoch 2"
                + (", one attempt" if stop else ""),
                notes="; ".join(o[1] for o in outcomes) + "; survived: "
                + ("rolled back, then completed with a finite loss" if expect == "recovers"
                   else "stopped with one error line and wrote summary.json (status failed)"))
    for ok, _, what in outcomes:
        assert ok, what


# -- 5. a full disk ------------------------------------------------------------------------

PAGE = 4096


def pages(directory: Path, *, exclude: str = "") -> int:
    """The tmpfs pages the files under ``directory`` occupy (``exclude``: a subfolder)."""
    return sum(-(-p.stat().st_size // PAGE) or 1 for p in directory.rglob("*")
               if p.is_file() and not (exclude and exclude in p.relative_to(directory).parts))


@pytest.fixture
def small_disk(tmp_path):
    """``mount(kib)`` a tmpfs at ``tmp_path/disk``; unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a full-disk drill mounts a small tmpfs, which needs root and mount(8)")

    def mount(kib: int, remount: bool = False) -> Path:
        options = f"remount,size={kib}k" if remount else f"size={kib}k"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"mount -t tmpfs is not permitted here ({done.stderr.strip()}): "
                        "containers often lack CAP_SYS_ADMIN")
        return mount_point

    yield mount
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def sized_for_two_and_a_half_checkpoints(reference: Reference) -> int:
    """KiB that hold the run's small files and two checkpoints but not a third: with
    ``keep=2`` the third save is the first to need room for three."""
    checkpoint = pages(newest_checkpoint(reference.run_dir))
    small = pages(reference.run_dir, exclude="checkpoints") + 4
    return (small + 2 * checkpoint + checkpoint // 2) * PAGE // 1024


def test_a_disk_that_fills_at_a_checkpoint_stops_the_run_in_one_line(
    reference, small_disk, reliability
):
    disk = small_disk(sized_for_two_and_a_half_checkpoints(reference))
    run_dir = disk / "run"
    result = run_cli(train_args(run_dir, reference.cache))
    stopped = result.one_line_error and "No space left on device" in result.err
    kept = [p.name for p in checkpoints(run_dir)]
    clean = not dot_entries(run_dir)
    small_disk(64 * 1024, remount=True)  # space freed
    resumed = run_cli(["resume", str(run_dir)])
    exact = reference.reproduced_by(run_dir)
    reliability("full disk (tmpfs) at a checkpoint write", trials=1,
                survived=int(stopped and clean and resumed.code == 0), exact=int(exact),
                bad_inputs="a tmpfs sized for 2.5 checkpoints",
                notes=f"the run ended with {result.ending}, keeping {', '.join(kept)}"
                      f"{'' if clean else ' and a temporary'}; once the tmpfs was enlarged, "
                      f"resume ended with {resumed.ending if resumed.code else 'exit 0'}")
    assert stopped, result.err
    assert len(kept) == 2 and clean
    assert resumed.code == 0 and exact, resumed.err


def test_a_disk_filled_mid_run_stops_it_in_one_line(
    launcher, reference, small_disk, reliability
):
    disk = small_disk(8 * 1024)
    run_dir = disk / "run"
    victim = launcher.start(train_args(run_dir, reference.cache), disk.parent / "victim.log")
    wait_until(lambda: len(checkpoints(run_dir)) >= 2, victim)
    ballast = disk / "ballast"
    # Unbuffered, so the write that finds the disk full raises here, not in close().
    with open(ballast, "wb", buffering=0) as file, pytest.raises(OSError):
        while True:  # until the disk is full: every write of the run fails from here on
            file.write(b"\0" * PAGE)
    victim.join(timeout=120)
    ended = CliResult(victim.exitcode, "", (disk.parent / "victim.log").read_text())
    stopped = ended.one_line_error and "No space left" in ended.err
    ballast.unlink()
    intact = CheckpointStore(run_dir / "checkpoints", keep=2).load_latest().epoch >= 1
    resumed = run_cli(["resume", str(run_dir)])
    exact = reference.reproduced_by(run_dir)
    reliability("full disk (tmpfs) filled mid-run", trials=1,
                survived=int(stopped and intact and resumed.code == 0), exact=int(exact),
                bad_inputs="every write fails once 2 checkpoints exist",
                notes="the run's next write (a record, status or checkpoint) hits ENOSPC; it "
                      f"ended with {ended.ending}")
    assert stopped, ended.err
    assert intact


def test_enospc_in_a_checkpoint_write_stops_the_run_in_one_line(
    reference, tmp_path, reliability
):
    run_dir = tmp_path / "run"
    # The disk fills as the checkpoint of epoch 3 is written, and stays full for checkpoints.
    with FullDisk(run_dir / "checkpoints", when=lambda path: "epoch-3" in str(path)):
        result = run_cli(train_args(run_dir, reference.cache))
    stopped = result.one_line_error and "No space left on device" in result.err
    kept = [p.name for p in checkpoints(run_dir)]
    clean = not dot_entries(run_dir)
    summary = summary_without_clock(run_dir) or {}
    resumed = run_cli(["resume", str(run_dir)])
    exact = reference.reproduced_by(run_dir)
    reliability("ENOSPC in a checkpoint write (in-process)", trials=1,
                survived=int(stopped and clean and resumed.code == 0), exact=int(exact),
                bad_inputs="writes under checkpoints/ fail with ENOSPC from epoch 3's on",
                notes=f"the run ended with {result.ending}, keeping {', '.join(kept)}"
                      f"{'' if clean else ' and a temporary'}; summary status "
                      f"{summary.get('status')}; resumed once writes worked")
    assert stopped, result.err
    assert kept == ["ckpt-000001-epoch-1", "ckpt-000002-epoch-2"] and clean
    assert summary.get("status") == "failed"
    assert resumed.code == 0 and exact, resumed.err


def test_enospc_on_every_write_stops_the_run_in_one_line(reference, tmp_path, reliability):
    run_dir = tmp_path / "run"
    saved = run_dir / "checkpoints" / "ckpt-000002-epoch-2"
    # Full as soon as epoch 2's checkpoint is on disk: its event record is the next write.
    with FullDisk(run_dir, when=lambda path: saved.exists()):
        result = run_cli(train_args(run_dir, reference.cache))
    stopped = result.one_line_error and "No space left on device" in result.err
    intact = CheckpointStore(run_dir / "checkpoints", keep=2).load_latest().epoch == 2
    resumed = run_cli(["resume", str(run_dir)])
    exact = reference.reproduced_by(run_dir)
    reliability("ENOSPC on every write (in-process)", trials=1,
                survived=int(stopped and intact and resumed.code == 0), exact=int(exact),
                bad_inputs="every write under the run directory fails once epoch 2 is saved",
                notes=f"records, status and summary writes hit ENOSPC; the run ended with "
                      f"{result.ending}")
    assert stopped, result.err
    assert intact


# -- 6. two writers ------------------------------------------------------------------------


def test_a_second_writer_is_refused_and_the_first_run_is_unaffected(
    launcher, reference, tmp_path, reliability
):
    run_dir = tmp_path / "run"
    victim = launcher.start(train_args(run_dir, reference.cache), tmp_path / "first.log")
    attempts = []
    # Not after the last epoch: the run must still be training when the second one asks.
    for epochs in (1, 2, 4):
        wait_until(lambda n=epochs: len(metrics(run_dir)) >= n, victim)
        result = run_cli(["resume", str(run_dir)])
        attempts.append((victim.is_alive(), result))
    victim.join(timeout=120)
    refused = [alive and result.one_line_error and f"in use by pid {victim.pid}" in result.err
               for alive, result in attempts]
    epochs = [r["epoch"] for r in metrics(run_dir)]
    unaffected = victim.exitcode == 0 and epochs == list(range(6))
    matched = reference.reproduced_by(run_dir)
    reliability("second `tolaria resume` while a run trains", trials=len(attempts),
                survived=sum(r and unaffected for r in refused),
                bad_inputs="resume after epochs 1, 2 and 4 of a running train",
                notes="survived: refused in one line naming the holder's pid while it trained, "
                      "and the first run logged each epoch once; its records "
                      + ("matched" if matched else "did not match") + " the reference run's")
    assert all(refused), [result.err for _, result in attempts]
    assert unaffected, epochs
    assert matched
