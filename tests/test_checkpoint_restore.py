"""Capture and restore of the whole live system: real seeds, optimizer manager and Tamiyo.

The scenario every test builds on: a small MLP with seeds in two layers; one seed is
FOSSILIZED and one TRAINING when the snapshot is taken.  Afterwards the TRAINING seed is
culled (its blueprint deleted) and another seed is grafted, and an injected NaN makes Tamiyo
demand a rollback.  Restoring must bring back the exact weights, optimizer state,
structure and RNG, so that training continues bit for bit as it did from the snapshot.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tolaria.checkpoint import (
    CheckpointStore,
    ModelState,
    RngState,
    capture_snapshot,
    restore_snapshot,
)
from tolaria.config import KasminaConfig, OptimizerConfig, SchedulerConfig, TamiyoConfig
from tolaria.contracts import HardwareContext, SeedState, SystemStatePacket
from tolaria.errors import CheckpointError, OptimizerManifestError
from tolaria.kasmina import export_structure, find_seeds, inject_seeds
from tolaria.optim import DynamicOptimizerManager
from tolaria.tamiyo import TamiyoController

KASMINA = KasminaConfig(layers=["0", "3"], chunks=2)
HARDWARE = HardwareContext(
    device_type="cpu", device_name="cpu", cpu_count=2, process_rss_bytes=0,
    system_memory_total_bytes=0, system_memory_available_bytes=0,
)


class System:
    """Model + seeds + optimizer manager + controller, wired as the trainer wires them."""

    def __init__(self, init_seed: int = 0, hidden: int = 16) -> None:
        torch.manual_seed(init_seed)
        self.model = nn.Sequential(
            nn.Linear(6, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, hidden),
            nn.ReLU(), nn.Linear(hidden, 3),
        )
        inject_seeds(self.model, KASMINA)
        self.model(torch.zeros(2, 6))  # the seeds learn their chunk shapes
        self.seeds = {seed.seed_id: seed for seed in find_seeds(self.model)}
        self.events: list[tuple] = []
        self.tamiyo = TamiyoController(
            TamiyoConfig(), KASMINA, num_classes=3, host_parameters=1000,
            event_sink=lambda *args, **fields: self.events.append((args, fields)),
        )
        for seed in self.seeds.values():
            self.tamiyo.register_seed(seed)
        self.manager = DynamicOptimizerManager(
            self.model,
            OptimizerConfig(name="Adam", lr=1e-2, seed_warmup_steps=5),
            SchedulerConfig(name="StepLR", kwargs={"step_size": 1, "gamma": 0.5}),
        )

    def graft(self, seed_id: str, to: SeedState, epoch: int) -> None:
        seed = self.seeds[seed_id]
        seed.germinate("residual_mlp", epoch=epoch, hidden=4)
        path = [SeedState.TRAINING, SeedState.BLENDING, SeedState.PROBATIONARY,
                SeedState.FOSSILIZED]
        for state in path[: path.index(to) + 1]:
            seed.transition(state, epoch=epoch, reason="test")
        self.manager.rebuild_optimizer()

    def train(self, steps: int) -> None:
        """A few optimizer steps on data drawn from the global RNG (so RNG state matters)."""
        self.model.train()
        optimizer = self.manager.get_optimizer()
        for _ in range(steps):
            x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
            loss = nn.functional.cross_entropy(self.model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self.manager.after_optimizer_step()
        self.manager.end_epoch(loss.item())

    @property
    def components(self) -> dict:
        return {"model": ModelState(self.model), "optimizer": self.manager,
                "tamiyo": self.tamiyo, "rng": RngState()}

    def capture(self, epoch: int, reuse=None):
        return capture_snapshot(
            self.components, epoch=epoch, global_step=7 * (epoch + 1), reuse=reuse
        )

    def restore(self, snapshot) -> None:
        restore_snapshot(snapshot, self.components)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.model.state_dict().items()}


def grown_system() -> System:
    """Epochs 0-1: one fossilized seed, one training seed, both with trained weights."""
    system = System()
    system.graft("0.1", SeedState.FOSSILIZED, epoch=0)
    system.train(3)
    system.graft("3.0", SeedState.TRAINING, epoch=1)
    system.train(3)
    return system


def diverge_after(system: System, epoch: int) -> None:
    """What happens after the snapshot: cull, graft elsewhere, train, then a NaN epoch."""
    system.seeds["3.0"].transition(SeedState.CULLED, epoch=epoch, reason="test cull")
    system.graft("3.1", SeedState.TRAINING, epoch=epoch)
    system.train(2)
    for training_loss in (0.7, math.nan):  # one ordinary epoch end, then the incident
        packet = SystemStatePacket(
            current_epoch=epoch, global_step=99, training_loss=training_loss,
            validation_loss=0.8, validation_accuracy=0.5, hardware_context=HARDWARE,
        )
        signal = system.tamiyo.step(packet)
    assert signal.emergency_rollback_required


def assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def optimizer_tensors(manager: DynamicOptimizerManager) -> dict[str, torch.Tensor]:
    state = manager.state_dict()["state"]
    return {f"{p}/{k}": v.clone() for p, s in state.items() for k, v in s.items()}


def test_rollback_restores_weights_optimizer_structure_and_continuation_bit_exactly():
    system = grown_system()
    snapshot = system.capture(epoch=1)
    captured_weights = system.weights()
    captured_optimizer = optimizer_tensors(system.manager)
    seed_objects = dict(system.seeds)
    weights = snapshot["model"]["weights"]
    assert any(name.startswith("3.kasmina.seeds.0.blueprint") for name in weights)

    system.train(3)  # the uninterrupted continuation is the reference
    reference = system.weights()
    assert_tensors_equal(weights, captured_weights)  # the snapshot is a private copy

    system.restore(snapshot)
    diverge_after(system, epoch=2)
    assert system.seeds["3.0"].blueprint is None and system.seeds["3.1"].blueprint is not None
    system.restore(snapshot)

    assert export_structure(system.model) == snapshot["model"]["structure"]
    assert system.seeds["3.0"].state is SeedState.TRAINING  # culled after: regrown
    assert system.seeds["3.1"].state is SeedState.DORMANT  # grafted after: gone
    assert system.seeds["3.1"].blueprint is None
    assert system.seeds["0.1"].state is SeedState.FOSSILIZED
    assert all(system.seeds[k] is seed for k, seed in seed_objects.items())  # same objects
    assert_tensors_equal(system.weights(), captured_weights)
    assert_tensors_equal(optimizer_tensors(system.manager), captured_optimizer)
    system.manager.check_manifest()
    tamiyo_state = system.tamiyo.save_state_dict()
    assert tamiyo_state["detector"]["recent_losses"] == []  # the epoch-2 loss is forgotten
    for key in ("best_validation_loss", "epochs_since_improvement"):  # the policy's memory
        assert tamiyo_state["policy"][key] == snapshot["tamiyo"]["policy"][key]
    assert tamiyo_state["detector"] == snapshot["tamiyo"]["detector"]
    assert system.tamiyo.incidents.counts == {"nonfinite_loss@2": 1}  # memory survives

    system.train(3)
    assert_tensors_equal(system.weights(), reference)


def test_same_snapshot_can_be_restored_again_after_more_training():
    system = grown_system()
    snapshot = system.capture(epoch=1)
    captured_optimizer = optimizer_tensors(system.manager)
    for _ in range(2):
        system.restore(snapshot)
        system.train(2)
    system.restore(snapshot)
    assert_tensors_equal(optimizer_tensors(system.manager), captured_optimizer)
    assert_tensors_equal(system.weights(), snapshot["model"]["weights"])


def test_resume_from_disk_into_a_fresh_process_state_continues_bit_exactly(tmp_path):
    system = grown_system()
    snapshot = system.capture(epoch=1)
    system.train(3)
    reference = system.weights()
    reference_lrs = [g["lr"] for g in system.manager.get_optimizer().param_groups]

    store = CheckpointStore(tmp_path, keep=2)
    store.save(snapshot)
    fresh = System(init_seed=123)  # different initial weights, no grown seeds
    torch.manual_seed(999)  # and a different RNG position
    fresh.restore(store.load_latest())
    assert export_structure(fresh.model) == snapshot["model"]["structure"]
    assert_tensors_equal(fresh.weights(), snapshot["model"]["weights"])
    fresh.train(3)
    assert_tensors_equal(fresh.weights(), reference)
    assert [g["lr"] for g in fresh.manager.get_optimizer().param_groups] == reference_lrs


def test_snapshot_of_another_host_is_refused_with_a_checkpoint_error():
    snapshot = grown_system().capture(epoch=1)
    other = System(hidden=24)
    with pytest.raises(CheckpointError):
        other.restore(snapshot)


def test_capture_refuses_an_optimizer_that_missed_a_graft():
    system = grown_system()
    system.seeds["3.1"].germinate("residual_mlp", epoch=2, hidden=4)  # no rebuild yet
    with pytest.raises(OptimizerManifestError, match=r"3\.kasmina\.seeds\.1\.blueprint"):
        system.capture(epoch=2)
    system.manager.rebuild_optimizer()
    snapshot = system.capture(epoch=2)
    system.train(1)
    system.restore(snapshot)
    assert_tensors_equal(system.weights(), snapshot["model"]["weights"])


def test_capture_into_a_recycled_snapshot_reuses_its_buffers_and_equals_a_fresh_capture():
    system = grown_system()
    old = system.capture(epoch=1)
    system.train(2)
    system.seeds["3.1"].germinate("residual_mlp", epoch=2, hidden=4)  # new tensors too
    system.manager.rebuild_optimizer()
    old_pointers = {name: t.data_ptr() for name, t in old["model"]["weights"].items()}
    fresh = system.capture(epoch=2)
    recycled = system.capture(epoch=2, reuse=old)
    assert_tensors_equal(recycled["model"]["weights"], fresh["model"]["weights"])
    assert_tensors_equal(optimizer_tensors_of(recycled), optimizer_tensors_of(fresh))
    assert recycled["model"]["structure"] == fresh["model"]["structure"]
    assert recycled["tamiyo"] == fresh["tamiyo"]
    weights = recycled["model"]["weights"]
    reused = [n for n in weights if weights[n].data_ptr() == old_pointers.get(n)]
    assert set(reused) == set(old["model"]["weights"])  # every surviving name kept its buffer
    assert any(".seeds.1.blueprint" in n for n in set(recycled["model"]["weights"]) - set(reused))
    system.train(1)
    system.restore(recycled)
    assert_tensors_equal(system.weights(), fresh["model"]["weights"])


def optimizer_tensors_of(snapshot) -> dict[str, torch.Tensor]:
    state = snapshot["optimizer"]["state"]
    return {f"{p}/{k}": v for p, s in state.items() for k, v in s.items()}
