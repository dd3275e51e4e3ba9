"""End to end: `kill -9` then `tolaria resume`, and an injected NaN rolled back in a real run.

Both runs use an aggressive controller so the structure grows, blends, fossilizes and culls
within a few epochs: a restore that got structure, optimizer, scheduler, controller or RNG
wrong would show in the per-epoch metrics.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from drills import CLI_SETTINGS, GROWTH, metrics, tree_bytes
from tolaria import cli
from tolaria.build import build_trainer
from tolaria.checkpoint import CheckpointStore
from tolaria.contracts import SeedState
from tolaria.events import Callback
from tolaria.kasmina import export_structure


def _tolaria(*args: str | Path, cache: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "tolaria.cli", *map(str, args)]
    if args[0] == "train":
        command += [f"--set={s}" for s in [*CLI_SETTINGS, f"data.cache_dir={cache}"]]
    # One intra-op thread: identical arithmetic in every process, and no thread
    # oversubscription when the test runner shares the machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    cache = tmp_path / "cache"
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = _tolaria("train", "--run-dir", reference_dir, cache=cache)
    victim = _tolaria("train", "--run-dir", killed_dir, cache=cache)

    deadline = time.monotonic() + 120
    # Epochs 0-4 logged: the newest durable checkpoint is epoch 3, epoch 5 is under way.
    while len(metrics(killed_dir)) < 5:
        assert victim.poll() is None, victim.stdout.read()
        assert time.monotonic() < deadline, "the run never reached epoch 5"
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    logged = metrics(killed_dir)
    assert 5 <= len(logged) < 8
    assert not (killed_dir / "summary.json").exists()

    resumed = _tolaria("resume", killed_dir, cache=cache)
    resumed_output, _ = resumed.communicate(timeout=180)
    reference_output, _ = reference.communicate(timeout=180)
    assert reference.returncode == 0, reference_output
    assert resumed.returncode == 0, resumed_output
    assert "resuming" in resumed_output

    expected = metrics(reference_dir)
    assert len(expected) == 8
    assert metrics(killed_dir) == expected  # every epoch, bit for bit
    assert expected[-1]["params"] > expected[0]["params"]  # the run did grow
    summaries = [json.loads((d / "summary.json").read_text()) for d in (reference_dir, killed_dir)]
    for summary in summaries:
        summary.pop("wall_time_s")
    assert summaries[0] == summaries[1]
    events = [json.loads(line) for line in (killed_dir / "events.jsonl").read_text().splitlines()]
    resume_events = [e for e in events if e["event"] == "resume"]
    assert [e["checkpoint_epoch"] for e in resume_events] == [3]
    # The epochs run again after the resume are logged once: no decision twice.
    decisions = [e["decision_id"] for e in events if e["event"] == "decision"]
    assert decisions and len(decisions) == len(set(decisions))
    reference_events = (reference_dir / "events.jsonl").read_text().splitlines()
    reference_decisions = [json.loads(line) for line in reference_events]
    assert decisions == [e["decision_id"] for e in reference_decisions if e["event"] == "decision"]


def test_injected_nan_rolls_back_weights_and_grown_structure_bit_exactly(
    tiny_config, tiny_data, tmp_path
):
    tiny_config.run.epochs = 6
    tiny_config.checkpoint.every_epochs = 0
    for setting in GROWTH:
        key, value = setting.split("=")
        section, field = key.split(".")
        setattr(getattr(tiny_config, section), field, float(value) if "." in value else int(value))
    rollbacks = []

    class ObserveRollback(Callback):
        """What the system looks like right after the restore (and the controller's culls)."""

        def on_rollback(self, trainer, record):
            rollbacks.append({
                "snapshot": trainer.snapshots.newest_before(record.restored_epoch + 1),
                "weights": {k: v.clone() for k, v in trainer.model.state_dict().items()},
                "structure": export_structure(trainer.model),
                "global_step": trainer.global_step,
            })

    trainer = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run",
                            callbacks=[ObserveRollback()])

    poison_epoch = 4
    poisoned = []

    def poison(module, args):  # the first training batch of ``poison_epoch`` turns to NaN
        if module.training and trainer.current_epoch == poison_epoch and not poisoned:
            poisoned.append(trainer.global_step)
            return (args[0] * math.nan,)
        return None

    trainer.model.register_forward_pre_hook(poison)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess test: no oversubscription on 2 cores
    try:
        summary = trainer.train()
    finally:
        torch.set_num_threads(threads)

    assert len(poisoned) == 1 and len(rollbacks) == 1
    rollback = rollbacks[0]
    snapshot = rollback["snapshot"]
    assert snapshot.epoch == poison_epoch - 1
    assert rollback["global_step"] == snapshot.global_step
    structure, weights = snapshot["model"]["structure"], snapshot["model"]["weights"]
    grown = [s for s in structure["seeds"] if s["state"] != SeedState.DORMANT.value]
    assert grown, "the run should have grown before the incident"
    assert any(".blueprint." in name for name in weights)  # grafted weights restored

    # Restored bit-exactly -- except the seeds on trial at the incident, which the
    # controller culls before the epoch is replayed (each one logged as an adaptation).
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text()
              .splitlines()]
    amended = {e["seed_id"] for e in events
               if e["event"] == "adaptation" and "incident" in e["reason"]}
    on_trial = {s["seed_id"] for s in structure["seeds"]
                if s["state"] not in ("dormant", "culled", "fossilized")}
    assert amended == on_trial and amended, "some seed should be on trial at the incident"

    prefixes = tuple(
        "{}.kasmina.seeds.{}.".format(*sid.rsplit(".", 1)) for sid in amended
    )

    def owned_by_amended(name: str) -> bool:
        return bool(prefixes) and name.startswith(prefixes)

    kept = {name for name in weights if not owned_by_amended(name)}
    assert set(rollback["weights"]) == kept
    for name in kept:
        assert torch.equal(rollback["weights"][name], weights[name]), name
    for before, after in zip(structure["seeds"], rollback["structure"]["seeds"], strict=True):
        if before["seed_id"] in amended:
            assert after["state"] == "culled"
        else:
            assert after == before

    assert summary["status"] == "completed" and summary["rollbacks"] == 1
    assert summary["epochs"] == tiny_config.run.epochs
    assert math.isfinite(summary["final_val_loss"])
    assert [e["restored_epoch"] for e in events if e["event"] == "rollback"] == [poison_epoch - 1]


