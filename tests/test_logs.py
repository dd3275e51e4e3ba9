"""Logs that read well anywhere: plain lines in a pipe, bars that fit a terminal, a summary of
plain values, and the CSV and MLflow loggers."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys

import pytest
from rich.cells import cell_len
from rich.console import Console

from plugins_for_cli_tests import InterruptAt
from tolaria import records
from tolaria.build import build_trainer
from tolaria.cli import main
from tolaria.errors import ConfigError
from tolaria.events import Callback
from tolaria.progress import RichProgress
from tolaria.rundir import RunDirectory
from tolaria.summary import plain_value

#: A small real run (digits trains an epoch in well under a second) that grows at once.
DIGITS = [
    "data.dataset=digits",
    "run.device=cpu",
    "run.tensorboard=false",
    "checkpoint.every_epochs=0",
    "tamiyo.plateau_patience=1",
    "tamiyo.plateau_min_improvement=10.0",  # every epoch is a plateau: seeds move from the start
]
#: Its loss goes NaN in the second epoch's first run: rolled back, run again as attempt 2.
POISONED = ["model.host=plugins_for_drills:poisoned_mlp", "model.kwargs={start: 2, stop: 3}"]
EPOCH_LINE = re.compile(
    r"epoch (\d+)/(\d+)( \(attempt (\d+)\))?  train (\S+)  val (\S+)  acc (\S+)  "
    r"params ([\d,]+)  seeds (.+)  \d+\.\ds  ETA \d+:\d\d:\d\d(  rolled back)?"
)


def train(tmp_path, capsys, *settings: str, options=()) -> tuple[int, str, str]:
    args = ["train", "--run-dir", str(tmp_path / "run"), *options]
    args += [f"--set={s}" for s in [*DIGITS, f"data.cache_dir={tmp_path / 'cache'}", *settings]]
    code = main(args)
    captured = capsys.readouterr()  # not a terminal: what a pipe or a CI log gets
    return code, captured.out, captured.err


def jsonl(path) -> list[dict]:
    return [records.decode(line) for line in path.read_text().splitlines()]


def expected_notes(run) -> list[str]:
    """The line each transition, rollback and failed graft in events.jsonl should print."""
    notes = []
    for e in jsonl(run / "events.jsonl"):
        when = f"epoch {e['epoch']}" + (f" (attempt {e['attempt']})" if e["attempt"] > 1 else "")
        if e["event"] == "adaptation":
            notes.append(f"{when}: {e['seed_id']} ({e['blueprint']}) "
                         f"{e['from_state']} -> {e['to_state']}: {e['reason']}")
        elif e["event"] == "rollback":
            notes.append(f"rollback at {when} to the end of epoch {e['restored_epoch']}: "
                         f"{e['reason']}")
        elif e["event"] == "germination_failed":
            notes.append(f"{when}: {e['seed_id']} could not graft {e['blueprint']}: {e['error']}")
    return notes


def test_a_piped_log_has_one_line_per_epoch_run_and_one_per_transition(tmp_path, capsys):
    code, out, err = train(tmp_path, capsys, "run.epochs=4", *POISONED)
    assert code == 0, err
    run = tmp_path / "run"
    lines = err.splitlines()
    assert lines[0] == f"run directory: {run}"
    epoch_lines = [line for line in lines[1:] if EPOCH_LINE.fullmatch(line)]
    notes = [line for line in lines[1:] if not EPOCH_LINE.fullmatch(line)]

    records = jsonl(run / "metrics.jsonl")
    assert len(epoch_lines) == len(records) == 5  # 4 epochs, one of them run twice
    for line, record in zip(epoch_lines, records, strict=True):
        (epoch, last, _, attempt, train_loss, val_loss, acc, params, seeds,
         rolled_back) = EPOCH_LINE.fullmatch(line).groups()
        assert (int(epoch), int(last), int(attempt or 1)) == (
            record["epoch"], 3, record["attempt"])
        assert train_loss == f"{record['train_loss']:.3f}"  # nan too: nothing is cut
        assert (val_loss, acc) == (f"{record['val_loss']:.3f}", f"{record['val_accuracy']:.3f}")
        assert params == f"{record['params']:,}"
        states = sorted(record["seed_states"].values())
        assert seeds == ", ".join(f"{s} {states.count(s)}" for s in sorted(set(states)))
        assert bool(rolled_back) == record["rollback"]
    assert [r["attempt"] for r in records if r["epoch"] == 1] == [1, 2]

    assert notes == expected_notes(run)
    assert any(n.startswith("rollback at epoch 1 to the end of epoch 0: ") for n in notes)
    assert any(" -> germinated: " in n for n in notes)
    # The summary on stdout: plain values only, never a Python repr.
    assert "seeds" in out and "{" not in out and "'" not in out and "None" not in out


def test_progress_off_still_prints_every_transition_and_no_epoch_line(tmp_path, capsys):
    code, _, err = train(tmp_path, capsys, "run.epochs=3", "run.progress=false")
    assert code == 0, err
    lines = err.splitlines()
    assert lines[0].startswith("run directory: ")
    assert lines[1:] == expected_notes(tmp_path / "run") and len(lines) > 2
    assert not any(EPOCH_LINE.fullmatch(line) for line in lines)


def test_quiet_prints_only_the_summary_path_for_train_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = train(tmp_path, capsys, "run.epochs=2", options=["--quiet"])
    assert (code, out, err) == (0, f"{run / 'summary.json'}\n", "")
    assert main(["resume", str(run), "--quiet", "--set", "run.epochs=3"]) == 0
    assert capsys.readouterr() == (f"{run / 'summary.json'}\n", "")
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3
    # Errors still speak.
    assert main(["resume", str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "not a run directory" in capsys.readouterr().err


VISIBLE = re.compile(r"\x1b\[[0-9;]*m")  # colours take no columns
CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n")  # cursor moves end what a line shows


@pytest.mark.parametrize("width", [60, 83])
def test_the_live_bars_fit_the_terminal_and_cut_no_number(tiny_config, tiny_data, width):
    tiny_config.tamiyo.plateau_patience = 1
    tiny_config.tamiyo.plateau_min_improvement = 10.0  # long transition lines, from epoch 0
    screen = io.StringIO()
    # soft_wrap as the CLI's console has it: lines are not wrapped unless the display does.
    console = Console(file=screen, width=width, force_terminal=True, color_system="standard",
                      soft_wrap=True)
    build_trainer(tiny_config, data=tiny_data, callbacks=[RichProgress(console)]).train()
    shown = [piece for piece in CONTROL.split(VISIBLE.sub("", screen.getvalue())) if piece]
    assert max(cell_len(piece) for piece in shown) <= width
    assert not any("…" in piece for piece in shown)  # rich's mark of a cut
    last = tiny_config.run.epochs
    assert any(re.match(rf"epochs +━+ {last}/{last} \d:\d\d:\d\d$", p) for p in shown)
    text = " ".join(shown)  # the last epoch's facts, each whole, under the bars
    assert re.search(r"train \d\.\d{3}  val \d\.\d{3}", text)
    assert re.search(r"acc \d\.\d{3}", text) and re.search(r"params [\d,]+", text)
    assert re.search(r"ETA \d:\d\d:\d\d", text) and " -> training: " in text


def test_summary_values_print_plain():
    assert plain_value({"dormant": 3, "fossilized": 1}) == "dormant 3, fossilized 1"
    assert plain_value(["flatten", "hidden.0"]) == "flatten, hidden.0"
    assert plain_value(3051) == "3,051" and plain_value(0.83712) == "0.8371"
    assert (plain_value(None), plain_value(True), plain_value({})) == ("-", "yes", "none")
    assert plain_value(float("nan")) == "nan"


# -- metrics.csv ---------------------------------------------------------------------------


def read_csv(run) -> tuple[list[str], list[dict]]:
    with open(run / "metrics.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    return list(rows[0]), rows


def test_metrics_csv_has_a_row_per_epoch_and_a_resume_keeps_its_header(
    tiny_config, tiny_data, tmp_path
):
    tiny_config.run.epochs = 6
    tiny_config.checkpoint.every_epochs = 0
    run = tmp_path / "run"
    stopped = build_trainer(tiny_config, data=tiny_data, run_dir=run,
                            callbacks=[InterruptAt("epoch_end", 3)])
    with pytest.raises(KeyboardInterrupt):
        stopped.train()  # Ctrl-C once epoch 3's row is written: it keeps epochs 0-2 only
    header, rows = read_csv(run)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    first_line = (run / "metrics.csv").read_text().splitlines()[0]

    run_dir, config = RunDirectory.open_existing(run)
    resumed = build_trainer(config, data=tiny_data, run_dir=run_dir)
    assert resumed.resume() == 3
    resumed.train()
    assert (run / "metrics.csv").read_text().splitlines()[0] == first_line
    _, rows = read_csv(run)
    records = jsonl(run / "metrics.jsonl")
    assert [(int(r["epoch"]), int(r["attempt"])) for r in rows] == [
        (r["epoch"], r["attempt"]) for r in records] == [(e, 1) for e in range(6)]
    for row, record in zip(rows, records, strict=True):
        assert float(row["val_loss"]) == record["val_loss"]  # every digit of the record
        seeds = sum(int(row[c]) for c in header if c.startswith("seeds_"))
        assert seeds == len(record["seed_states"])
    assert header[:3] == ["epoch", "attempt", "global_step"] and "seeds_fossilized" in header


# -- MLflow --------------------------------------------------------------------------------


@pytest.fixture
def store(monkeypatch, tmp_path):
    """A local MLflow file store.  The logger opts in to it (MLFLOW_ALLOW_FILE_STORE) by
    itself: unset here, and unset again after the test."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    return tmp_path / "mlruns"


