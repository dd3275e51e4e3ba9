"""The epoch lifecycle of design §2, proven with a scripted controller."""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from tolaria.build import build_trainer
from tolaria.contracts import AdaptationSignal
from tolaria.trainer import TolariaTrainer


class ScriptedController:
    """Speaks the Tamiyo interface; returns pre-written signals and records every call."""

    def __init__(self, calls: list, signals: dict[int, AdaptationSignal] | None = None):
        self.calls = calls
        self.signals = signals or {}
        self.health_map: dict = {}
        self.seed_states: dict = {}
        self.steps = 0

    def on_epoch_boundary(self, epoch):
        self.calls.append(("boundary", epoch))

    def seeds_to_evaluate(self):
        return []

    def step(self, packet):
        self.calls.append(("step", packet.current_epoch))
        self.steps += 1
        return self.signals.get(packet.current_epoch, AdaptationSignal())

    def on_rollback(self, restored_epoch):
        self.calls.append(("on_rollback", restored_epoch))
        return AdaptationSignal()

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


class RecordingHost(nn.Module):
    """A small MLP that logs whether each forward ran in training or evaluation mode."""

    def __init__(self, calls: list, nan_at_call: int | None = None):
        super().__init__()
        self.calls = calls
        self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
        self.nan_at_call = nan_at_call
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        self.calls.append(("forward", "train" if self.training else "eval"))
        out = self.net(x)
        if self.nan_at_call is not None and self.forwards >= self.nan_at_call and self.training:
            out = out * math.nan
        return out


def make_trainer(tiny_config, tiny_data, signals=None, nan_at_call=None, run_dir=None):
    calls: list = []
    model = RecordingHost(calls, nan_at_call)
    tamiyo = ScriptedController(calls, signals)
    trainer = TolariaTrainer(model, tamiyo, tiny_config, data=tiny_data, run_dir=run_dir)
    return trainer, calls


def test_boundary_comes_before_validation_and_step_after(tiny_config, tiny_data):
    trainer, calls = make_trainer(tiny_config, tiny_data)
    trainer.run_epoch(0)
    kinds = [c if c[0] != "forward" else c[1] for c in calls]
    boundary = kinds.index(("boundary", 0))
    assert "train" in kinds[:boundary] and "eval" not in kinds[:boundary]
    first_eval = kinds.index("eval")
    assert boundary < first_eval
    assert kinds.index(("step", 0)) > max(i for i, k in enumerate(kinds) if k == "eval")
    assert trainer.current_epoch == 1


def test_rollback_restores_weights_and_skips_checkpoint(tiny_config, tiny_data):
    signals = {2: AdaptationSignal(emergency_rollback_required=True, reason="scripted")}
    trainer, _ = make_trainer(tiny_config, tiny_data, signals)
    trainer.run_epoch(0)
    trainer.run_epoch(1)
    after_epoch_1 = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    snapshots_before = len(trainer.snapshots)
    step_before = trainer.global_step

    trainer.run_epoch(2)

    assert len(trainer.snapshots) == snapshots_before  # no checkpoint of the bad epoch
    assert trainer.rollbacks == 1
    assert trainer.current_epoch == 2  # the epoch is run again
    assert trainer.global_step == step_before
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, after_epoch_1[name]), name


def test_optimizer_rebuilt_only_when_flagged(tiny_config, tiny_data):
    signals = {1: AdaptationSignal(optimizer_rebuild_required=True, reason="scripted")}
    trainer, _ = make_trainer(tiny_config, tiny_data, signals)
    rebuilt_at = []
    original = trainer.optimizer_manager.rebuild_optimizer

    def spy():
        rebuilt_at.append(trainer.current_epoch)
        return original()

    trainer.optimizer_manager.rebuild_optimizer = spy
    trainer.train()
    assert rebuilt_at == [2]  # after epoch 1 finished (current_epoch already advanced)


def test_nonfinite_loss_ends_epoch_early_and_rolls_back(tiny_config, tiny_data, monkeypatch):
    monkeypatch.setattr("tolaria.trainer.NONFINITE_CHECK_INTERVAL", 2)
    # 256 samples / 32 = 8 training batches an epoch; the host turns NaN in epoch 1.
    trainer, calls = make_trainer(tiny_config, tiny_data, nan_at_call=13)
    trainer.run_epoch(0)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    start = len(calls)
    signal = trainer.run_epoch(1)
    epoch_1_train = [c for c in calls[start:] if c == ("forward", "train")]
    assert len(epoch_1_train) == 2  # stopped at the first check, not after 8 batches
    assert not signal.emergency_rollback_required  # the trainer acted on its own guard
    assert trainer.rollbacks == 1
    assert trainer.current_epoch == 1
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


def test_run_directory_has_everything_a_researcher_reads(tiny_config, tiny_data, tmp_path):
    tiny_config.run.tensorboard = True
    trainer = build_trainer(tiny_config, run_dir=tmp_path / "run", data=tiny_data)
    summary = trainer.train()
    run = tmp_path / "run"
    for key in (
        "best_val_accuracy",
        "final_val_accuracy",
        "final_val_loss",
        "epochs",
        "params_initial",
        "params_final",
        "seeds",
        "rollbacks",
        "wall_time_s",
    ):
        assert key in summary, key
    assert summary["epochs"] == 4
    assert summary["status"] == "completed"
    assert summary["best_val_accuracy"] > 0.5  # blobs are easy: the loop really trains
    assert json.loads((run / "summary.json").read_text()) == json.loads(
        json.dumps(summary)
    )
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2, 3]
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "run_start"
    assert (run / "config.yaml").exists()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "checkpoints").iterdir())


class UserModel(nn.Module):
    """A researcher's own model with its own module names."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(12, 24), nn.ReLU())
        self.classifier = nn.Linear(24, 4)

    def forward(self, x):
        return self.classifier(self.encoder(x))


def test_users_own_model_gets_seeds_and_trains(tiny_config, tiny_data):
    import tolaria

    tiny_config.kasmina.layers = ["encoder"]
    tiny_config.kasmina.chunks = 3
    trainer = tolaria.build_trainer(tiny_config, model=UserModel(), data=tiny_data)
    assert sorted(trainer.tamiyo.seed_states) == ["encoder.0", "encoder.1", "encoder.2"]
    summary = trainer.train()
    assert summary["status"] == "completed"
    assert summary["best_val_accuracy"] > 0.5
    # The host's own parameter names are untouched by injection.
    assert {"encoder.0.weight", "classifier.weight"} <= set(dict(trainer.model.named_parameters()))


def test_a_torn_last_record_is_ignored_and_rewind_drops_later_epochs(tmp_path, tiny_config):
    from tolaria.rundir import RunDirectory

    run = RunDirectory.create(tmp_path / "run", tiny_config)
    for epoch in range(4):
        run.log_metrics({"epoch": epoch, "val_accuracy": 0.5})
        run.log_event({"event": "decision", "epoch": epoch, "decision_id": f"d{epoch}"})
    run.log_event({"event": "note"})  # events without an epoch are kept
    with open(run.path / "metrics.jsonl", "a") as stream:
        stream.write('{"epoch": 4, "val_acc')  # killed mid-write
    assert [m["epoch"] for m in run.metrics()] == [0, 1, 2, 3]

    run.rewind(1)

    assert [m["epoch"] for m in run.metrics()] == [0, 1]
    assert [e.get("decision_id") for e in run.events()] == ["d0", "d1", None]