def test_resume_skips_a_corrupt_newest_checkpoint_and_refuses_when_none_is_valid(
    tmp_path, capsys
):
    run_dir = tmp_path / "run"
    settings = [*CLI_SETTINGS, f"data.cache_dir={tmp_path / 'cache'}", "run.epochs=4",
                "checkpoint.every_epochs=1", "data.batch_size=64"]
    assert cli.main(["train", "--run-dir", str(run_dir), *(f"--set={s}" for s in settings)]) == 0
    finished = metrics(run_dir)
    _, newest = CheckpointStore(run_dir / "checkpoints", keep=2).checkpoints()
    tensors = newest / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-1000])  # a torn write or a bad disk
    (run_dir / "summary.json").unlink()  # as if killed before the end: resumable
    capsys.readouterr()

    assert cli.main(["resume", str(run_dir)]) == 0
    output = " ".join(capsys.readouterr().err.split())  # undo the console's line wrapping
    assert output.count("skipping checkpoint") == 1
    assert f"{newest.name}/tensors.safetensors" in output.replace(" ", "")
    assert "truncated" in output
    assert metrics(run_dir) == finished  # epoch 3 ran again, identically

    for checkpoint in CheckpointStore(run_dir / "checkpoints", keep=2).checkpoints():
        (checkpoint / "manifest.json").write_text("{}")
    (run_dir / "summary.json").unlink()
    before = tree_bytes(run_dir)
    capsys.readouterr()
    assert cli.main(["resume", str(run_dir)]) == 1
    error = capsys.readouterr().err
    assert "none of the 2 checkpoints" in error
    assert tree_bytes(run_dir) == before  # nothing written, nothing overwritten
