"""The academy's replay buffer: the store on its own, the reward, and real runs writing it
(killed, resumed, rolled back, two at once)."""

from __future__ import annotations

import math
import sqlite3
import threading

import pytest

from tolaria.academy import replay
from tolaria.academy.replay import REPLAY_FILE, REPLAY_SCHEMA, ReplayBuffer
from tolaria.academy.reward import INCIDENT_PENALTY, PARAM_COST_WEIGHT, reward
from tolaria.errors import ReplayError, ReplaySchemaError

# -- the store ------------------------------------------------------------------------------


def begin(buffer: ReplayBuffer, run_id: str = "run-a", task: str = "blobs/mlp[16,16]",
          **changes) -> None:
    row = dict(task=task, fingerprint={"dataset": "blobs", "params": 100},
               config={"run": {"epochs": 4}}, hardware={"device_type": "cpu", "memory_gib": 8},
               policy="heuristic", policy_version=None)
    buffer.begin_run(run_id, **{**row, **changes})


def point(number: int, epoch: int, chosen: int = 1, **changes) -> dict:
    return {
        "point_id": f"p{number}", "epoch": epoch, "attempt": 1, "slot": 0,
        "observation": {"epoch": epoch, "validation_loss": 1.0 / (epoch + 1)},
        "candidates": [{"seed_id": "hidden.0.0", "blueprint": "low_rank", "param_cost": 40,
                        "penalty": 0.0}],
        "chosen": chosen, "propensity": 0.5, "policy": "heuristic", "policy_version": None,
        **changes,
    }


def test_points_come_back_with_their_outcome_in_point_order(tmp_path):
    with ReplayBuffer.in_academy(tmp_path / "academy") as buffer:
        begin(buffer, "run-b")
        begin(buffer, "run-a")
        for number in (10, 2, 1):  # numbered, not alphabetical: p10 comes after p2
            buffer.add_point("run-a", point(number, epoch=number))
        buffer.add_point("run-b", point(1, epoch=0, observation={"loss": math.nan}))
        buffer.add_outcome("run-a", "p2", {"result": "culled", "epoch": 5}, -0.25)

        points = buffer.points()
        assert [(p["run_id"], p["point_id"]) for p in points] == [
            ("run-a", "p1"), ("run-a", "p2"), ("run-a", "p10"), ("run-b", "p1")]
        assert points[1]["outcome"] == {"result": "culled", "epoch": 5}
        assert points[1]["reward"] == -0.25
        assert points[0]["outcome"] is None and points[0]["reward"] is None
        assert points[0]["candidates"] == point(1, 1)["candidates"]
        assert math.isnan(points[3]["observation"]["loss"])  # non-finite numbers survive
        assert [p["point_id"] for p in buffer.points(run_id="run-b")] == ["p1"]
        assert len(buffer.points(task="blobs/mlp[16,16]")) == 4
        assert buffer.points(task="digits/mlp[32,32]") == []
        assert buffer.size_by_task() == {"blobs/mlp[16,16]": 4}
    assert (tmp_path / "academy" / REPLAY_FILE).exists()