def log_to(store, config):
    config.run.mlflow.enabled = True
    config.run.mlflow.tracking_uri = f"file:{store}"
    config.run.mlflow.experiment = "logs-test"


def client(store):
    from mlflow import MlflowClient

    return MlflowClient(store.as_uri())


def test_mlflow_gets_the_params_each_epochs_metrics_and_the_status(
    tiny_config, tiny_data, tmp_path, store
):
    log_to(store, tiny_config)
    tiny_config.run.epochs = 3
    summary = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run").train()
    run_id = json.loads((tmp_path / "run" / "mlflow.json").read_text())["run_id"]
    mlflow = client(store)
    logged = mlflow.get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.data.tags["status"] == "completed"
    assert logged.info.run_name == "run"
    params = logged.data.params
    assert params["optimizer.lr"] == "0.01" and params["run.epochs"] == "3"
    assert params["kasmina.layers"] == '["hidden.*"]'
    assert params["model.kwargs.hidden"] == "[16, 16]"
    history = mlflow.get_metric_history(run_id, "val_loss")
    records = jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], r["val_loss"]) for r in records]
    metrics = logged.data.metrics
    assert metrics["summary.test_accuracy"] == summary["test_accuracy"]
    assert logged.data.tags["summary.seeds"] == plain_value(summary["seeds"])


