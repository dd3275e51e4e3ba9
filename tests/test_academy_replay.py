"""The academy's replay buffer: the store on its own, the reward, and real runs writing it
(killed, resumed, rolled back, two at once)."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sqlite3
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from drills import CLI_SETTINGS, Launcher, metrics, run_cli, train_args, wait_until
from tolaria.academy import replay
from tolaria.academy.recorder import task_fingerprint, task_key
from tolaria.academy.replay import REPLAY_FILE, REPLAY_SCHEMA, ReplayBuffer
from tolaria.academy.reward import INCIDENT_PENALTY, PARAM_COST_WEIGHT, reward
from tolaria.build import build_trainer
from tolaria.config import ACADEMY_VARIABLE, ModelConfig, TolariaConfig, config_for_resume
from tolaria.errors import ConfigError, ReplayError, ReplaySchemaError
from tolaria.events import Callback

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
        buffer.add_point("run-b", point(1, epoch=0, chosen=0, observation={"loss": math.nan}),
                         outcome={"result": "wait", "epoch": 0}, reward=0.0)  # settled at once
        buffer.add_outcome("run-a", "p2", {"result": "culled", "epoch": 5}, -0.25)

        points = buffer.points()
        assert [(p["run_id"], p["point_id"]) for p in points] == [
            ("run-a", "p1"), ("run-a", "p2"), ("run-a", "p10"), ("run-b", "p1")]
        assert points[1]["outcome"] == {"result": "culled", "epoch": 5}
        assert points[1]["reward"] == -0.25
        assert points[0]["outcome"] is None and points[0]["reward"] is None
        assert points[0]["candidates"] == point(1, 1)["candidates"]
        assert math.isnan(points[3]["observation"]["loss"])  # non-finite numbers survive
        assert (points[3]["outcome"]["result"], points[3]["reward"]) == ("wait", 0.0)
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
    with pytest.raises(ReplayError, match="a result and a reward"):  # the point goes with it
        buffer.add_point("run-a", point(1, epoch=0, chosen=0), outcome={"epoch": 0}, reward=0.0)
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


# -- the recorder in real runs --------------------------------------------------------------


def recorded_run(config, data, tmp_path, **kwargs):
    """Train ``config`` into ``tmp_path / "run"``; the replay buffer it wrote, and the
    decision points the controller emitted (in order)."""
    emitted = []

    class Emitted(Callback):
        def on_decision_point(self, trainer, record):
            emitted.append(record)

    trainer = build_trainer(config, data=data, run_dir=tmp_path / "run",
                            callbacks=[Emitted()], **kwargs)
    trainer.train()
    return trainer, ReplayBuffer.in_academy(config.academy_dir()), emitted


def test_a_run_records_its_row_points_and_outcomes(tiny_config, tiny_data, tmp_path):
    tiny_config.run.epochs = 6  # grafts settle within the run
    tiny_config.tamiyo.plateau_min_improvement = 10.0  # every epoch a plateau: graft at once
    tiny_config.tamiyo.min_training_epochs = 1
    tiny_config.kasmina.blend_epochs = 1
    trainer, buffer, emitted = recorded_run(tiny_config, tiny_data, tmp_path)

    [run] = buffer.runs()
    assert run["run_id"] == str((tmp_path / "run").resolve())
    assert run["task"] == "blobs/mlp[16,16]" and run["status"] == "completed"
    assert run["fingerprint"] == {"dataset": "blobs", "dataset_kwargs": {}, "host": "mlp",
                                  "host_kwargs": {"hidden": [16, 16]}, "input_shape": [12],
                                  "num_classes": 4, "params": trainer.params_initial}
    assert run["config"] == tiny_config.model_dump(mode="json")
    assert run["hardware"]["device_type"] == "cpu" and run["hardware"]["memory_gib"] >= 1
    assert run["metrics"]["status"] == "completed"

    points = buffer.points()
    assert [p["point_id"] for p in points] == [r.point_id for r in emitted] and points
    assert points[0]["observation"]["packet"]["current_epoch"] == emitted[0].epoch
    assert {p["chosen"] == 0 for p in points} == {True, False}  # waits and grafts alike
    for p in points:
        if p["chosen"] == 0:  # settled at once
            assert (p["outcome"]["result"], p["reward"]) == ("wait", 0.0)
        elif p["outcome"] is not None:
            assert p["reward"] == reward(p["outcome"], trainer.params_initial)
    assert any(p["outcome"] and p["outcome"]["result"] != "wait" for p in points)


def test_a_rollback_never_records_a_point_twice(tiny_config, tiny_data, tmp_path):
    # NaN logits in two consecutive epoch starts: the second rollback goes one epoch further
    # back, before points the controller had already emitted.
    tiny_config.model.host = "plugins_for_drills:poisoned_mlp"
    tiny_config.model.kwargs = {"poison": "nan", "start": 3, "stop": 5}
    tiny_config.run.epochs = 6
    tiny_config.tamiyo.plateau_min_improvement = 10.0
    tiny_config.tamiyo.max_germinations_per_epoch = 1
    trainer, buffer, emitted = recorded_run(tiny_config, tiny_data, tmp_path)

    assert trainer.rollbacks >= 2
    ids = [r.point_id for r in emitted]
    assert len(set(ids)) == len(ids)  # the ids survived the restores
    points = buffer.points()
    assert [p["point_id"] for p in points] == ids  # and none was replaced
    attempts_by_epoch = {}
    for p in points:
        attempts_by_epoch.setdefault(p["epoch"], set()).add(p["attempt"])
    assert any(len(a) > 1 for a in attempts_by_epoch.values())  # an undone epoch's points stay
    assert any(p["outcome"] and p["outcome"].get("incidents") for p in points)  # and judged


def test_a_write_that_fails_mid_run_is_one_warning_and_the_run_goes_on(
    tiny_config, tiny_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(replay, "BUSY_TIMEOUT_S", 0.05)
    tiny_config.tamiyo.plateau_min_improvement = 10.0
    holder = []

    class LockTheBuffer(Callback):  # another process stuck inside a write from epoch 2 on
        def on_epoch_start(self, trainer, record):
            if record.epoch == 2 and not holder:
                holder.append(sqlite3.connect(tiny_config.academy_dir() / REPLAY_FILE,
                                              isolation_level=None))
                holder[0].execute("BEGIN IMMEDIATE")

    trainer = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run",
                            callbacks=[LockTheBuffer()])
    summary = trainer.train()
    holder[0].execute("ROLLBACK")
    assert summary["status"] == "completed"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "database is locked" in warnings[0]
    assert "training goes on" in warnings[0]
    buffer = ReplayBuffer.in_academy(tiny_config.academy_dir())
    assert buffer.runs()[0]["status"] == "running"  # nothing after the failure was written
    assert {p["epoch"] for p in buffer.points()} <= {0, 1}


def test_a_buffer_that_cannot_be_opened_leaves_the_run_unrecorded(
    tiny_config, tiny_data, tmp_path, capsys
):
    tiny_config.run.epochs = 1
    (tmp_path / "academy").write_text("a file where the academy's folder should be\n")
    summary = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run").train()
    assert summary["status"] == "completed"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "not recorded in the replay buffer" in warnings[0]


def test_replay_off_writes_no_academy(tiny_config, tiny_data, tmp_path):
    tiny_config.run.epochs = 1
    tiny_config.academy.replay = False
    build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run").train()
    assert (tmp_path / "run" / "summary.json").exists()
    assert not tiny_config.academy_dir().exists()


def test_a_newer_schema_refuses_the_run_in_one_line_before_it_is_written(tmp_path):
    academy = tmp_path / "academy"
    ReplayBuffer.in_academy(academy).close()
    db = sqlite3.connect(academy / REPLAY_FILE)
    db.execute(f"PRAGMA user_version = {REPLAY_SCHEMA + 1}")
    db.close()
    result = run_cli(train_args(tmp_path / "run", tmp_path / "cache", [
        "data.dataset=plugins_for_data_tests:tiny_dataset", "run.device=cpu",
        "run.progress=false", "run.tensorboard=false", f"academy.dir={academy}"]))
    assert result.one_line_error and result.code == 2
    assert f"schema {REPLAY_SCHEMA + 1} is newer" in result.err
    assert not (tmp_path / "run").exists()


def test_the_task_key_names_dataset_host_and_its_resolved_arguments():
    config = TolariaConfig()
    data = SimpleNamespace(name="mnist1d", input_shape=(40,), num_classes=10)
    assert task_key(task_fingerprint(config, data, 2698)) == "mnist1d/mlp[32,32]"
    config.model.kwargs = {"hidden": [32, 32]}  # the default, said out loud: the same task
    assert task_key(task_fingerprint(config, data, 2698)) == "mnist1d/mlp[32,32]"
    config.model = ModelConfig(host="cnn2d", kwargs={"channels": [8, 16]})
    digits = SimpleNamespace(name="digits", input_shape=(1, 8, 8), num_classes=10)
    assert task_key(task_fingerprint(config, digits, 1)) == "digits/cnn2d[8,16](kernel_size=3)"
    # Two families of one generator on one host are two tasks.
    config = TolariaConfig()
    synthetic = SimpleNamespace(name="tolaria.academy.tasks:synthetic", input_shape=(8,),
                                num_classes=6)
    keys = set()
    for family in ("rings", "clusters"):
        config.data.kwargs = {"family": family, "size": 8}
        keys.add(task_key(task_fingerprint(config, synthetic, 100)))
    assert keys == {"synthetic(family=rings,size=8)/mlp[32,32]",
                    "synthetic(family=clusters,size=8)/mlp[32,32]"}


def test_the_academy_is_its_field_else_the_variable_else_beside_the_runs(monkeypatch):
    config = TolariaConfig()
    config.run.runs_root = "elsewhere/runs"
    monkeypatch.delenv(ACADEMY_VARIABLE)
    assert config.academy_dir() == Path("elsewhere/runs/academy")
    monkeypatch.setenv(ACADEMY_VARIABLE, "/srv/academy")
    assert config.academy_dir() == Path("/srv/academy")
    config.academy.dir = "mine"
    assert config.academy_dir() == Path("mine")


def test_tolaria_academy_looks_where_runs_record(monkeypatch, tmp_path):
    monkeypatch.setenv(ACADEMY_VARIABLE, str(tmp_path / "shared-academy"))
    result = run_cli(["academy", "status"])
    assert result.code == 0
    assert f"{tmp_path / 'shared-academy'}: no academy directory yet" in " ".join(
        (result.out + result.err).split())


def test_a_resume_may_not_move_the_academy():
    stored = TolariaConfig()
    with pytest.raises(ConfigError, match=r"--set academy\.dir: changing"):
        config_for_resume(stored, ["academy.dir=elsewhere"], "config.yaml",
                          checkpointed_epochs=1)


# -- processes: killed, resumed, two at once ------------------------------------------------

#: A digits run that decides at most epochs (waits and grafts on four hidden seeds) and
#: settles grafts epochs later; a durable checkpoint every 2 epochs.
GROWING = [*CLI_SETTINGS, "run.epochs=6", "kasmina.layers=[hidden.*]", "kasmina.chunks=2",
           "tamiyo.max_germinations_per_epoch=1", "tamiyo.blueprints=[residual_mlp,low_rank]"]


def growing_run(run_dir: Path, cache: Path, academy: Path) -> list[str]:
    return train_args(run_dir, cache, [*GROWING, f"academy.dir={academy}"])


def comparable(points: list[dict]) -> list[dict]:
    """What a run decided, less what differs between processes (run id, clock, memory)."""
    kept = []
    for p in points:
        p = {k: v for k, v in p.items() if k not in ("run_id", "time")}
        p["observation"] = {**p["observation"], "packet": {
            k: v for k, v in p["observation"]["packet"].items()
            if k not in ("timestamp", "hardware_context")}}
        kept.append(p)
    return kept


def committed_points(academy: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(academy / REPLAY_FILE, timeout=5)) as db:
            return db.execute("SELECT COUNT(*) FROM decision_points").fetchone()[0]
    except sqlite3.OperationalError:  # no file yet, or no schema in it yet
        return 0


def integrity(academy: Path) -> str:
    with contextlib.closing(sqlite3.connect(academy / REPLAY_FILE)) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


@pytest.fixture(scope="module")
def launcher() -> Launcher:
    return Launcher()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, launcher) -> tuple[Path, list[Path]]:
    """Two runs of ``GROWING`` started together on one academy, both uninterrupted."""
    root = tmp_path_factory.mktemp("two-runs")
    runs = [root / "a", root / "b"]
    processes = [launcher.start(growing_run(run, root / "cache", root / "academy"),
                                run.with_suffix(".log")) for run in runs]
    for process, run in zip(processes, runs, strict=True):
        process.join(timeout=300)
        assert process.exitcode == 0, run.with_suffix(".log").read_text()
    return root / "academy", runs


@pytest.mark.slow
def test_two_runs_writing_one_academy_at_once_keep_all_their_rows(two_runs):
    academy, runs = two_runs
    assert integrity(academy) == "ok"
    buffer = ReplayBuffer.in_academy(academy)
    rows = buffer.runs()
    assert sorted(r["run_id"] for r in rows) == sorted(str(r.resolve()) for r in runs)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert max(r["started"] for r in rows) < min(r["updated"] for r in rows)  # at once
    first, second = (comparable(buffer.points(run_id=r["run_id"])) for r in rows)
    assert first == second and len(first) >= 4  # the same job decides alike: nothing lost
    assert all(p["outcome"] is not None for p in first if p["chosen"] == 0)
    assert buffer.size_by_task() == {"digits/mlp[32,32]": 2 * len(first)}


@pytest.mark.slow
def test_a_killed_run_keeps_every_committed_row_and_its_resume_continues_the_same_row(
    two_runs, launcher, tmp_path
):
    reference_academy, reference_runs = two_runs
    reference_id = str(reference_runs[0].resolve())
    expected = comparable(ReplayBuffer.in_academy(reference_academy).points(run_id=reference_id))
    academy, run_dir = tmp_path / "academy", tmp_path / "run"
    victim = launcher.start(growing_run(run_dir, tmp_path / "cache", academy),
                            tmp_path / "victim.log")
    assert wait_until(lambda: committed_points(academy) >= 3, victim, timeout=120)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    assert victim.exitcode == -signal.SIGKILL, "the run ended before the kill"

    assert integrity(academy) == "ok"
    buffer = ReplayBuffer.in_academy(academy)
    killed = comparable(buffer.points())  # every committed row reads back
    assert [r["status"] for r in buffer.runs()] == ["running"]
    # What was committed is what the run decided, in order, with no hole ...
    assert [{**p, "outcome": None, "reward": None} for p in killed] \
        == [{**p, "outcome": None, "reward": None} for p in expected[:len(killed)]]
    assert all(p["outcome"] in (None, e["outcome"])
               for p, e in zip(killed, expected[:len(killed)], strict=True))
    assert all(p["outcome"] is not None for p in killed if p["chosen"] == 0)  # with its point
    # ... and every epoch whose metrics line was written has all its points: at most the
    # point in flight when the kill came is missing.
    last_logged = max((m["epoch"] for m in metrics(run_dir)), default=-1)
    assert len(killed) >= sum(p["epoch"] <= last_logged for p in expected)

    resumed = run_cli(["resume", str(run_dir)])
    assert resumed.code == 0, resumed.err
    [run] = buffer.runs()
    assert run["run_id"] == str(run_dir.resolve()) and run["status"] == "completed"
    assert comparable(buffer.points()) == expected  # no point twice, none missing
