"""The academy's monitor (design §7, ACADEMY.md §5): each metric against hand-computed values
from attempt rows written as the nightly contract defines them, each alert just past its
threshold and not at it, "no data" before any session, `academy status` (text and --json),
and the TensorBoard scalars read back."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from tolaria.academy.registry import PolicyRegistry
from tolaria.academy.replay import ReplayBuffer
from tolaria.cli import main
from tolaria.config import MonitorConfig
from tolaria.monitor.academy import TrainingMonitor, publish_to_tensorboard

#: The clock of these tests' rows (unix seconds); alerts are asked for as of it.
NOW = 1_800_000_000.0
CPU = {"device_type": "cpu", "device_name": "x86_64", "cpu_count": 2, "memory_gib": 7.8}
CUDA = {"device_type": "cuda", "device_name": "NVIDIA H100", "cpu_count": 16,
        "memory_gib": 128.0, "cuda_memory_gib": 80.0}
ARM = {"device_type": "cpu", "device_name": "aarch64", "cpu_count": 8, "memory_gib": 16.0}


def gates(history: float = 0.98, stability: float = 0.99, diversity: float = 0.6) -> dict:
    values = {"history_score": (history, 0.95), "hardware_stability": (stability, 0.97),
              "diversity_score": (diversity, 0.4)}
    return {name: {"value": value, "threshold": threshold, "passed": value > threshold}
            for name, (value, threshold) in values.items()}


def nightly(replay: ReplayBuffer, outcome: str, *, finished: float, version: str = "",
            **detail) -> None:
    """A nightly session's attempt row as the session writes it when it ends (contract)."""
    session = f"S{finished:.0f}"
    record = {"session": session, "gates": gates(), "failed_gate": None, "cause": None,
              "adapter_training_s": 40.0, "session_training_s": 90.0, "allotted_s": 600.0,
              "validation_divergence": 0.02, "profiles_seen": [CPU], "profiles_tested": [CPU]}
    replay.record_attempt(version=version, parent="v0", kind="nightly", outcome=outcome,
                          detail=record | detail, started=finished - 100, finished=finished)


@pytest.fixture
def academy(tmp_path):
    return tmp_path / "academy"


@pytest.fixture
def replay(academy):
    with ReplayBuffer.in_academy(academy) as buffer:
        yield buffer


# -- no data ------------------------------------------------------------------------------


def test_an_academy_that_does_not_exist_has_no_data_and_is_not_created(academy):
    monitor = TrainingMonitor(academy)
    assert monitor.track_metrics() == {
        "policy_success_rate": None, "validation_divergence": None, "adapter_training_s": None,
        "hardware_coverage": None, "resource_utilization": None,
    }
    rows = monitor.metrics_table()
    assert {row.state for row in rows} == {"no data"} and {row.shown for row in rows} == {"no data"}
    assert {row.window for row in rows} == {"no nightly session yet"}
    assert monitor.alerts(NOW) == [] and monitor.sessions() == []
    assert monitor.replay_by_task() == {}
    assert [(v.name, v.champion) for v in monitor.versions()] == [("v0", True)]  # built-in
    assert not academy.exists()


def test_attempts_of_other_kinds_are_no_nightly_session(academy, replay):
    PolicyRegistry(academy).register({"w": torch.zeros(2)}, {
        "parent": "v0", "trained_on": "by hand", "training_s": 1.0, "scorer": {}})
    PolicyRegistry(academy).promote("v1", reason="by hand")
    replay.record_attempt(version="", parent="v1", kind="nightly", outcome="nothing to learn",
                          detail={"session": "S1", "cause": "3 recent points"},
                          started=NOW - 5, finished=NOW)
    monitor = TrainingMonitor(academy)
    assert set(monitor.track_metrics().values()) == {None}
    assert {row.window for row in monitor.metrics_table()} == {"no nightly session yet"}
    assert monitor.alerts(NOW) == []
    assert [s.outcome for s in monitor.sessions()] == ["nothing to learn"]  # listed, not counted


# -- the metrics --------------------------------------------------------------------------