def test_a_resume_continues_the_same_mlflow_run(tiny_config, tiny_data, tmp_path, store):
    log_to(store, tiny_config)
    tiny_config.checkpoint.every_epochs = 1
    run = tmp_path / "run"
    stopped = build_trainer(tiny_config, data=tiny_data, run_dir=run,
                            callbacks=[InterruptAt("epoch_start", 2)])
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    run_id = json.loads((run / "mlflow.json").read_text())["run_id"]
    mlflow = client(store)
    assert mlflow.get_run(run_id).data.tags["status"] == "interrupted"
    assert mlflow.get_run(run_id).info.status == "KILLED"

    run_dir, config = RunDirectory.open_existing(run)
    config.run.epochs = 5  # a resume may ask for more: a param that changes is a tag
    resumed = build_trainer(config, data=tiny_data, run_dir=run_dir)
    resumed.resume()
    resumed.train()
    (only,) = mlflow.search_runs([mlflow.get_experiment_by_name("logs-test").experiment_id])
    assert only.info.run_id == run_id and only.info.status == "FINISHED"
    assert only.data.params["run.epochs"] == "4" and only.data.tags["resumed/run.epochs"] == "5"
    steps = [m.step for m in mlflow.get_metric_history(run_id, "val_accuracy")]
    assert steps == [0, 1, 2, 3, 4]


class RemoveStore(Callback):
    """The MLflow store vanishes after ``epoch`` (a server gone, a disk unmounted)."""

    def __init__(self, store, epoch: int) -> None:
        self.store, self.epoch = store, epoch

    def on_epoch_end(self, trainer, record) -> None:
        if record.epoch == self.epoch:
            shutil.rmtree(self.store)


def test_a_store_that_fails_mid_run_costs_one_warning_not_the_run(
    tiny_config, tiny_data, tmp_path, store, capsys
):
    log_to(store, tiny_config)
    trainer = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run",
                            callbacks=[RemoveStore(store, epoch=1)])
    assert trainer.train()["status"] == "completed"
    (warning,) = capsys.readouterr().err.splitlines()
    assert warning.startswith("tolaria: warning: MLflow logging stopped: ")
    assert warning.endswith("; the run goes on, and its run directory has every record")
    assert len(jsonl(tmp_path / "run" / "metrics.jsonl")) == tiny_config.run.epochs


def test_mlflow_missing_is_one_line_and_leaves_no_run_directory(
    tiny_config, tiny_data, tmp_path, monkeypatch
):
    tiny_config.run.mlflow.enabled = True
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(ConfigError, match=r"^run.mlflow.enabled: the MLflow client is not "
                                          r"installed \(pip install 'tolaria\[mlflow\]'\)$"):
        build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_run_without_mlflow_never_imports_it(tmp_path):
    code = (
        "import sys; from pathlib import Path; from tolaria.config import RunConfig; "
        "from tolaria.loggers import make_loggers; "
        f"make_loggers(RunConfig(), Path({str(tmp_path)!r})); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
