"""TensorBoard scalars of every epoch, as a callback (``tensorboard --logdir runs/``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tolaria.events import Callback

#: epoch_end field -> TensorBoard tag.
SCALARS = {
    "train_loss": "train/loss",
    "val_loss": "val/loss",
    "val_accuracy": "val/accuracy",
    "lr": "lr",
    "params": "params",
    "adaptations": "adaptations",
}


class TensorBoardLogger(Callback):
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer = None
        self._purge_step: int | None = None

    def on_resume(self, trainer: Any, record: Any) -> None:
        # The resumed run writes its epochs again: drop what the killed run wrote after.
        self._purge_step = record.checkpoint_epoch + 1

    def on_epoch_end(self, trainer: Any, record: Any) -> None:
        writer = self._open()
        for field, tag in SCALARS.items():
            writer.add_scalar(tag, getattr(record, field), record.epoch)
        writer.flush()

    def on_run_end(self, trainer: Any, record: Any) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _open(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self._purge_step)
        return self._writer
