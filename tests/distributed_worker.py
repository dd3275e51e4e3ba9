"""One process of the multi-process tests: ``python distributed_worker.py CONFIG OUT`` trains
alone, ``torchrun ... distributed_worker.py CONFIG OUT`` as one rank of several.

Each rank writes ``OUT/rank<R>.pt``: after every epoch the digest of every parameter, the
parameters at the end, and after every training epoch whether DDP's buckets held every
trainable parameter (``tolaria.distributed.check_buckets`` raises if not).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from tolaria.build import build_trainer
from tolaria.config import load_config
from tolaria.events import Callback


class ParameterLog(Callback):
    def __init__(self) -> None:
        self.digests: list[str] = []
        self.wrapped: list[int] = []

    def on_train_end(self, trainer, record) -> None:
        if trainer.group is not None:
            from tolaria.distributed import check_buckets

            check_buckets(trainer.group.replica.module, trainer.model, trainer.group.rank)
            self.wrapped.append(trainer.group.replica.wraps)

    def on_epoch_end(self, trainer, record) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(trainer.model.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
        self.digests.append(digest.hexdigest())


def main(config_file: str, out: str) -> None:
    config = load_config(Path(config_file), [])
    log = ParameterLog()
    rank = int(os.environ.get("RANK", "0"))
    run_dir = Path(out) / "run"
    trainer = build_trainer(config, run_dir=run_dir, callbacks=[log])
    summary = trainer.train()
    torch.save({
        "digests": log.digests,
        "wrapped": log.wrapped,
        "parameters": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "seeds": summary["seeds"],
        "rollbacks": summary["rollbacks"],
        "val_loss": [trainer.last_record["val_loss"]],
    }, Path(out) / f"rank{rank}.pt")
    if trainer.group is not None:
        trainer.group.release(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
