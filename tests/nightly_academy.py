"""An academy whose replay holds a few daytime runs, written straight through the replay
buffer's API (no training): what the nightly session's own tests start from."""

from __future__ import annotations

import json
from pathlib import Path

from tolaria.academy.nightly import Jobs
from tolaria.academy.registry import PolicyRegistry
from tolaria.academy.replay import ReplayBuffer
from tolaria.config import load_config

PROFILE = {"device_type": "cpu", "device_name": "cpu", "cpu_count": 1, "memory_gib": 8}
TASK = "synthetic(family=rings,size=8)/mlp[32,32]"
#: The stand-in jobs of tests/plugins_for_sandbox.py.
PASSING = Jobs(snapshot="plugins_for_sandbox:snapshot", train="plugins_for_sandbox:train",
               validate="plugins_for_sandbox:validate_pass")


def record_runs(academy: Path, runs: int, *, points: int = 6, first: int = 0,
                profile: dict = PROFILE) -> list[str]:
    """``runs`` finished daytime runs of ``points`` settled decision points each (every
    other one a graft with a reward); returns their run ids."""
    ids = []
    with ReplayBuffer.in_academy(academy) as replay:
        for index in range(first, first + runs):
            run_id = f"/runs/day-{index:03d}"
            replay.begin_run(run_id, task=TASK, fingerprint={"dataset": "rings"},
                             config={"run": {"seed": index}}, hardware=profile,
                             policy="learned", policy_version="v0")
            for n in range(points):
                chosen = n % 2
                point = {"point_id": f"p{n}", "epoch": n, "attempt": 1, "slot": 0,
                         "observation": {"epoch": n, "val_loss": 1.0 / (n + 1)},
                         "candidates": [{"seed_id": "s0", "blueprint": "se_gate"}],
                         "chosen": chosen, "propensity": 0.5, "policy": "learned",
                         "policy_version": "v0"}
                result = "fossilized" if chosen else "wait"
                replay.add_point(run_id, point, outcome={"result": result, "epoch": n},
                                 reward=0.01 * (index + n) if chosen else 0.0)
            replay.end_run(run_id, status="completed", metrics={"test_accuracy": 0.5})
            ids.append(run_id)
    return ids


def nightly_config(**settings):
    """The default config with a session small enough for the stand-in data."""
    overrides = [f"academy.nightly.{key}={json.dumps(value)}" for key, value in
                 {"min_points": 5, **settings}.items()]
    return load_config(None, overrides)


def read_record(academy: Path, session: str) -> dict:
    return json.loads((academy / "nightly" / session / "session.json").read_text())


def nightly_attempts(academy: Path) -> list[dict]:
    return [a for a in PolicyRegistry(academy).attempts() if a["kind"] == "nightly"]


def check_consistent(academy: Path) -> str:
    """What kill -9 must never break: CHAMPION loads, every version directory loads, the
    replay opens and every nightly attempt names a version that exists (or none) and a
    finished session; returns the champion's name."""
    registry = PolicyRegistry(academy)
    champion = registry.champion(warn=lambda line: (_ for _ in ()).throw(AssertionError(line)))
    broken = [(name, str(found)) for name, found in registry.survey()
              if isinstance(found, Exception)]
    assert not broken, broken
    versions = set(registry.versions())
    for attempt in nightly_attempts(academy):
        assert attempt["version"] == "" or attempt["version"] in versions, attempt
        session = read_record(academy, attempt["detail"]["session"])
        assert session["status"] == attempt["outcome"], (session, attempt)
    return champion.name
