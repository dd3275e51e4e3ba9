"""Sandbox jobs for the tests: each does one thing a real job might (answer, talk, hang,
allocate, crash, write where it must not), plus stand-ins for the nightly session's train and
validate jobs with chosen gate values.  Test doubles for the failure paths only."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

#: A stalling job writes this in its scratch first, so a test knows when to kill.
STALLED = "stalled"


def echo(payload: dict, scratch: Path) -> dict:
    return {"payload": payload, "cwd": os.getcwd(), "tmpdir": os.environ.get("TMPDIR"),
            "device": os.environ.get("TOLARIA_SANDBOX_DEVICE"), "threads": _torch_threads(),
            "dtype": _default_dtype()}


def chatty(payload: dict, scratch: Path) -> dict:
    print("{not json at all", flush=True)
    print("noise on stderr", file=sys.stderr, flush=True)
    return {"said": "hello"}


def sleep(payload: dict, scratch: Path) -> dict:
    (scratch / STALLED).write_text(str(os.getpid()))
    time.sleep(payload.get("seconds", 3600))
    return {}


def allocate(payload: dict, scratch: Path) -> dict:
    block = bytearray(int(payload.get("gib", 2) * 2**30))
    return {"bytes": len(block)}


def crash(payload: dict, scratch: Path) -> dict:
    print("about to fail", file=sys.stderr, flush=True)
    raise ValueError("the job broke on purpose")


def hard_exit(payload: dict, scratch: Path) -> dict:
    print("leaving without a word", file=sys.stderr, flush=True)
    os._exit(3)


def write_outside(payload: dict, scratch: Path) -> dict:
    Path(payload["target"]).write_text("tampered\n")
    return {"wrote": payload["target"]}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _default_dtype() -> str:
    import torch

    return str(torch.get_default_dtype())


# -- stand-ins for the session's snapshot, train and validate jobs ------------------------


def snapshot(config: dict, *, run_id: str, task: str, hardware_env: dict) -> dict:
    return {"model": {}, "tamiyo": {}, "optimizer": {}, "hardware_env": hardware_env,
            "config": config, "task": task, "run_id": run_id}


def train(payload: dict, scratch: Path) -> dict:
    """The base's tensors nudged by a seeded amount, as a candidate with an adapter."""
    import torch
    from safetensors.torch import load_file, save_file

    base = load_file(Path(payload["base"]) / "policy.safetensors")
    generator = torch.Generator().manual_seed(payload["seed"])
    merged = {k: t + 0.01 * torch.randn(t.shape, generator=generator, dtype=t.dtype)
              for k, t in sorted(base.items())}
    candidate = scratch / "candidate"
    (candidate / "adapter").mkdir(parents=True, exist_ok=True)
    save_file(merged, candidate / "policy.safetensors")
    (candidate / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    save_file({"lora": torch.zeros(2)}, candidate / "adapter" / "adapter_model.safetensors")
    examples = len(json.loads(Path(payload["recent"]).read_text()))
    return {"candidate": str(candidate), "training_s": 0.01, "steps": 1, "loss_first": 1.0,
            "loss_last": 0.5, "ewc_penalty_last": 0.0, "examples": examples}


def train_then_stall(payload: dict, scratch: Path) -> dict:
    (scratch / STALLED).write_text(str(os.getpid()))
    time.sleep(3600)
    return train(payload, scratch)


def _validate(payload: dict, values: dict[str, float]) -> dict:
    thresholds = payload["settings"]["gates"]
    gates = {name: {"value": value, "threshold": thresholds[name],
                    "passed": value > thresholds[name]} for name, value in values.items()}
    failed = next((name for name, gate in gates.items() if not gate["passed"]), None)
    held_out = json.loads(Path(payload["held_out"]).read_text())
    return {"gates": gates, "failed_gate": failed, "validation_divergence": 0.02,
            "history": [], "profiles_tested": payload["profiles"], "profiles_unmirrorable": [],
            "held_out_seen": len(held_out)}


def validate_pass(payload: dict, scratch: Path) -> dict:
    assert Path(payload["candidate"], "policy.safetensors").is_file()
    return _validate(payload, {"history_score": 0.99, "hardware_stability": 1.0,
                               "diversity_score": 0.7})


def validate_fail_diversity(payload: dict, scratch: Path) -> dict:
    return _validate(payload, {"history_score": 0.99, "hardware_stability": 1.0,
                               "diversity_score": 0.1})


def validate_stall(payload: dict, scratch: Path) -> dict:
    (scratch / STALLED).write_text(str(os.getpid()))
    time.sleep(3600)
    return validate_pass(payload, scratch)


def snapshot_then_stall(config: dict, *, run_id: str, task: str, hardware_env: dict) -> dict:
    """Runs in the session's own process: its marker goes beside the academy."""
    Path(os.environ["TOLARIA_TEST_MARKER"]).write_text(str(os.getpid()))
    time.sleep(3600)
    return snapshot(config, run_id=run_id, task=task, hardware_env=hardware_env)
