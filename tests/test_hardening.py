"""Issue 11's defects that live below the CLI: validation before the run directory exists,
resume fallback and fingerprint, divergence from the first epoch, the summary after a
repeated failure, leftovers, and a full disk outside checkpoint writes."""

from __future__ import annotations

import errno
import json

import pytest

import plugins_for_seams
from tolaria import rundir
from tolaria.checkpoint import CheckpointStore
from tolaria.checkpoint_io import read_checkpoint_dir, write_checkpoint_dir
from tolaria.cli import main

FAST = ["data.dataset=plugins_for_seams:shifting_blobs", "model.kwargs.hidden=[16]",
        "run.progress=false", "run.tensorboard=false", "run.epochs=4", "data.batch_size=32",
        "checkpoint.every_epochs=1", "tamiyo.blueprints=[residual_mlp]"]


def train(run_dir, *settings, capsys=None) -> tuple[int, str]:
    code = main(["train", "--run-dir", str(run_dir), *(f"--set={s}" for s in [*FAST, *settings])])
    err = capsys.readouterr().err if capsys else ""
    return code, " ".join(err.split())


@pytest.mark.parametrize("setting, message", [
    ("tamiyo.blueprints=[no_such_blueprint]", "unknown blueprint"),
    ("tamiyo.policy=oracle", "unknown policy"),
    ("optimizer.name=Adamm", "not a torch.optim optimizer"),
    ("scheduler.name=NoSuchLR", "scheduler"),
    ("scheduler.name=StepLR", "step_size"),
    ("optimizer.kwargs={momentum_typo: 0.9}", "momentum_typo"),
    ("run.device=cuda", "CUDA is not available"),
    ("tamiyo.blueprint_kwargs={residual_mlp: {hidden: -3}}", "tamiyo.blueprint_kwargs"),
    ("kasmina.chunks=1000", "kasmina.chunks=1000"),
    ("tamiyo.blueprints=[conv2d_residual]", "none fits any seed"),
])
def test_a_config_mistake_found_while_building_leaves_no_run_directory(
    tmp_path, capsys, setting, message
):
    code, err = train(tmp_path / "run", setting, capsys=capsys)
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_that_verifies_but_does_not_restore_is_passed_over(tmp_path, capsys):
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    assert train(reference)[0] == 0 and train(victim)[0] == 0
    (victim / "summary.json").unlink()  # as if killed after its last checkpoint
    newest = CheckpointStore(victim / "checkpoints", keep=2).checkpoints()[-1]
    tensors, state = read_checkpoint_dir(newest)
    state["components"]["optimizer"] = "hello"  # checksums are rewritten: only restore fails
    for file in newest.iterdir():
        file.unlink()
    newest.rmdir()
    write_checkpoint_dir(newest, tensors, state)
    capsys.readouterr()

    assert main(["resume", str(victim)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("skipping checkpoint") == 1 and "does not restore" in err
    metrics = [(victim / "metrics.jsonl").read_text(), (reference / "metrics.jsonl").read_text()]
    assert metrics[0] == metrics[1]  # the previous checkpoint, then the same epochs again


def test_resume_refuses_a_run_whose_data_or_optimizer_changed(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run)[0] == 0
    (run / "summary.json").unlink()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    plugins_for_seams.SHIFT["value"] = 0.5  # same shape, other content
    try:
        capsys.readouterr()
        assert main(["resume", str(run)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "data content" in err and "Traceback" not in err
    finally:
        plugins_for_seams.SHIFT["value"] = 0.0
    config = (run / "config.yaml").read_text().replace("lr: 0.02", "lr: 0.05")
    (run / "config.yaml").write_text(config)
    assert main(["resume", str(run)]) == 2
    assert "optimizer.lr (0.02 -> 0.05)" in " ".join(capsys.readouterr().err.split())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("setting", ["optimizer.lr=10", "optimizer.lr=10000"])
def test_divergence_from_the_first_epoch_stops_the_run_and_says_so(tmp_path, capsys, setting):
    code, err = train(tmp_path / "run", setting, "kasmina.layers=[]", "run.epochs=6",
                      capsys=capsys)
    assert code == 1 and "divergence at epoch 0" in err and "chance level" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["diverged"] is True
    assert summary["epochs"] == 0 and summary["rollbacks"] == 2


def test_after_a_repeated_failure_the_summary_describes_the_restored_model(tmp_path, capsys):
    code, err = train(tmp_path / "run", "model.host=plugins_for_seams:NanFrom",
                      "model.kwargs={epoch: 2}", "kasmina.layers=[body]", "run.epochs=5",
                      capsys=capsys)
    assert code == 1 and "nonfinite_loss at epoch 2" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["diverged"] is True
    assert summary["test_loss"] is not None and summary["test_accuracy"] > 0.5  # not NaN
    assert summary["final_val_accuracy"] > 0.5


def test_leftovers_of_an_interrupted_write_are_cleared_when_the_run_is_opened(tmp_path):
    run = tmp_path / "run"
    assert train(run)[0] == 0
    (run / "summary.json").unlink()
    leftovers = [run / "checkpoints" / ".tmp-ckpt-000009-epoch-9-123",
                 run / "checkpoints" / ".trash-ckpt-000001-epoch-1"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "state.json").write_text("{}")
    (run / ".status.json.tmp-123").write_text("{")
    assert main(["resume", str(run)]) == 0
    assert not any(p.exists() for p in [*leftovers, run / ".status.json.tmp-123"])


def test_a_full_disk_while_logging_is_one_line_and_keeps_what_was_written(
    tmp_path, capsys, monkeypatch
):
    real_open = open
    lines = {"n": 0}

    def filling_up(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            lines["n"] += 1
            if lines["n"] > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(rundir, "open", filling_up, raising=False)
    code, err = train(tmp_path / "run", capsys=capsys)
    assert code == 1 and "Traceback" not in err
    assert "metrics.jsonl (No space left on device)" in err
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((tmp_path / "run" / "events.jsonl").read_text().splitlines()[0])
