"""One real nightly session end to end -- daytime runs on a workload v0 never saw, then
``tolaria nightly`` with the adapter and the gates in the sandbox -- and its determinism."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tolaria.academy.demo import demo_config
from tolaria.academy.registry import PolicyRegistry
from tolaria.build import build_trainer

pytestmark = pytest.mark.slow

#: Small enough for seconds: short runs, few adapter steps, a short history gate.
SESSION = ["--set", "academy.nightly.min_points=10", "--set", "academy.nightly.steps=100",
           "--set", "academy.nightly.history_epochs=3"]


@pytest.fixture(scope="module")
def daytime(tmp_path_factory) -> Path:
    """Four short daytime runs of the exploring learned policy on rings."""
    academy = tmp_path_factory.mktemp("day") / "academy"
    for seed in range(4):
        config = demo_config(academy, seed)
        config.run.epochs = 10
        config.data.kwargs["n"] = 1200
        build_trainer(config, run_dir=academy / "runs" / f"day-{seed}").train()
    return academy


def nightly(academy: Path) -> subprocess.CompletedProcess:
    src = Path(__file__).parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), *sys.path])}
    return subprocess.run([sys.executable, "-m", "tolaria", "nightly", "--academy",
                           str(academy), *SESSION], env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_session_on_the_day_s_replay_deploys_and_is_deterministic(daytime, tmp_path):
    copies = [tmp_path / "a", tmp_path / "b"]
    for copy in copies:
        shutil.copytree(daytime, copy)
    records = []
    for copy in copies:
        done = nightly(copy)
        assert done.returncode == 0, done.stderr
        assert "deployed: v1 is the champion (was v0)" in done.stdout
        (session,) = [p for p in (copy / "nightly").iterdir() if p.is_dir()]
        records.append(json.loads((session / "session.json").read_text()))
    first, second = records
    assert first["status"] == "deployed" and first["failed_gate"] is None
    assert all(gate["passed"] for gate in first["gates"].values())
    assert [s["name"] for s in first["steps"]] == ["snapshot", "train", "validate", "deploy"]
    train = first["steps"][1]["detail"]
    assert train["loss_last"] < train["loss_first"]
    assert first["profiles_tested"] == first["profiles_seen"]
    # The same academy gives the same candidate and the same gates, bit for bit.
    assert first["gates"] == second["gates"]
    assert first["validation_divergence"] == second["validation_divergence"]
    versions = [PolicyRegistry(copy).load("v1") for copy in copies]
    assert versions[0].card["sha256"] == versions[1].card["sha256"]
    assert versions[0].card["adapter_sha256"] == versions[1].card["adapter_sha256"]
    for version in versions:
        assert PolicyRegistry(version.path.parents[1]).champion().name == "v1"
        trained_on = version.card["trained_on"]  # the train job's draft, completed
        assert trained_on["examples"] > 0 and trained_on["session"] == version.card["session"]
        assert (version.path / "adapter" / "adapter_config.json").is_file()
