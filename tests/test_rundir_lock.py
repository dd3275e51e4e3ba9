"""A run directory has one writer: a second process is refused, a dead one's lock taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tolaria.cli import main
from tolaria.errors import RunDirectoryInUse
from tolaria.rundir import LOCK_FILE, RunDirectory

HOLD = (
    "import sys, time; from tolaria.rundir import RunDirectory; "
    "from tolaria.config import TolariaConfig; "
    "run = RunDirectory.create(sys.argv[1], TolariaConfig()); print('locked', flush=True); "
    "time.sleep(60)"
)


def hold_lock(path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_process_is_refused_the_run_directory_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        with pytest.raises(RunDirectoryInUse, match=f"pid {holder.pid}"):
            RunDirectory.open_existing(run)
        before = sorted(p.name for p in run.iterdir())
        assert main(["resume", str(run)]) == 1
        err = capsys.readouterr().err
        assert f"in use by pid {holder.pid}" in " ".join(err.split())
        assert "Traceback" not in err
        assert sorted(p.name for p in run.iterdir()) == before  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = hold_lock(run)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert f"pid {holder.pid}" in (run / LOCK_FILE).read_text()  # the stale record remains
    deadline = time.monotonic() + 10
    while True:  # the kernel drops a dead process's flock as it reaps it
        try:
            directory, _ = RunDirectory.open_existing(run)
            break
        except RunDirectoryInUse:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert f"pid {os.getpid()}" in (run / LOCK_FILE).read_text()
    directory.close()