def test_success_rate_is_deploys_over_every_nightly_attempt(academy, replay):
    for index, outcome in enumerate(["deployed", "rejected", "deployed", "failed", "deployed"]):
        nightly(replay, outcome, finished=NOW - 1000 + index)
    replay.record_attempt(version="", parent="v0", kind="nightly", outcome="nothing to learn",
                          detail={}, started=NOW - 2, finished=NOW - 1)
    metrics = TrainingMonitor(academy).track_metrics()
    assert metrics["policy_success_rate"] == pytest.approx(3 / 5)
    row = TrainingMonitor(academy).metrics_table()[0]
    assert (row.name, row.label, row.shown, row.target, row.alert, row.window) == (
        "policy_success_rate", "Policy update success", "60%", "≥ 95%", "< 90%",
        "5 nightly attempts")
    assert row.state == "alert" and row.threshold == 0.9


def test_session_metrics_are_the_newest_session_that_measured_them(academy, replay):
    nightly(replay, "deployed", finished=NOW - 200, validation_divergence=0.03,
            adapter_training_s=50.0, session_training_s=120.0, allotted_s=600.0)
    nightly(replay, "rejected", finished=NOW - 100, validation_divergence=0.07,
            adapter_training_s=1500.0, session_training_s=1800.0, allotted_s=2400.0)
    # The newest crashed in training: it measured its time, but no divergence and no gates.
    nightly(replay, "failed", finished=NOW, cause="crashed (exit 1): MemoryError",
            validation_divergence=None, adapter_training_s=None, gates={},
            session_training_s=30.0, allotted_s=600.0, profiles_tested=[])
    monitor = TrainingMonitor(academy)
    metrics = monitor.track_metrics()
    assert metrics["policy_success_rate"] == pytest.approx(1 / 3)
    assert metrics["validation_divergence"] == pytest.approx(0.07)
    assert metrics["adapter_training_s"] == pytest.approx(1500.0)
    assert metrics["resource_utilization"] == pytest.approx(30.0 / 600.0)
    assert metrics["hardware_coverage"] == pytest.approx(1.0)  # the rejected session's
    rows = {row.name: row for row in monitor.metrics_table()}
    assert rows["validation_divergence"].window == f"session S{NOW - 100:.0f}"
    assert rows["resource_utilization"].window == f"session S{NOW:.0f}"
    assert rows["adapter_training_s"].shown == "25 min"
    assert rows["resource_utilization"].state == "ok" and rows["resource_utilization"].alert == "—"


def test_coverage_counts_seen_profiles_the_sandbox_tested(academy, replay):
    # CUDA was seen by day but cannot be mirrored here; ARM was tested but no run had it.
    nightly(replay, "rejected", finished=NOW, profiles_seen=[CPU, CUDA],
            profiles_tested=[CPU, ARM])
    monitor = TrainingMonitor(academy)
    assert monitor.track_metrics()["hardware_coverage"] == pytest.approx(1 / 2)
    (alert,) = [a for a in monitor.alerts(NOW) if a.metric == "hardware_coverage"]
    assert "not tested: cuda NVIDIA H100" in alert.message and "50%" in alert.message


def test_a_session_without_profiles_seen_measures_no_coverage(academy, replay):
    nightly(replay, "deployed", finished=NOW, profiles_seen=[], profiles_tested=[])
    assert TrainingMonitor(academy).track_metrics()["hardware_coverage"] is None
    row = TrainingMonitor(academy).metrics_table()[3]
    assert (row.state, row.window) == ("no data", "no session measured it")


# -- alerts -------------------------------------------------------------------------------

#: metric -> (session fields putting it exactly at its default threshold, the threshold field)
AT_THRESHOLD = {
    "validation_divergence": ({"validation_divergence": 0.1}, "validation_divergence_above"),
    "adapter_training_s": ({"adapter_training_s": 3600.0}, "adapter_training_s_above"),
    "hardware_coverage": ({"profiles_seen": [{"device_type": "cpu", "n": n} for n in range(20)],
                           "profiles_tested": [{"device_type": "cpu", "n": n}
                                               for n in range(19)]},
                          "hardware_coverage_below"),
}


