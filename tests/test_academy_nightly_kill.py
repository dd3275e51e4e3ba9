"""kill -9 at each step of a nightly session: the academy stays consistent, and the next
session cleans the debris and runs to the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nightly_academy import (
    PASSING,
    check_consistent,
    nightly_attempts,
    nightly_config,
    read_record,
    record_runs,
)
from tolaria.academy.nightly import run_session
from tolaria.academy.registry import PolicyRegistry

pytestmark = pytest.mark.slow

#: The session a test kills: stalled at ``argv[2]`` by a stand-in job or by its listener.
SESSION = """
import dataclasses, os, sys, time
from pathlib import Path
from nightly_academy import PASSING, nightly_config
from tolaria.academy.nightly import SessionListener, run_session

academy, where = Path(sys.argv[1]), sys.argv[2]
jobs = {
    "snapshot": dataclasses.replace(PASSING, snapshot="plugins_for_sandbox:snapshot_then_stall"),
    "train": dataclasses.replace(PASSING, train="plugins_for_sandbox:train_then_stall"),
    "validate": dataclasses.replace(PASSING, validate="plugins_for_sandbox:validate_stall"),
}.get(where, PASSING)

def stall():
    Path(os.environ["TOLARIA_TEST_MARKER"]).write_text(str(os.getpid()))
    time.sleep(3600)

class Stall(SessionListener):
    def on_registered(self, record, version):
        if where == "register":  # registered, not yet promoted
            stall()
    def on_step_end(self, record, step):
        if where == "promote" and step["name"] == "deploy":  # promoted, not yet recorded
            stall()

run_session(academy, nightly_config(), jobs=jobs, listener=Stall())
"""

TESTS = Path(__file__).parent


def _wait_for_stall(process: subprocess.Popen, academy: Path, marker: Path) -> int:
    """The pid of whatever stalled (the session or its sandbox), once it has."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        found = [marker, *academy.glob("nightly/*/scratch/stalled")]
        for path in found:
            if path.exists() and path.read_text():
                return int(path.read_text())
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.2)
    raise AssertionError("the session never reached its stall")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie child of ours counts as gone; anything else still runs.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


@pytest.mark.parametrize(("where", "champion", "status"), [
    ("snapshot", "v0", "failed"),
    ("train", "v0", "failed"),
    ("validate", "v0", "failed"),
    ("register", "v0", "failed"),
    ("promote", "v1", "deployed"),
])
def test_kill_at_each_step_leaves_a_consistent_academy(tmp_path, where, champion, status):
    academy = tmp_path / "academy"
    record_runs(academy, 4)
    marker = tmp_path / "stalled"
    env = {**os.environ, "TOLARIA_TEST_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    process = subprocess.Popen([sys.executable, "-c", SESSION, str(academy), where], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stalled = _wait_for_stall(process, academy, marker)
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30  # a sandbox dies with the session that started it
    while not _gone(stalled) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(stalled)

    assert check_consistent(academy) == champion  # before anyone cleans up
    (killed,) = [p.name for p in (academy / "nightly").iterdir() if p.is_dir()]
    assert read_record(academy, killed)["status"] == "running"

    record_runs(academy, 3, first=10)
    record = run_session(academy, nightly_config(), jobs=PASSING)
    assert record["status"] == "deployed"
    after = read_record(academy, killed)
    # A killed session learned nothing -- unless it was killed after its promote.
    consumed = after["replay"]["until"] if status == "deployed" else None
    assert record["replay"]["from"] == consumed
    assert record["replay"]["runs"] == (3 if consumed else 7)
    assert after["status"] == status and after["cause"] in ("killed", "killed after its promote")
    assert not (academy / "nightly" / killed / "scratch").exists()
    assert [a["detail"]["session"] for a in nightly_attempts(academy)] == [
        record["session"], killed]
    registry = PolicyRegistry(academy)
    assert check_consistent(academy) == record["candidate"]
    assert record["champion"] == champion
    if where == "register":  # its candidate stays, and says it never became champion
        card = registry.load("v1").card
        assert card["decision"] == f"never promoted: session {killed} was killed before its promote"
        assert record["candidate"] == "v2"
