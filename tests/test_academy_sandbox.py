"""TrainingSandbox: a job in a fresh process, mirrored, capped, timed, confined to scratch."""

from __future__ import annotations

import os
import time

import pytest

from tolaria.academy.confine import landlock_abi
from tolaria.academy.sandbox import TrainingSandbox
from tolaria.errors import SandboxError

PROFILE = {"device_type": "cpu", "device_name": "cpu", "cpu_count": 1, "memory_gib": 8}


def sandbox(tmp_path, profile=PROFILE, **options) -> TrainingSandbox:
    options.setdefault("memory_gib", 2.0)
    return TrainingSandbox(profile, scratch=tmp_path / "scratch", **options)


def test_a_job_answers_from_its_scratch_with_the_profile_mirrored(tmp_path):
    box = sandbox(tmp_path, {**PROFILE, "default_dtype": "float64"})
    answer = box.run("plugins_for_sandbox:echo", {"x": [1, 2]}, timeout_s=120)
    scratch = str((tmp_path / "scratch").resolve())
    assert answer["payload"] == {"x": [1, 2]}
    assert answer["cwd"] == scratch and answer["tmpdir"] == scratch
    assert answer["device"] == "cpu" and answer["threads"] == 1
    assert answer["dtype"] == "torch.float64"
    assert answer["sandbox"]["pid"] != os.getpid()
    assert answer["sandbox"]["unmirrorable"] is None


def test_a_cuda_profile_on_a_machine_without_cuda_is_reported_not_faked(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the profile is mirrorable here")
    answer = sandbox(tmp_path, {**PROFILE, "device_type": "cuda"}).run(
        "plugins_for_sandbox:echo", {}, timeout_s=120)
    assert answer["device"] == "cpu"
    assert answer["sandbox"]["profile_device_type"] == "cuda"
    assert answer["sandbox"]["unmirrorable"] == "no cuda device on this machine"


def test_what_the_job_prints_cannot_corrupt_its_answer(tmp_path):
    answer = sandbox(tmp_path).run("plugins_for_sandbox:chatty", {}, timeout_s=120)
    assert answer["said"] == "hello"


def test_a_job_past_its_budget_is_killed_and_named(tmp_path):
    started = time.monotonic()
    with pytest.raises(SandboxError, match=r"^plugins_for_sandbox:sleep timed out after 3 s$"):
        sandbox(tmp_path).run("plugins_for_sandbox:sleep", {}, timeout_s=3)
    assert time.monotonic() - started < 60
    pid = int((tmp_path / "scratch" / "stalled").read_text())
    with pytest.raises(ProcessLookupError):  # killed, not left running
        os.kill(pid, 0)


def test_a_job_past_its_memory_cap_fails_with_the_cap_named(tmp_path):
    with pytest.raises(SandboxError, match=r"exceeded its 1 GiB memory cap$"):
        sandbox(tmp_path, memory_gib=1.0).run("plugins_for_sandbox:allocate", {"gib": 2},
                                              timeout_s=120)


def test_a_crash_is_one_line_with_its_exit_code_and_last_words(tmp_path):
    with pytest.raises(SandboxError, match=r"crashed \(exit 1\): ValueError: the job broke"):
        sandbox(tmp_path).run("plugins_for_sandbox:crash", {}, timeout_s=120)
    with pytest.raises(SandboxError, match=r"crashed \(exit 3\): leaving without a word$"):
        sandbox(tmp_path).run("plugins_for_sandbox:hard_exit", {}, timeout_s=120)


def test_an_unimportable_job_is_a_crash_naming_it(tmp_path):
    with pytest.raises(SandboxError, match=r"ModuleNotFoundError: No module named 'no_such_mod"):
        sandbox(tmp_path).run("no_such_module:job", {}, timeout_s=120)


@pytest.mark.skipif(landlock_abi() < 1, reason="the kernel has no Landlock")
def test_writing_outside_scratch_is_impossible_where_the_kernel_confines(tmp_path):
    """Landlock refuses the write itself: the file is untouched, the job fails."""
    target = tmp_path / "academy" / "policies" / "CHAMPION"
    target.parent.mkdir(parents=True)
    target.write_text("v1\n")
    with pytest.raises(SandboxError, match=r"crashed \(exit 1\): PermissionError"):
        sandbox(tmp_path).run("plugins_for_sandbox:write_outside", {"target": str(target)},
                              timeout_s=120)
    assert target.read_text() == "v1\n"


def test_writing_outside_scratch_is_caught_where_the_kernel_cannot_confine(tmp_path):
    """Without Landlock the write happens, but the watched academy is compared before and
    after: the job fails, naming the file."""
    academy = tmp_path / "academy"
    target = academy / "policies" / "CHAMPION"
    target.parent.mkdir(parents=True)
    target.write_text("v1\n")
    box = TrainingSandbox(PROFILE, scratch=academy / "nightly" / "s" / "scratch",
                          memory_gib=2.0, watch=[academy], confine=False)
    with pytest.raises(SandboxError, match=rf"wrote outside its scratch: {target}"):
        box.run("plugins_for_sandbox:write_outside", {"target": str(target)}, timeout_s=120)
    # ... and what it writes in its own scratch, under the watched academy, is no change.
    answer = box.run("plugins_for_sandbox:echo", {}, timeout_s=120)
    assert answer["sandbox"]["confined"] is False