@pytest.mark.parametrize("metric", sorted(AT_THRESHOLD))
def test_a_session_metric_alerts_just_past_its_threshold_and_not_at_it(academy, replay, metric):
    fields, threshold_field = AT_THRESHOLD[metric]
    nightly(replay, "deployed", finished=NOW, **fields)
    at = TrainingMonitor(academy)
    assert at.track_metrics()[metric] == getattr(MonitorConfig(), threshold_field)
    assert [a.metric for a in at.alerts(NOW)] == []
    assert {row.name: row.state for row in at.metrics_table()}[metric] == "ok"
    # A hair tighter threshold puts the same value just past it.
    nudge = -1e-9 if threshold_field.endswith("_above") else 1e-9
    past = TrainingMonitor(academy, MonitorConfig(
        **{threshold_field: getattr(MonitorConfig(), threshold_field) + nudge}))
    (alert,) = past.alerts(NOW)
    assert (alert.metric, alert.scope, alert.time) == (metric, "academy", NOW)
    assert alert.value == at.track_metrics()[metric]
    assert {row.name: row.state for row in past.metrics_table()}[metric] == "alert"


def test_success_rate_alerts_below_90_percent_not_at_it(academy, replay):
    for index in range(10):
        nightly(replay, "rejected" if index == 0 else "deployed", finished=NOW - 10 + index)
    assert TrainingMonitor(academy).track_metrics()["policy_success_rate"] == 0.9
    assert TrainingMonitor(academy).alerts(NOW) == []
    nightly(replay, "rejected", finished=NOW)  # 9 of 11
    (alert,) = TrainingMonitor(academy).alerts(NOW)
    assert (alert.metric, alert.threshold) == ("policy_success_rate", 0.9)
    assert alert.value == pytest.approx(9 / 11)
    expected = "Policy update success 81.8% (11 nightly attempts; 9 deployed) is below 90%"
    assert alert.message == expected


def test_a_failed_session_and_an_auto_revert_are_alerts_a_revert_by_hand_is_not(academy, replay):
    nightly(replay, "deployed", finished=NOW - 300, version="v1")
    nightly(replay, "failed", finished=NOW - 200, cause="timed out after 12 s")
    replay.record_attempt(version="v0", parent="v1", kind="revert", outcome="reverted",
                          detail={"reason": "auto-revert: run runs/a: rollback at epoch 3 "
                                  "implicated p7 (v1's graft of seed s on layer L)"},
                          started=NOW - 100, finished=NOW - 100)
    replay.record_attempt(version="v1", parent="v0", kind="promote", outcome="promoted",
                          detail={"reason": "by hand"}, started=NOW - 50, finished=NOW - 50)
    replay.record_attempt(version="v0", parent="v1", kind="revert", outcome="reverted",
                          detail={"reason": "reverted by hand"}, started=NOW, finished=NOW)
    alerts = [a for a in TrainingMonitor(academy).alerts(NOW) if a.metric != "policy_success_rate"]
    assert [(a.metric, a.time, a.value, a.threshold) for a in alerts] == [
        ("auto_revert", NOW - 100, 1.0, 0.0), ("nightly_failed", NOW - 200, 1.0, 0.0)]
    assert alerts[0].message.startswith("champion v1 reverted to v0: auto-revert: run runs/a")
    assert alerts[1].message == f"nightly session S{NOW - 200:.0f} failed: timed out after 12 s"


def test_events_are_alerts_for_event_alert_s_after_they_happened(academy, replay):
    nightly(replay, "failed", finished=NOW, cause="killed", validation_divergence=None)
    window = MonitorConfig().event_alert_s
    events = [a.metric for a in TrainingMonitor(academy).alerts(NOW + window)]
    assert "nightly_failed" in events
    later = [a.metric for a in TrainingMonitor(academy).alerts(NOW + window + 1)]
    assert "nightly_failed" not in later and "policy_success_rate" in later  # the rate stays


