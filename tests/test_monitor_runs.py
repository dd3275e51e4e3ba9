"""The incremental run-directory reader (tolaria.monitor.runs) over hand-written records."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from tolaria import records
from tolaria.config import MonitorConfig
from tolaria.monitor.runs import JsonlTail, RunIndex, RunView


def line(**fields) -> str:
    return records.encode({"schema": 1, "attempt": 1, **fields}) + "\n"


def epoch_line(epoch: int, *, attempt: int = 1, rollback: bool = False, acc: float = 0.5,
               params: int = 100, seeds=None) -> str:
    return line(event="epoch_end", epoch=epoch, attempt=attempt, rollback=rollback,
                val_accuracy=acc, val_loss=1.0 - acc, train_loss=1.0, lr=0.01, params=params,
                global_step=10 * (epoch + 1), adaptations=0, val_metrics={"accuracy": acc},
                seed_states=seeds or {"s0": "dormant"})


def write(path, text: str, mode: str = "a") -> None:
    with open(path, mode) as stream:
        stream.write(text)


def status(path, **fields) -> None:
    body = {"schema": 1, "phase": "training", "epoch": 0, "epochs": 4, "attempt": 1,
            "heartbeat": time.time(), "started": time.time(), "pid": os.getpid(),
            "host": socket.gethostname(), **fields}
    (path / "status.json").write_text(json.dumps(body))


def test_an_append_costs_only_its_own_bytes(tmp_path):
    file = tmp_path / "events.jsonl"
    write(file, "".join(line(event="checkpoint_saved", epoch=i, path=f"c{i}") for i in range(300)))
    tail = JsonlTail(file)
    _, first = tail.read()
    assert len(first) == 300 and tail.bytes_read == file.stat().st_size
    before = tail.bytes_read
    added = line(event="checkpoint_saved", epoch=300, path="c300")
    write(file, added)
    restarted, found = tail.read()
    assert not restarted and [r["epoch"] for r in found] == [300]
    # The new line, and the few bytes before the offset that prove the file was not rewritten.
    assert tail.bytes_read - before <= len(added) + 64 < file.stat().st_size / 100
    assert tail.read() == (False, [])


def test_a_half_written_last_line_waits_for_its_newline(tmp_path):
    file = tmp_path / "metrics.jsonl"
    whole = epoch_line(0)
    write(file, whole + whole[:20])
    tail = JsonlTail(file)
    assert [r["epoch"] for r in tail.read()[1]] == [0]
    assert tail.read()[1] == []
    write(file, whole[20:])
    assert [r["epoch"] for r in tail.read()[1]] == [0]


def test_a_truncated_replaced_or_rewritten_file_is_read_again(tmp_path):
    file = tmp_path / "metrics.jsonl"
    write(file, epoch_line(0) + epoch_line(1) + epoch_line(2))
    tail = JsonlTail(file)
    assert len(tail.read()[1]) == 3
    write(file, epoch_line(0), mode="w")  # truncated in place (a resume's rewind)
    restarted, found = tail.read()
    assert restarted and [r["epoch"] for r in found] == [0]
    replacement = tmp_path / "new.jsonl"
    write(replacement, epoch_line(0, acc=0.9) + epoch_line(1, acc=0.9))
    os.replace(replacement, file)  # a new inode
    restarted, found = tail.read()
    assert restarted and [r["val_accuracy"] for r in found] == [0.9, 0.9]
    # Rewritten in place to the same length with other content: the anchor bytes differ.
    write(file, epoch_line(0, acc=0.1) + epoch_line(1, acc=0.1), mode="r+")
    restarted, found = tail.read()
    assert restarted and [r["val_accuracy"] for r in found] == [0.1, 0.1]
    file.unlink()
    assert tail.read() == (True, [])


def test_the_latest_attempt_of_an_epoch_wins_and_undoes_its_decisions(tmp_path):
    write(tmp_path / "metrics.jsonl", epoch_line(0, acc=0.4)
          + epoch_line(1, acc=0.1, rollback=True))
    write(tmp_path / "events.jsonl",
          line(event="run_start", epoch=0, epochs=4, params=100, device="cpu", time=1.0)
          + line(event="decision", epoch=1, decision_id="d0", seed_id="s0", action="germinated",
                 blueprint="low_rank", reason="plateau", time=2.0)
          + line(event="incident", epoch=1, emergency="divergence", key="divergence@1",
                 reason="val loss 9", count=1, suspect_decisions=["d0"], forbidden=[], time=3.0)
          + line(event="rollback", epoch=1, restored_epoch=0, reason="divergence", time=3.1))
    view = RunView(tmp_path)
    view.poll()
    assert view.curves()["epoch"] == [0]  # attempt 1 of epoch 1 was undone; 2 is running
    assert view.decisions()[0]["undone"]
    write(tmp_path / "events.jsonl",
          line(event="decision", epoch=1, attempt=2, decision_id="d1", seed_id="s0",
               action="germinated", blueprint="residual_mlp", reason="plateau", time=4.0)
          + line(event="adaptation", epoch=1, attempt=2, seed_id="s0", from_state="dormant",
                 to_state="germinated", reason="plateau", blueprint="residual_mlp", time=4.0)
          + line(event="outcome", epoch=3, decision_id="d1", seed_id="s0", action="germinated",
                 blueprint="residual_mlp", epochs_later=2, delta_validation_accuracy=0.05,
                 delta_validation_loss=-0.1, param_cost=10, incident=None, time=5.0))
    write(tmp_path / "metrics.jsonl",
          epoch_line(1, attempt=2, acc=0.6, params=110, seeds={"s0": "training"})
          + epoch_line(2, acc=0.7, params=110, seeds={"s0": "training"})
          + epoch_line(3, acc=0.65, params=110, seeds={"s0": "fossilized"}))
    view.poll()
    curves = view.curves()
    assert curves["epoch"] == [0, 1, 2, 3]
    assert curves["val_accuracy"] == [0.4, 0.6, 0.7, 0.65]
    undone, kept = view.decisions()
    assert undone["undone"] and not kept["undone"]
    assert kept["outcome"]["delta_validation_accuracy"] == 0.05
    summary = view.summary()
    assert summary["epochs_done"] == 4 and summary["best_val_score"] == 0.7
    assert (summary["params_initial"], summary["params_final"]) == (100, 110)
    assert summary["seeds"] == {"fossilized": 1} and summary["rollbacks"] == 1
    assert view.seed_segments() == [{"seed": "s0", "segments": [
        {"state": "dormant", "start": 0, "end": 0, "blueprint": None},
        {"state": "training", "start": 1, "end": 2, "blueprint": "residual_mlp"},
        {"state": "fossilized", "start": 3, "end": 3, "blueprint": "residual_mlp"}]}]
    metrics = {a.metric for a in view.alerts()}
    assert metrics == {"rollbacks", "divergence"}
    assert not {a.metric for a in RunView(tmp_path, thresholds=MonitorConfig(
        rollbacks_above=1)).alerts()} & {"rollbacks"}


def test_a_live_status_is_running_stalled_or_interrupted(tmp_path):
    view = RunView(tmp_path, thresholds=MonitorConfig(heartbeat_stall_s=30))
    view.poll()
    assert view.state() == "new"
    status(tmp_path)
    first = view.poll()
    assert view.state() == "running" and first == 1
    assert view.poll() == first  # nothing changed: the same version
    status(tmp_path, heartbeat=time.time() - 100)
    view.poll()
    assert view.state() == "stalled"
    assert [a.metric for a in view.alerts()] == ["heartbeat_age_s"]
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    status(tmp_path, pid=int(gone.stdout))  # a writer killed before it wrote the end
    view.poll()
    assert view.state() == "interrupted"
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed"}))
    view.poll()
    assert view.state() == "completed" and view.alerts() == []


def test_the_index_lists_run_directories_only(tmp_path):
    for name in ("b-run", "a-run"):
        (tmp_path / name).mkdir()
    (tmp_path / "a-run" / "config.yaml").write_text("run: {epochs: 3}\n")
    status(tmp_path / "b-run")
    (tmp_path / "academy").mkdir()  # no run of its own
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "config.yaml").write_text("{}\n")
    (tmp_path / "linked").symlink_to(tmp_path / "a-run")
    index = RunIndex(tmp_path)
    assert index.run_ids() == ["a-run", "b-run"]
    assert index.view("a-run").summary()["epochs"] == 3
    assert index.view("a-run") is index.view("a-run")  # cached: offsets survive
    assert [v.run_id for v in index.views()] == ["b-run", "a-run"]  # started first: b


def test_a_record_of_a_newer_schema_is_one_line_not_a_crash(tmp_path):
    write(tmp_path / "events.jsonl", json.dumps({"schema": 99, "event": "run_start"}) + "\n")
    view = RunView(tmp_path, "future")
    version = view.poll()
    assert view.error.startswith("future: record schema 99 is newer")
    assert view.summary()["error"] == view.error
    assert view.poll() == version  # the same error is no news to a live page
