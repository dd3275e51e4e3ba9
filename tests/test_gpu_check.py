"""``make gpu-check`` (scripts/gpu_check.py): it skips cleanly without CUDA, and its probes
see what the CUDA run will be judged on (exercised here on the CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scripts.gpu_check import grown_run

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_without_cuda_it_says_it_skipped_and_succeeds():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, even on a machine with one
    done = subprocess.run([sys.executable, "scripts/gpu_check.py"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout, done.stderr) == (0, "skipped: no CUDA\n", "")


def test_the_grown_run_trains_a_graft_and_its_probes_see_the_loop(tmp_path):
    # bf16 autocast runs on the CPU too: the same path as the GPU check's, but for the device.
    trainer, probe = grown_run("cpu", "run.precision=bf16", "data.kwargs.num_samples=500",
                               f"data.cache_dir={tmp_path}")
    batches = len(trainer.train_loader)
    assert probe.batches == [batches] * 3
    assert probe.grafts == {"flatten.0"}  # grafted at the first boundary, trained after it
    assert probe.off_device == set()
    assert probe.dtypes == {torch.bfloat16} and probe.weight_dtypes == {torch.float32}
    assert probe.syncs == [] and probe.allowed_syncs() == 3 * (batches // 32)
    assert trainer.train_loader.pin_memory is False  # a CPU run never pins
    assert trainer.last_record["train_loss"] > 0


def test_the_distributed_run_re_wraps_the_graft_in_ddp(tmp_path):
    # The NCCL check's path with gloo on the CPU: a group of one, DDP, a re-wrap after growth.
    from scripts.gpu_check import distributed_run

    trainer, probe, backend = distributed_run("cpu", "data.kwargs.num_samples=500",
                                              f"data.cache_dir={tmp_path}")
    assert backend == "gloo"
    assert probe.grafts == {"flatten.0"}
    assert trainer.group.replica.wraps >= 2  # the first wrap, and again after the graft
    assert "WORLD_SIZE" not in os.environ and not torch.distributed.is_initialized()
