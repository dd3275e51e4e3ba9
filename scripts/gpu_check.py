"""``make gpu-check``: Tolaria's CUDA paths, run for real where a GPU is present.

Without CUDA it prints ``skipped: no CUDA`` and exits 0.  With CUDA it trains the default
job for a few epochs on ``cuda`` under bf16 autocast (``run.precision=bf16``), with growth
forced at the first epoch boundary so that later epochs train a graft, and checks:

1. every parameter and buffer of the grown model (host and grafts) and every optimizer
   state tensor lives on the GPU (Adam's ``step`` counters stay on the CPU by design);
2. the training forward ran in bfloat16, while weights stayed float32;
3. the training loop does not wait for the GPU batch by batch: under
   ``torch.cuda.set_sync_debug_mode("warn")`` its batches may sync only for the NaN/inf
   check, once every ``NONFINITE_CHECK_INTERVAL`` batches.  "warn", not "error": that one
   sanctioned sync would raise; every other one is counted and its line printed;
4. the loaders pin memory for the CUDA run and not for a CPU run on the same machine;
5. ``run.precision=fp16`` trains the grown job with its gradient scaler: a float16
   forward, float32 weights, a finite loss (its scaler's inf check syncs once per
   optimizer step by design, so syncs are not counted there);
6. the multi-process path on NCCL with world size 1 (``tolaria.distributed``): the grown
   job as the one rank of a group, so every step goes through DDP on ``cuda:0`` and the
   graft is re-wrapped there, its parameters on the GPU and in DDP's buckets.

Each check prints one line, ``ok:`` or ``FAILED:``; the exit code is 1 if any failed.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import warnings

import torch

from tolaria.build import build_trainer
from tolaria.config import load_config
from tolaria.events import Callback
from tolaria.trainer import NONFINITE_CHECK_INTERVAL, TolariaTrainer

#: A plateau every epoch: Tamiyo grafts at the first boundary; two more epochs train it.
GROWN_JOB = ["run.epochs=3", "run.progress=false", "run.tensorboard=false",
             "tamiyo.plateau_min_improvement=10.0", "tamiyo.plateau_patience=1"]


class LoopProbe(Callback):
    """What each epoch's training loop ran on: its batches, the dtypes of the model's
    outputs, the seeds holding a graft, tensors off the run's device, and (on CUDA) the
    source lines of the host syncs between its batches."""

    def __init__(self) -> None:
        self.batches: list[int] = []  # per epoch
        self.dtypes: set[torch.dtype] = set()
        self.grafts: set[str] = set()
        self.off_device: set[str] = set()
        self.weight_dtypes: set[torch.dtype] = set()
        self.syncs: list[str] = []
        self._cuda = False
        self._caught: list[warnings.WarningMessage] = []
        self._caught_by_last_batch = 0

    def on_run_start(self, trainer, record) -> None:
        self._cuda = trainer.device.type == "cuda"
        trainer.model.register_forward_hook(self._record_dtype)

    def _record_dtype(self, module, inputs, output) -> None:
        if module.training:
            self.dtypes.add(output.dtype)

    def on_epoch_start(self, trainer, record) -> None:
        self.batches.append(0)
        if self._cuda:
            self._catching = warnings.catch_warnings(record=True)
            self._caught = self._catching.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_batch_end(self, trainer, record) -> None:
        self.batches[-1] += 1
        self._caught_by_last_batch = len(self._caught)

    def on_train_end(self, trainer, record) -> None:
        if self._cuda:
            torch.cuda.set_sync_debug_mode("default")
            self._catching.__exit__(None, None, None)
            # Up to the last batch's end: the epoch's one read of its loss comes after it.
            self.syncs += [f"{w.filename}:{w.lineno}"
                           for w in self._caught[: self._caught_by_last_batch]
                           if "synchroniz" in str(w.message)]
        # Before the epoch boundary's decisions: the structure this loop trained.
        self.grafts |= {seed_id for seed_id, state in trainer.tamiyo.seed_states.items()
                        if state.holds_blueprint}
        self.off_device |= set(off_device(trainer))
        self.weight_dtypes |= {p.dtype for p in trainer.model.parameters()}

    def allowed_syncs(self) -> int:
        return sum(batches // NONFINITE_CHECK_INTERVAL for batches in self.batches)


def grown_run(device: str, *overrides: str) -> tuple[TolariaTrainer, LoopProbe]:
    """The default job on ``device`` with a graft grown early, trained; and what it ran on."""
    probe = LoopProbe()
    config = load_config(None, [*GROWN_JOB, f"run.device={device}", *overrides])
    trainer = build_trainer(config, callbacks=[probe])
    trainer.train()
    return trainer, probe


def distributed_run(device: str, *overrides: str) -> tuple[TolariaTrainer, LoopProbe, str]:
    """The grown job as rank 0 of a group of 1 -- NCCL on CUDA, gloo on the CPU -- so its
    steps go through DDP and the graft is re-wrapped; the trainer, its probe, the backend."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {name: os.environ.get(name) for name in launch}
    os.environ.update(launch)  # what torchrun would set: build_trainer joins the group
    try:
        trainer, probe = grown_run(device, *overrides)
        backend = torch.distributed.get_backend()
        torch.distributed.destroy_process_group()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
    return trainer, probe, backend


