"""Bad input is one line naming its cause, and loses nothing already written; a run stopped
early (Ctrl-C, a crash before its first checkpoint) can always be continued."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tolaria.build import build_trainer
from tolaria.checkpoint import CheckpointStore, checkpoint_epoch
from tolaria.cli import main
from tolaria.config import config_for_resume, load_config
from tolaria.errors import ConfigError
from tolaria.rundir import RunDirectory, RunLock

#: A small real run: digits trains an epoch in well under a second.
DIGITS = [
    "data.dataset=digits",
    "run.device=cpu",
    "run.progress=false",
    "run.tensorboard=false",
    "checkpoint.every_epochs=0",
]


def sets(*settings: str) -> list[str]:
    return [f"--set={s}" for s in settings]


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


# -- config files that do not read ---------------------------------------------------------


@pytest.mark.parametrize(("content", "message"), [
    (b"run:\n  epochs: 3\n  name: [a, b\n",
     "line 4, column 1: not valid YAML: expected ',' or ']', but got '<stream end>' "
     "(while parsing a flow sequence at line 3, column 9)"),
    (b"run: !!python/object/apply:os.system [echo hi]\n",
     "line 1, column 6: not valid YAML: could not determine a constructor for the tag "
     "'!!python/object/apply:os.system'"),
    (b"run:\n  name: caf\xe9\n", "line 2, column 12: not UTF-8 text (byte 0xe9)"),
])
def test_a_config_file_that_does_not_read_is_one_line_naming_file_and_position(
    tmp_path, capsys, content, message
):
    config = tmp_path / "c.yaml"
    config.write_bytes(content)
    assert main(["config", "--config", str(config)]) == 2
    assert one_line(capsys) == f"tolaria: error: {config}: {message}"


# -- user code that raises -----------------------------------------------------------------


@pytest.mark.parametrize(("setting", "message"), [
    ("data.dataset=plugins_for_cli_tests:raising_dataset",
     "data.dataset='plugins_for_cli_tests:raising_dataset': raising_dataset(...) raised "
     "ValueError('boom')"),
    ("model.host=plugins_for_cli_tests:raising_host",
     "model.host='plugins_for_cli_tests:raising_host': raising_host(...) raised "
     "RuntimeError('no such layer')"),
])
def test_user_code_that_raises_is_one_line_and_the_traceback_only_when_asked(
    tmp_path, capsys, monkeypatch, setting, message
):
    run = tmp_path / "run"
    command = ["train", "--run-dir", str(run), *sets(*DIGITS, setting)]
    assert main(command) == 2
    assert one_line(capsys) == f"tolaria: error: {message}"

    assert main(["--debug", *command]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "The above exception was the direct cause" in err
    assert err.strip().splitlines()[-1] == f"tolaria: error: {message}"

    monkeypatch.setenv("TOLARIA_DEBUG", "1")
    assert main(command) == 2
    assert "Traceback" in capsys.readouterr().err
    assert not run.exists()


def test_a_callback_that_raises_mid_run_is_one_line_and_the_run_ends_failed_with_its_epochs(
    tmp_path, capsys
):
    run = tmp_path / "run"
    callback = 'run.callbacks=["plugins_for_cli_tests:FailsAtEpoch"]'
    assert main(["train", "--run-dir", str(run), *sets(*DIGITS, "run.epochs=3", callback)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [  # the run had started: its directory, then the cause
        f"run directory: {run}",
        "tolaria: error: callback plugins_for_cli_tests:FailsAtEpoch.on_epoch_end raised "
        "ValueError at epoch_end of epoch 1: boom"]
    # What was written stays: both epochs' lines, and a status that says how the run ended.
    assert [line["epoch"] for line in metrics(run)] == [0, 1]
    assert json.loads((run / "status.json").read_text())["phase"] == "failed"

    assert main(["--debug", "train", "--run-dir", str(tmp_path / "again"),
                 *sets(*DIGITS, "run.epochs=3", callback)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: boom" in err


# -- a finished run to work on -------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A completed two-epoch run; tests work on copies of it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--run-dir", str(run), *sets(*DIGITS, "run.epochs=2")]) == 0
    return run


@pytest.fixture
def run_copy(finished, tmp_path, capsys) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    capsys.readouterr()
    return copy


# -- tolaria plot --------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "problem"), [
    ("missing/curves.png", "no folder {folder}"),
    ("curves.bmp", "cannot write .bmp (supported: .eps, "),
    ("curves", "cannot write a file without an extension (supported: .eps, "),
])
def test_plot_refuses_an_output_it_cannot_write_in_one_line(run_copy, capsys, name, problem):
    out = run_copy / name
    before = tree(run_copy)
    assert main(["plot", str(run_copy), "--out", str(out)]) == 2
    line = one_line(capsys)
    assert line.startswith(f"tolaria: error: --out {out}: {problem.format(folder=out.parent)}")
    assert tree(run_copy) == before
    assert not (run_copy / "missing").exists()  # no folder made on the quiet


# -- tolaria resume --set ------------------------------------------------------------------


def test_resume_with_more_epochs_extends_a_completed_run_exactly(run_copy, tmp_path, capsys):
    reference = tmp_path / "reference"
    assert main(["train", "--run-dir", str(reference), *sets(*DIGITS, "run.epochs=4")]) == 0
    capsys.readouterr()

    assert main(["resume", str(run_copy), "--set", "run.epochs=4"]) == 0
    err = capsys.readouterr().err
    assert f"{run_copy / 'config.yaml'}: changed run.epochs" in err
    assert f"resuming {run_copy} at epoch 2" in err
    assert load_config(run_copy / "config.yaml").run.epochs == 4
    assert metrics(run_copy) == metrics(reference)


@pytest.mark.parametrize(("setting", "message"), [
    ("optimizer.lr=0.1", "--set optimizer.lr: changing optimizer.lr would break exact resume; "
                         "start a new run (a resume may change checkpoint.every_epochs, "),
    ("run.epochs=1", "--set run.epochs=1: the newest checkpoint already holds 2 epochs"),
    ("run.epochz=3", "run.epochz: unknown key"),
])
def test_resume_refuses_a_change_that_breaks_exact_resume_and_writes_nothing(
    run_copy, capsys, setting, message
):
    (run_copy / "summary.json").unlink()  # a killed run: it would otherwise resume
    before = tree(run_copy)
    assert main(["resume", str(run_copy), "--set", setting]) == 2
    assert message in one_line(capsys)
    assert tree(run_copy) == before


def test_resume_config_allows_the_safe_fields_and_refuses_a_derived_schedule_length():
    stored = load_config(None, ["run.epochs=10"])
    safe = ["run.epochs=20", "run.progress=false", "run.tensorboard=false", "run.num_threads=2",
            "run.callbacks=[plugins_for_cli_tests:InterruptAt]", "checkpoint.every_epochs=1",
            "checkpoint.keep=5", "run.seed=0"]  # the seed as it was: no change
    config = config_for_resume(stored, safe, "c.yaml", checkpointed_epochs=10)
    assert config.run.epochs == 20 and config.checkpoint.keep == 5

    # A schedule whose length comes from run.epochs would be another schedule: refused,
    # unless its length is given.
    cosine = ["run.epochs=10", "scheduler.name=CosineAnnealingLR"]
    with pytest.raises(ConfigError, match=r"CosineAnnealingLR takes T_max from run\.epochs"):
        config_for_resume(load_config(None, cosine), ["run.epochs=20"], "c.yaml",
                          checkpointed_epochs=10)
    fixed = load_config(None, [*cosine, "scheduler.kwargs={T_max: 10}"])
    assert config_for_resume(fixed, ["run.epochs=20"], "c.yaml",
                             checkpointed_epochs=10).run.epochs == 20


# -- Ctrl-C --------------------------------------------------------------------------------


def test_ctrl_c_before_a_run_directory_exists_gives_no_resume_hint(tmp_path, capsys):
    run = tmp_path / "run"
    setting = "data.dataset=plugins_for_cli_tests:interrupted_dataset"
    assert main(["train", "--run-dir", str(run), *sets(*DIGITS, setting)]) == 130
    assert one_line(capsys) == "interrupted"
    assert not run.exists()


@pytest.mark.parametrize(("event", "epoch", "every", "kept"), [
    ("epoch_start", 3, 0, 2),  # mid-run: the last finished epoch is made durable
    # Between epoch 2's durable checkpoint and its epoch_end record: the checkpoint of the
    # last epoch whose records are all written supersedes it.
    ("checkpoint_saved", 2, 1, 1),
])
def test_ctrl_c_keeps_the_last_finished_epoch_and_resume_reproduces_the_run(
    tiny_config, tiny_data, tmp_path, event, epoch, every, kept
):
    from plugins_for_cli_tests import InterruptAt

    tiny_config.checkpoint.every_epochs = every
    build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "reference").train()
    run = tmp_path / "run"
    trainer = build_trainer(tiny_config, data=tiny_data, run_dir=run,
                            callbacks=[InterruptAt(event, epoch)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()

    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert json.loads((run / "status.json").read_text())["phase"] == "interrupted"
    newest = CheckpointStore(run / "checkpoints", keep=2).checkpoints()[-1]
    assert checkpoint_epoch(newest) == kept
    run_dir, _ = RunDirectory.open_existing(run)
    resumed = build_trainer(tiny_config, data=tiny_data, run_dir=run_dir)
    assert resumed.resume() == kept + 1
    resumed.train()
    assert metrics(run) == metrics(tmp_path / "reference")


@pytest.mark.slow
def test_sigint_mid_run_marks_it_interrupted_and_resume_reproduces_it(tmp_path):
    settings = sets(*DIGITS, "run.epochs=40")
    reference, run = tmp_path / "reference", tmp_path / "run"

    def tolaria(*args) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "tolaria.cli", *map(str, args)],
                                env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    uninterrupted = tolaria("train", "--run-dir", reference, *settings)
    victim = tolaria("train", "--run-dir", run, *settings)
    deadline = time.monotonic() + 120
    lines = run / "metrics.jsonl"  # counted, not parsed: the run may be writing the last one
    while not (lines.exists() and len(lines.read_text().splitlines()) >= 3):
        assert victim.poll() is None and time.monotonic() < deadline, victim.stderr.read()
        time.sleep(0.01)
    victim.send_signal(signal.SIGINT)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 130, err
    assert err.strip().splitlines()[-1] == f"interrupted; continue with `tolaria resume {run}`"
    assert "Traceback" not in err
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert json.loads((run / "status.json").read_text())["phase"] == "interrupted"
    (newest,) = CheckpointStore(run / "checkpoints", keep=2).checkpoints()
    # The last epoch recorded -- or the one before, had the signal come in the few bytecodes
    # between writing an epoch's record and the trainer counting it finished.
    assert metrics(run)[-1]["epoch"] - checkpoint_epoch(newest) in (0, 1)

    resumed = tolaria("resume", run)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"resuming {run} at epoch {checkpoint_epoch(newest) + 1}" in err
    assert uninterrupted.wait(timeout=120) == 0
    assert metrics(run) == metrics(reference)


# -- a run stopped before its first checkpoint; --overwrite --------------------------------


def test_resume_restarts_a_run_stopped_before_its_first_checkpoint(tmp_path, capsys):
    settings = [*DIGITS, "run.epochs=3"]
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    assert main(["train", "--run-dir", str(reference), *sets(*settings)]) == 0

    # Two epochs recorded, then the process died: no checkpoint, no summary.
    trainer = build_trainer(load_config(None, settings), run_dir=stopped)
    trainer.run_epoch(0)
    trainer.run_epoch(1)
    trainer.run_dir.close()
    # (Only the best checkpoint of epoch 0 or 1, which is no point to resume from.)
    assert len(metrics(stopped)) == 2
    assert not CheckpointStore(stopped / "checkpoints", keep=2).checkpoints()
    capsys.readouterr()

    assert main(["resume", str(stopped)]) == 0
    assert (f"no checkpoint in {stopped} yet: starting it over from epoch 0 (same config and "
            "seed, same run)") in capsys.readouterr().err
    assert metrics(stopped) == metrics(reference)


def test_overwrite_replaces_a_run_and_keeps_what_is_not_the_runs(run_copy, capsys):
    (run_copy / "notes.txt").write_text("mine")
    old_checkpoints = CheckpointStore(run_copy / "checkpoints", keep=2).checkpoints()

    assert main(["train", "--run-dir", str(run_copy), "--overwrite",
                 *sets(*DIGITS, "run.epochs=1")]) == 0
    assert load_config(run_copy / "config.yaml").run.epochs == 1
    assert len(metrics(run_copy)) == 1
    assert (run_copy / "notes.txt").read_text() == "mine"
    new_checkpoints = CheckpointStore(run_copy / "checkpoints", keep=2).checkpoints()
    assert [checkpoint_epoch(c) for c in new_checkpoints] == [0]
    assert not any(c.exists() for c in old_checkpoints if c not in new_checkpoints)


def test_overwrite_is_refused_while_another_process_holds_the_run(run_copy, capsys):
    before = tree(run_copy)
    holder = RunLock(run_copy)
    holder.acquire()  # its own open file: flock refuses the CLI's as it would another process
    try:
        assert main(["train", "--run-dir", str(run_copy), "--overwrite", *sets(*DIGITS)]) == 1
    finally:
        holder.release()
    assert f"{run_copy} is in use by pid {os.getpid()}" in one_line(capsys)
    assert tree(run_copy) == before


def test_overwrite_with_a_bad_config_leaves_the_old_run_as_it_was(run_copy, capsys):
    before = tree(run_copy)
    command = ["train", "--run-dir", str(run_copy), "--overwrite",
               *sets(*DIGITS, "model.kwargs={width: 3}")]
    assert main(command) == 2
    assert "model.kwargs: unknown argument(s) 'width'" in one_line(capsys)
    assert tree(run_copy) == before


def test_without_overwrite_a_run_directory_in_use_says_how_to_replace_it(run_copy, capsys):
    assert main(["train", "--run-dir", str(run_copy), *sets(*DIGITS)]) == 2
    assert one_line(capsys) == (
        f"tolaria: error: {run_copy} already holds a run; continue it with `tolaria resume "
        f"{run_copy}`, replace it with --overwrite or choose another --run-dir"
    )


# -- a summary that does not read ----------------------------------------------------------


@pytest.mark.parametrize(("garbage", "problem"), [
    (b'{"status": "compl', "not JSON (Unterminated string starting at: line 1 column 12 "
                          "(char 11))"),
    (b"\x80 torn", "not JSON ('utf-8' codec can't decode byte 0x80 in position 0: "
                   "invalid start byte)"),
    (b"[1, 2]", "not a JSON object"),
])
def test_an_unreadable_summary_means_the_run_did_not_complete_and_resume_goes_on(
    run_copy, capsys, garbage, problem
):
    (run_copy / "summary.json").write_bytes(garbage)
    assert main(["resume", str(run_copy)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[0] == (
        f"{run_copy / 'summary.json'}: {problem}; the run did not complete, so it is resumed"
    )
    assert f"resuming {run_copy} at epoch 2" in err
    assert json.loads((run_copy / "summary.json").read_text())["status"] == "completed"
