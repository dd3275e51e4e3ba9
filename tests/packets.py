"""The SystemStatePacket the Tamiyo tests feed the controller, built in one place."""

from __future__ import annotations

from tolaria.contracts import HardwareContext, SystemStatePacket

HW = HardwareContext("cpu", "cpu", 2, 0, 0, 0)


def make_packet(
    epoch: int, loss: float, acc: float, *, training_loss: float | None = None, **fields
) -> SystemStatePacket:
    """Validation loss/accuracy as given; training loss defaults to the validation loss."""
    return SystemStatePacket(
        current_epoch=epoch,
        global_step=epoch * 10,
        training_loss=loss if training_loss is None else training_loss,
        validation_loss=loss,
        validation_accuracy=acc,
        hardware_context=HW,
        **fields,
    )
