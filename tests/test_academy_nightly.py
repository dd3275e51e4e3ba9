"""The nightly session's pipeline with stand-in jobs: deploy, keep, fail cleanly, skip,
one session at a time, and the debris of a killed one."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest

from nightly_academy import (
    PASSING,
    PROFILE,
    check_consistent,
    nightly_attempts,
    nightly_config,
    read_record,
    record_runs,
)
from tolaria.academy.nightly import clean_debris, run_session, session_lock
from tolaria.academy.registry import PolicyRegistry
from tolaria.errors import NightlyInUse


@pytest.fixture
def academy(tmp_path):
    path = tmp_path / "academy"
    record_runs(path, 4)
    return path


def test_passing_gates_deploy_the_candidate(academy):
    record = run_session(academy, nightly_config(), jobs=PASSING)
    assert record["status"] == "deployed" and record["cause"] is None
    assert record["champion"] == "v0" and record["candidate"] == "v1"
    assert [s["name"] for s in record["steps"]] == ["snapshot", "train", "validate", "deploy"]
    assert all(s["status"] == "ok" and s["finished"] for s in record["steps"])
    registry = PolicyRegistry(academy)
    assert registry.champion().name == "v1"
    card = registry.load("v1").card
    assert card["parent"] == "v0" and card["session"] == record["session"]
    assert card["gates"]["failed_gate"] is None
    assert card["gates"]["diversity_score"] == {"value": 0.7, "threshold": 0.4, "passed": True}
    assert card["trained_on"]["until"] == record["replay"]["until"]
    assert set(card["adapter_sha256"]) == {"adapter_config.json", "adapter_model.safetensors"}
    # One held-out run of four; recent and held-out together are every point recorded.
    replay = record["replay"]
    assert replay["runs"] == 4 and len(replay["held_out_runs"]) == 1
    assert (replay["recent_points"], replay["held_out_points"], replay["history_points"]) == (
        18, 6, 0)
    session_dir = academy / "nightly" / record["session"]
    assert len(json.loads((session_dir / "data" / "recent.json").read_text())) == 18
    assert (session_dir / "snapshots" / "0.pt").is_file()
    assert not (session_dir / "scratch").exists()
    assert read_record(academy, record["session"]) == record
    (attempt,) = nightly_attempts(academy)
    assert (attempt["version"], attempt["parent"], attempt["outcome"]) == ("v1", "v0", "deployed")
    assert attempt["detail"]["profiles_seen"] == [PROFILE]
    assert attempt["detail"]["session_training_s"] > 0
    assert check_consistent(academy) == "v1"
    # The session ends by publishing the monitor's metrics, this attempt counted.
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(academy / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("academy/policy_success_rate")] == [
        (1, 1.0)]


def test_a_failing_gate_keeps_the_champion_and_the_card_names_it(academy):
    jobs = dataclasses.replace(PASSING, validate="plugins_for_sandbox:validate_fail_diversity")
    record = run_session(academy, nightly_config(), jobs=jobs)
    assert record["status"] == "rejected" and record["failed_gate"] == "diversity_score"
    registry = PolicyRegistry(academy)
    assert registry.champion().name == "v0"
    card = registry.load(record["candidate"]).card
    assert card["gates"]["failed_gate"] == "diversity_score"
    assert card["decision"] == "kept v0: gate diversity_score failed"
    assert nightly_attempts(academy)[0]["outcome"] == "rejected"


@pytest.mark.parametrize(("train", "settings", "cause"), [
    # The budget is the session's: the job gets what the snapshot step left of it.
    ("plugins_for_sandbox:sleep", {"budget_s": 4}, r"timed out after [34](\.\d)? s"),
    ("plugins_for_sandbox:allocate", {"memory_gib": 1}, "exceeded its 1 GiB memory cap"),
    ("plugins_for_sandbox:crash", {}, r"crashed \(exit 1\): ValueError: the job broke on purpose"),
])
def test_a_failed_training_fails_the_attempt_and_changes_nothing_else(
    academy, train, settings, cause
):
    record = run_session(academy, nightly_config(**settings),
                         jobs=dataclasses.replace(PASSING, train=train))
    assert record["status"] == "failed" and re.search(f"{cause}$", record["cause"])
    assert record["candidate"] is None
    assert [(s["name"], s["status"]) for s in record["steps"]] == [
        ("snapshot", "ok"), ("train", "failed")]
    (attempt,) = nightly_attempts(academy)
    assert attempt["outcome"] == "failed" and attempt["detail"]["cause"] == record["cause"]
    assert attempt["version"] == ""
    registry = PolicyRegistry(academy)
    assert registry.versions() == ["v0"] and registry.champion().name == "v0"
    assert not (academy / "nightly" / record["session"] / "scratch").exists()


def test_a_candidate_whose_gates_crash_is_registered_but_never_promoted(academy):
    jobs = dataclasses.replace(PASSING, validate="plugins_for_sandbox:crash")
    record = run_session(academy, nightly_config(), jobs=jobs)
    assert record["status"] == "failed" and "ValueError" in record["cause"]
    registry = PolicyRegistry(academy)
    assert registry.champion().name == "v0"
    card = registry.load(record["candidate"]).card
    assert card["decision"].startswith("kept v0: its gates were not measured")
    assert nightly_attempts(academy)[0]["version"] == record["candidate"]


def test_too_few_recent_points_is_nothing_to_learn_and_no_attempt(tmp_path):
    academy = tmp_path / "academy"
    record_runs(academy, 1, points=2)
    record = run_session(academy, nightly_config(), jobs=PASSING)
    assert record["status"] == "skipped"
    assert record["cause"].startswith("nothing to learn: 1 recent run(s)")
    record_runs(academy, 2, points=2, first=1)  # three runs now, but few points to learn from
    record = run_session(academy, nightly_config(min_points=50), jobs=PASSING)
    assert record["cause"] == "nothing to learn: 4 settled recent decision points (fewer than 50)"
    assert record["steps"] == [] and nightly_attempts(academy) == []


def test_the_next_session_learns_from_what_came_after_the_last_one(academy):
    first = run_session(academy, nightly_config(), jobs=PASSING)
    nothing = run_session(academy, nightly_config(), jobs=PASSING)
    assert nothing["cause"].startswith("nothing to learn: 0 recent run(s); a session needs two")
    record_runs(academy, 3, first=10)
    second = run_session(academy, nightly_config(), jobs=PASSING)
    assert second["session"] > nothing["session"] > first["session"]
    assert second["replay"]["from"] == first["replay"]["until"]
    assert second["replay"]["runs"] == 3 and second["replay"]["history_points"] == 24
    assert (second["champion"], second["candidate"]) == ("v1", "v2")
    assert PolicyRegistry(academy).load("v2").card["parent"] == "v1"


def test_a_second_session_is_refused_naming_the_one_running(academy):
    with session_lock(academy) as claim:
        claim("20260101T020000Z")
        with pytest.raises(NightlyInUse, match=rf"session 20260101T020000Z, pid {os.getpid()}"):
            run_session(academy, nightly_config(), jobs=PASSING)
    assert NightlyInUse.exit_code == 2


def test_the_debris_of_a_killed_session_is_cleaned(academy):
    killed = academy / "nightly" / "20260101T020000Z"
    (killed / "scratch" / "candidate").mkdir(parents=True)
    record = {"session": killed.name, "pid": 999999999, "started": "2026-01-01T02:00:00",
              "started_ts": 1.0, "finished": None, "status": "running", "champion": "v0",
              "candidate": None, "cause": None, "gates": {}, "failed_gate": None,
              "steps": [{"name": "train", "started": "2026-01-01T02:00:01", "finished": None,
                         "status": "running", "detail": {}}]}
    (killed / "session.json").write_text(json.dumps(record))
    with session_lock(academy):
        (cleaned,) = clean_debris(academy)
    assert cleaned["session"] == killed.name
    after = read_record(academy, killed.name)
    assert (after["status"], after["cause"], after["killed_during"]) == ("failed", "killed",
                                                                          "train")
    assert after["steps"][0]["status"] == "failed" and after["finished"]
    assert not (killed / "scratch").exists()
    (attempt,) = nightly_attempts(academy)
    assert attempt["detail"]["session"] == killed.name and attempt["outcome"] == "failed"
    with session_lock(academy):
        assert clean_debris(academy) == []  # once: the attempt is not recorded twice
    assert len(nightly_attempts(academy)) == 1