# -- what the dashboard lists -------------------------------------------------------------


def test_sessions_are_newest_first_with_gates_cause_and_steps(academy, replay):
    nightly(replay, "deployed", finished=NOW - 100, version="v1")
    failing = gates(diversity=0.2) | {"failed_gate": "diversity_score"}  # as on the card
    nightly(replay, "rejected", finished=NOW, version="v2", gates=failing,
            cause="diversity_score 0.2 <= 0.4")
    steps = [{"name": "snapshot", "started": "2026-01-01T02:00:00Z",
              "finished": "2026-01-01T02:00:05Z", "status": "ok", "detail": {"runs": 3}}]
    folder = academy / "nightly" / f"S{NOW:.0f}"
    folder.mkdir(parents=True)
    (folder / "session.json").write_text(json.dumps({"session": folder.name, "steps": steps}))
    monitor = TrainingMonitor(academy)
    newest, older = monitor.sessions()
    assert (newest.version, newest.parent, newest.outcome) == ("v2", "v0", "rejected")
    assert newest.failed_gate == "diversity_score" and "failed_gate" not in newest.gates
    assert newest.gates["diversity_score"] == {"value": 0.2, "threshold": 0.4, "passed": False}
    assert newest.cause == "diversity_score 0.2 <= 0.4" and newest.finished == NOW
    assert newest.steps == [{"name": "snapshot", "status": "ok",
                             "started": "2026-01-01T02:00:00Z",
                             "finished": "2026-01-01T02:00:05Z"}]
    assert older.outcome == "deployed" and older.steps == [] and older.failed_gate is None
    assert [s.version for s in monitor.sessions(limit=1)] == ["v2"]


def test_versions_mark_the_champion_and_replay_is_by_task(academy, replay):
    registry = PolicyRegistry(academy)
    for parent in ("v0", "v1"):
        registry.register({"w": torch.zeros(2)}, {
            "parent": parent, "trained_on": "replay", "training_s": 2.5, "scorer": {},
            "gates": gates() | {"failed_gate": None}})
    registry.promote("v1", reason="gates passed")
    (registry.directory / "v2" / "card.json").write_text("{")
    replay.begin_run("runs/a", task="digits/mlp[32]", fingerprint={}, config={}, hardware=CPU,
                     policy="learned", policy_version="v1")
    monitor = TrainingMonitor(academy)
    rows = {row.name: row for row in monitor.versions()}
    assert [name for name, row in rows.items() if row.champion] == ["v1"]
    assert rows["v1"].parent == "v0" and rows["v1"].training_s == 2.5
    assert rows["v1"].gates["history_score"]["passed"] is True
    assert "not JSON" in rows["v2"].problem and not rows["v2"].champion
    assert monitor.replay_by_task() == {"digits/mlp[32]": 0}


# -- academy status -----------------------------------------------------------------------


def status(academy, *extra: str) -> list[str]:
    return ["academy", "status", "--academy", str(academy), *extra]


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # a table cell's text stays on one line


def test_status_prints_the_metrics_table_and_the_alerts(academy, replay, capsys, wide):
    clock = time.time()
    for index, outcome in enumerate(["deployed", "deployed", "rejected", "deployed"]):
        nightly(replay, outcome, finished=clock - 100 + index, validation_divergence=0.15)
    nightly(replay, "failed", finished=clock, cause="exceeded its 0.5 GiB memory cap",
            validation_divergence=None)
    assert main(status(academy)) == 0
    out = capsys.readouterr().out
    assert "training monitor (design §7" in out and "no nightly session yet" not in out
    assert re.search(r"Policy update success\s+60%\s+≥ 95%\s+< 90%\s+alert\s+5 nightly", out)
    assert re.search(r"Validation divergence\s+0.15\s+≤ 0.05\s+> 0.1\s+alert\s+session S", out)
    assert re.search(r"Adapter training time\s+40 s\s+< 30 min\s+> 60 min\s+ok", out)
    assert re.search(r"Hardware coverage\s+100%\s+100%\s+< 95%\s+ok", out)
    assert re.search(r"Resource utilization\s+15%\s+—\s+—\s+ok", out)
    assert re.search(r"nightly_failed\s+1\s+0\s+nightly session S\d+ failed: exceeded its "
                     r"0.5 GiB memory cap", out)
    assert re.search(r"policy_success_rate\s+60%\s+90%\s+Policy update success", out)
    assert re.search(r"validation_divergence\s+0.15\s+0.1\s+Validation divergence", out)