def test_the_file_is_wal_durable_and_marked_with_its_schema(tmp_path):
    ReplayBuffer(tmp_path / "r.sqlite").close()
    db = sqlite3.connect(tmp_path / "r.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == REPLAY_SCHEMA
    assert db.execute("PRAGMA application_id").fetchone()[0] == replay.APPLICATION_ID
    buffer = ReplayBuffer(tmp_path / "r.sqlite")  # reopening changes nothing
    assert buffer._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    buffer.close()


def test_a_resumed_run_updates_its_row_and_a_point_emitted_again_replaces_the_old(tmp_path):
    buffer = ReplayBuffer.in_academy(tmp_path)
    begin(buffer)
    buffer.add_point("run-a", point(1, epoch=0))
    buffer.add_outcome("run-a", "p1", {"result": "fossilized", "epoch": 3}, 0.1)
    buffer.end_run("run-a", status="failed", metrics={"val_accuracy": 0.5})
    started = buffer.runs()[0]["started"]

    begin(buffer, config={"run": {"epochs": 8}})  # resume: the same row, brought up to date
    buffer.add_point("run-a", point(1, epoch=0, chosen=0))
    [run] = buffer.runs()
    assert (run["status"], run["metrics"], run["config"]) == ("running", None,
                                                              {"run": {"epochs": 8}})
    assert run["started"] == started and run["updated"] >= started
    [again] = buffer.points()
    assert again["chosen"] == 0 and again["outcome"] is None  # the old outcome went with it

    buffer.end_run("run-a", status="completed", metrics={"val_accuracy": 0.75})
    assert buffer.runs()[0]["metrics"] == {"val_accuracy": 0.75}


def test_rewind_forgets_the_points_and_outcomes_after_an_epoch(tmp_path):
    buffer = ReplayBuffer.in_academy(tmp_path)
    begin(buffer)
    begin(buffer, "run-b")
    for number in range(1, 5):
        buffer.add_point("run-a", point(number, epoch=number - 1))
    buffer.add_point("run-b", point(1, epoch=3))
    buffer.add_outcome("run-a", "p1", {"result": "culled", "epoch": 1}, 0.0)  # settled early
    buffer.add_outcome("run-a", "p2", {"result": "fossilized", "epoch": 3}, 0.2)  # settled late

    buffer.rewind("run-a", 1)
    assert [(p["point_id"], p["outcome"] is not None) for p in buffer.points(run_id="run-a")] \
        == [("p1", True), ("p2", False)]
    assert len(buffer.points(run_id="run-b")) == 1  # another run's points stay


def test_bad_records_are_one_replay_error_line(tmp_path):
    buffer = ReplayBuffer.in_academy(tmp_path)
    with pytest.raises(ReplayError, match="point_id"):
        buffer.add_point("run-a", {"epoch": 0})
    with pytest.raises(ReplayError, match="FOREIGN KEY"):  # a run that was never begun
        buffer.add_point("run-a", point(1, epoch=0))
    begin(buffer)
    with pytest.raises(ReplayError, match="'q1' is not 'p<n>'"):
        buffer.add_point("run-a", point(1, epoch=0, point_id="q1"))
    with pytest.raises(ReplayError, match="FOREIGN KEY"):  # an outcome of no decision point
        buffer.add_outcome("run-a", "p7", {"result": "culled"}, 0.0)
    with pytest.raises(ReplayError, match="never begun"):
        buffer.end_run("run-z", status="completed", metrics={})
    assert buffer.points() == []  # every failed write left nothing


def test_attempts_newest_first(tmp_path):
    buffer = ReplayBuffer.in_academy(tmp_path)
    ids = [buffer.record_attempt(version=f"v{n}", parent=f"v{n - 1}" if n else None,
                                 kind="nightly", outcome="deployed" if n % 2 else "rejected",
                                 detail={"gates": {"diversity_score": n / 10}},
                                 started=100.0 + n, finished=101.0 + n)
           for n in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    newest = buffer.attempts()
    assert [a["version"] for a in newest] == ["v2", "v1", "v0"]
    assert newest[0] == {"id": ids[2], "version": "v2", "parent": "v1", "kind": "nightly",
                         "outcome": "rejected", "detail": {"gates": {"diversity_score": 0.2}},
                         "started": 102.0, "finished": 103.0}
    assert [a["version"] for a in buffer.attempts(limit=2)] == ["v2", "v1"]


def test_a_newer_schema_or_a_file_that_is_not_ours_is_refused_in_one_line(tmp_path):
    ReplayBuffer(tmp_path / "new.sqlite").close()
    db = sqlite3.connect(tmp_path / "new.sqlite")
    db.execute(f"PRAGMA user_version = {REPLAY_SCHEMA + 1}")
    db.close()
    with pytest.raises(ReplaySchemaError, match=f"schema {REPLAY_SCHEMA + 1} is newer") as exc:
        ReplayBuffer(tmp_path / "new.sqlite")
    assert "\n" not in str(exc.value) and exc.value.exit_code == 2

    other = sqlite3.connect(tmp_path / "other.sqlite")
    other.execute("CREATE TABLE notes (text TEXT)")
    other.close()
    with pytest.raises(ReplaySchemaError, match="another program's database"):
        ReplayBuffer(tmp_path / "other.sqlite")
    journal = sqlite3.connect(tmp_path / "other.sqlite")
    assert journal.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # left untouched

    (tmp_path / "text.sqlite").write_text("not a database at all\n" * 100)
    with pytest.raises(ReplaySchemaError, match="not an SQLite database"):
        ReplayBuffer(tmp_path / "text.sqlite")


def test_readers_do_not_wait_for_a_writer_and_writers_wait_for_each_other(tmp_path):
    buffer = ReplayBuffer.in_academy(tmp_path)
    begin(buffer)
    buffer.add_point("run-a", point(1, epoch=0))
    writer = sqlite3.connect(tmp_path / REPLAY_FILE, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another run, in the middle of a write
    writer.execute("DELETE FROM decision_points")

    with ReplayBuffer.in_academy(tmp_path) as reader:  # opens and reads meanwhile
        assert [p["point_id"] for p in reader.points()] == ["p1"]  # the committed state
        assert reader.size_by_task() == {"blobs/mlp[16,16]": 1}

    done = threading.Event()

    def write_after_the_other() -> None:  # a third run (a connection is per thread)
        with ReplayBuffer.in_academy(tmp_path) as third:
            third.add_point("run-a", point(2, epoch=1))  # waits for the lock, not fails
        done.set()

    thread = threading.Thread(target=write_after_the_other)
    thread.start()
    assert not done.wait(0.3)  # still waiting while the other transaction is open
    writer.execute("COMMIT")
    thread.join(timeout=replay.BUSY_TIMEOUT_S)
    assert done.is_set()
    assert [p["point_id"] for p in buffer.points()] == ["p2"]  # after the other's delete


def test_a_lock_held_past_the_timeout_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(replay, "BUSY_TIMEOUT_S", 0.05)
    buffer = ReplayBuffer.in_academy(tmp_path)
    writer = sqlite3.connect(tmp_path / REPLAY_FILE, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    with pytest.raises(ReplayError, match=r"locked: another process held it for more than 0\.05 s"):
        begin(buffer)
    writer.execute("ROLLBACK")
    begin(buffer)  # the buffer still works once the lock is gone
    assert len(buffer.runs()) == 1


# -- the reward -----------------------------------------------------------------------------


def test_the_reward_of_an_outcome():
    graft = {"result": "fossilized", "gain_accuracy": 0.04, "param_cost": 300, "incidents": 0}
    assert reward(graft, 3000) == pytest.approx(0.04 - PARAM_COST_WEIGHT * 0.1)
    assert reward({**graft, "incidents": 2}, 3000) == pytest.approx(
        reward(graft, 3000) - 2 * INCIDENT_PENALTY)
    unjudged = {**graft, "result": "culled", "gain_accuracy": None}  # culled before judgement
    assert reward(unjudged, 3000) == pytest.approx(-PARAM_COST_WEIGHT * 0.1)
    assert reward({**unjudged, "gain_accuracy": math.nan}, 3000) == reward(unjudged, 3000)
    assert reward({"result": "wait"}, 3000) == 0.0
    assert reward(graft, 3000) > reward(graft, 1000)  # the same graft costs a small host more
    with pytest.raises(ValueError, match="host_params"):
        reward(graft, 0)
