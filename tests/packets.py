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


def observe_a_plateau(config, data):
    """A trainer one epoch in, whose Tamiyo observes a packet on which it would graft (every
    epoch is a plateau): ``(trainer, observation)``."""
    from tolaria.build import build_trainer  # builds a model: only the tests that need one

    config.tamiyo.plateau_patience = 1
    config.tamiyo.plateau_min_improvement = 10.0
    trainer = build_trainer(config, data=data)
    trainer.run_epoch(0)
    tamiyo = trainer.tamiyo
    tamiyo.on_epoch_boundary(1)
    observation = tamiyo.observe(
        make_packet(1, 1.0, 0.5, health_map=tamiyo.health_map, seed_states=tamiyo.seed_states)
    )
    return trainer, observation