def test_status_without_a_nightly_session_says_so(academy, capsys, wide):
    assert main(status(academy)) == 0
    out = capsys.readouterr().out
    assert "training monitor: no nightly session yet" in out and "no alerts" in out
    assert re.search(r"Policy update success\s+no data\s+≥ 95%\s+< 90%\s+no data", out)
    assert not academy.exists()


def test_status_json_is_one_object_for_scripts(academy, replay, capsys):
    nightly(replay, "deployed", finished=NOW - 10, version="v1")
    nightly(replay, "failed", finished=time.time(), cause="killed")
    assert main(status(academy, "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"metrics", "alerts", "sessions", "versions"}
    metrics = {row["name"]: row for row in report["metrics"]}
    assert metrics["policy_success_rate"]["value"] == 0.5
    assert metrics["policy_success_rate"]["state"] == "alert"
    assert {a["metric"] for a in report["alerts"]} == {"policy_success_rate", "nightly_failed"}
    assert [s["outcome"] for s in report["sessions"]] == ["failed", "deployed"]
    assert [v["name"] for v in report["versions"] if v["champion"]] == ["v0"]


def test_an_unreadable_replay_buffer_is_a_line_in_status_and_an_error_in_json(academy, capsys):
    academy.mkdir()
    (academy / "replay.sqlite").write_bytes(b"not a database at all" * 100)
    assert main(status(academy)) == 0
    out = capsys.readouterr().out
    assert re.search(r"training monitor: .*replay\.sqlite", out)
    assert main(status(academy, "--json")) != 0
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "replay.sqlite" in captured.err


# -- TensorBoard --------------------------------------------------------------------------


def test_publish_writes_the_metrics_as_scalars_and_the_alerts_as_text(academy, replay):
    from tensorboard.backend.event_processing import event_accumulator

    nightly(replay, "deployed", finished=NOW - 300, validation_divergence=0.04)
    nightly(replay, "failed", finished=NOW - 200, cause="timed out after 12 s",
            validation_divergence=None)
    nightly(replay, "failed", finished=NOW - 100, cause="killed", validation_divergence=None)
    log_dir = publish_to_tensorboard(academy, MonitorConfig(), now=NOW)
    assert log_dir == academy / "tensorboard"
    events = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
               for tag in events.Tags()["scalars"]}
    assert scalars["academy/policy_success_rate"] == [(3, pytest.approx(1 / 3))]
    assert scalars["academy/validation_divergence"] == [(3, pytest.approx(0.04))]
    assert scalars["academy/resource_utilization"] == [(3, pytest.approx(90 / 600))]
    assert set(scalars) == {f"academy/{name}" for name in (
        "policy_success_rate", "validation_divergence", "adapter_training_s",
        "hardware_coverage", "resource_utilization")}
    texts = {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tag)]
             for tag in events.Tags()["tensors"]}
    ((step, failed),) = texts["academy/alerts/nightly_failed/text_summary"]
    assert step == 3 and "failed: killed" in failed and "failed: timed out after 12 s" in failed
    ((_, rate),) = texts["academy/alerts/policy_success_rate/text_summary"]
    assert "is below 90%" in rate


def test_a_session_id_that_is_a_path_reads_nothing_outside_the_academy(academy, replay):
    outside = academy.parent / "elsewhere"
    outside.mkdir()
    (outside / "session.json").write_text(json.dumps({"steps": [{"name": "snapshot"}]}))
    nightly(replay, "deployed", finished=NOW, session="../../elsewhere")
    (only,) = TrainingMonitor(academy).sessions()
    assert only.session == "../../elsewhere" and only.steps == []