def off_device(trainer: TolariaTrainer) -> list[str]:
    """Names of the model's and the optimizer's tensors that are not on the run's device."""
    device = trainer.device.type
    names = [f"parameter {n}" for n, p in trainer.model.named_parameters()
             if p.device.type != device]
    names += [f"buffer {n}" for n, b in trainer.model.named_buffers() if b.device.type != device]
    for index, state in enumerate(trainer.optimizer.state.values()):
        names += [f"optimizer state {index}.{key}" for key, value in state.items()
                  if torch.is_tensor(value) and key != "step" and value.device.type != device]
    return names


def check(ok: bool, what: str, failure: str) -> bool:
    print(f"ok: {what}" if ok else f"FAILED: {what}: {failure}", flush=True)
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    trainer, probe = grown_run("cuda", "run.precision=bf16")
    cpu_trainer = build_trainer(load_config(None, [*GROWN_JOB, "run.device=cpu"]))
    results = [
        check(bool(probe.grafts), f"a graft trained on the GPU ({', '.join(sorted(probe.grafts))})",
              "no seed held a blueprint while training: growth was not forced"),
        check(not probe.off_device,
              "host and grafts, parameters, buffers and optimizer state on cuda",
              ", ".join(sorted(probe.off_device)[:5])),
        check(probe.dtypes == {torch.bfloat16} and probe.weight_dtypes == {torch.float32},
              "bf16: the training forward ran in bfloat16, the weights stayed float32",
              f"outputs {sorted(map(str, probe.dtypes))}, "
              f"weights {sorted(map(str, probe.weight_dtypes))}"),
        check(len(probe.syncs) <= probe.allowed_syncs(),
              f"{len(probe.syncs)} host syncs in {sum(probe.batches)} training batches (at "
              f"most {probe.allowed_syncs()}: the NaN/inf check every "
              f"{NONFINITE_CHECK_INTERVAL})",
              f"synced at {', '.join(sorted(set(probe.syncs)))}"),
        check(trainer.train_loader.pin_memory and not cpu_trainer.train_loader.pin_memory,
              "pinned loader memory for the CUDA run only",
              f"pin_memory cuda={trainer.train_loader.pin_memory}, "
              f"cpu={cpu_trainer.train_loader.pin_memory}"),
    ]
    fp16, fp16_probe = grown_run("cuda", "run.precision=fp16")
    loss = fp16.last_record["train_loss"]
    results.append(check(
        fp16_probe.dtypes == {torch.float16} and fp16_probe.weight_dtypes == {torch.float32}
        and fp16.stepper.grad_scaler is not None and math.isfinite(loss),
        f"fp16 with a gradient scaler: float16 forward, float32 weights, loss {loss:.3f}",
        f"outputs {sorted(map(str, fp16_probe.dtypes))}, weights "
        f"{sorted(map(str, fp16_probe.weight_dtypes))}, scaler {fp16.stepper.grad_scaler}"))
    ranked, ranked_probe, backend = distributed_run("cuda")
    ddp = ranked.group.replica.module
    results.append(check(
        backend == "nccl" and ddp.device_ids == [0] and ranked.group.replica.wraps >= 2
        and bool(ranked_probe.grafts) and not ranked_probe.off_device
        and math.isfinite(ranked.last_record["train_loss"]),
        f"NCCL, world size 1: DDP on cuda:0, re-wrapped {ranked.group.replica.wraps - 1} "
        f"time(s) after growth ({', '.join(sorted(ranked_probe.grafts))} trained), every "
        "trainable parameter in its buckets",
        f"backend {backend}, device_ids {ddp.device_ids}, wraps {ranked.group.replica.wraps}, "
        f"grafts {sorted(ranked_probe.grafts)}, off device {sorted(ranked_probe.off_device)[:5]}"))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
