"""Tasks beyond classification: the configured loss, named metrics, the monitor score, the
chance level Tamiyo measures against, and regression runs that grow."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as sk
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import plugins_for_task_tests
from packets import make_packet
from tolaria.build import build_trainer
from tolaria.config import TaskConfig, TolariaConfig, load_config
from tolaria.contracts import EvalMetrics, SystemStatePacket
from tolaria.data import DataBundle
from tolaria.errors import ConfigError, RunMismatch
from tolaria.fingerprint import RunFingerprint
from tolaria.tamiyo import ChanceLevel, EmergencyDetector
from tolaria.task import Task

CPU = torch.device("cpu")
EXAMPLE = Path(__file__).parents[1] / "examples" / "regression.yaml"


def measure(task: Task, output: torch.Tensor, target: torch.Tensor, batch: int) -> EvalMetrics:
    """One evaluation pass over ``(output, target)`` in batches of ``batch`` (the last short)."""
    evaluation = task.evaluation(CPU)
    for start in range(0, len(output), batch):
        evaluation.update(output[start : start + batch], target[start : start + batch])
    return evaluation.result()


def regression_bundle(n: int = 96, width: int = 1, seed: int = 0) -> DataBundle:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, 6, generator=g)
    y = x[:, :width] * 2.0 + 0.1 * torch.randn(3 * n, width, generator=g)
    split = [TensorDataset(x[i * n : (i + 1) * n], y[i * n : (i + 1) * n]) for i in range(3)]
    return DataBundle("lines", *split, input_shape=(6,), num_classes=width)


def regression_config(tmp_path, *overrides: str) -> TolariaConfig:
    return load_config(None, [
        "run.device=cpu", "run.progress=false", "run.tensorboard=false",
        f"data.cache_dir={tmp_path / 'cache'}", "task.kind=regression", *overrides,
    ])


# --- metrics --------------------------------------------------------------------------------


def test_regression_metrics_match_scikit_learn_over_uneven_batches_far_from_zero():
    # Targets around 1e4 with unit spread: float32 sums of y and y² would cancel R² away.
    g = torch.Generator().manual_seed(0)
    target = 1e4 + torch.randn(103, 3, generator=g)
    output = target + 0.5 * torch.randn(103, 3, generator=g)
    task = Task(TaskConfig(kind="regression", metrics=["mse", "mae", "rmse", "r2"]))
    result = measure(task, output, target, batch=10)
    y, p = target.double().numpy(), output.double().numpy()
    assert result.metrics["mse"] == pytest.approx(sk.mean_squared_error(y, p), rel=1e-9)
    assert result.metrics["mae"] == pytest.approx(sk.mean_absolute_error(y, p), rel=1e-9)
    assert result.metrics["rmse"] == pytest.approx(math.sqrt(sk.mean_squared_error(y, p)))
    # float64 leaves ~1e-8 of R² here; float32 sums would be off by more than R² itself.
    assert result.metrics["r2"] == pytest.approx(sk.r2_score(y, p), rel=1e-6)
    assert result.accuracy == result.metrics["r2"]  # the default monitor, higher is better
    assert result.loss == pytest.approx(result.metrics["mse"], rel=1e-6)  # the default loss


def test_a_one_dimensional_target_is_shaped_like_a_one_wide_output():
    task = Task(TaskConfig(kind="regression"))
    output, target = torch.arange(8.0).reshape(8, 1), torch.arange(8.0) + 1.0
    result = measure(task, output, target, batch=3)
    assert result.loss == pytest.approx(1.0) and result.metrics["mae"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match=r"targets of shape \(8, 3\) do not fit .* \(8, 1\)"):
        measure(task, output, torch.zeros(8, 3), batch=8)


def test_classification_accuracy_and_a_min_mode_monitor_is_stored_negated():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])
    target = torch.tensor([0, 1, 0, 0])
    default = measure(Task(TaskConfig()), logits, target, batch=3)
    assert default.metrics == {"accuracy": 0.75} and default.accuracy == 0.75
    assert default.loss == pytest.approx(F.cross_entropy(logits, target).item())
    by_loss = Task(TaskConfig(monitor="loss"))
    assert by_loss.mode == "min"
    result = measure(by_loss, logits, target, batch=4)
    assert result.accuracy == pytest.approx(-result.loss)  # higher is better, always
    assert by_loss.monitored(result.accuracy) == pytest.approx(result.loss)


def test_torchmetrics_objects_agree_with_the_builtin_and_each_pass_has_its_own_state():
    task = Task(TaskConfig(kind="regression", monitor="MeanAbsoluteError", metrics=[
        "mae",
        "torchmetrics.regression:MeanAbsoluteError",  # a class: built, and mode implied
        {"name": "plugins_for_task_tests:SHARED_MAE", "label": "shared"},  # an instance
        {"name": "plugins_for_task_tests:worst_error", "label": "worst"},  # a function
    ]))
    assert task.mode == "min"  # torchmetrics' higher_is_better = False
    g = torch.Generator().manual_seed(1)
    target = torch.randn(50, 1, generator=g)
    first = measure(task, target + 1.0, target, batch=7)  # every error exactly 1
    second = measure(task, target - 3.0, target, batch=7)  # every error exactly 3
    for result, error in ((first, 1.0), (second, 3.0)):
        assert result.metrics["MeanAbsoluteError"] == pytest.approx(error, rel=1e-6)
        assert result.metrics["shared"] == pytest.approx(error, rel=1e-6)  # no state carried
        assert result.metrics["mae"] == pytest.approx(error, rel=1e-6)
        assert result.metrics["worst"] == pytest.approx(error, rel=1e-6)
        assert result.accuracy == pytest.approx(-error, rel=1e-6)


@pytest.mark.parametrize(("settings", "message"), [
    ({"kind": "regression", "loss": "cross_entropy"}, "a classification loss"),
    ({"loss": "mse"}, r"task.loss='mse': a regression loss; task.kind=classification takes"),
    ({"kind": "regression", "metrics": ["accuracy"]}, "a classification metric"),
    ({"metrics": ["f1"]}, r"task.metrics.0='f1': unknown metric"),
    ({"kind": "regression", "metrics": ["mse"]}, r"task.monitor='r2' \(the default\) is not"),
    ({"metrics": ["accuracy", "accuracy"]}, "task.metrics.1: the label 'accuracy' is taken"),
    ({"metrics": [{"name": "accuracy", "label": "loss"}]}, r"taken \(by the loss\)"),
    ({"metrics": [{"name": "accuracy", "kwargs": {"k": 1}}]}, "the built-in 'accuracy' takes"),
    ({"kind": "regression", "metrics": ["plugins_for_task_tests:worst_error"],
      "monitor": "worst_error"}, "task.mode: say whether a higher worst_error is better"),
    ({"loss_kwargs": {"smoothing": 0.1}}, r"task.loss_kwargs: unknown argument\(s\) 'smoothing'"),
    ({"kind": "regression", "loss": "plugins_for_task_tests:smooth_l1",
      "loss_kwargs": {"alpha": 1}}, r"task.loss_kwargs: unknown argument\(s\) 'alpha'"),
    ({"metrics": ["no_such_module:metric"]}, "task.metrics.0.name='no_such_module:metric': cannot"),
    ({"kind": "regression", "metrics": [{"name": "plugins_for_task_tests:SHARED_MAE",
                                         "kwargs": {"x": 1}}]}, "a metric object, built already"),
])
def test_a_task_that_cannot_work_is_one_line_naming_the_field(settings, message):
    with pytest.raises(ConfigError, match=message) as caught:
        Task(TaskConfig(**settings))
    assert "\n" not in str(caught.value)


def test_a_bad_task_is_refused_before_data_or_run_directory_exist(tmp_path):
    config = regression_config(tmp_path, "task.metrics=[accuracy]")
    with pytest.raises(ConfigError, match="a classification metric"):
        build_trainer(config, run_dir=tmp_path / "run")
    # Targets wider than the host's output: found on the sample batch, not in epoch 0.
    config = regression_config(tmp_path, "kasmina.layers=[]")
    with pytest.raises(ConfigError, match="do not fit the model's output"):
        build_trainer(config, data=regression_bundle(width=3), model=torch.nn.Linear(6, 1),
                      run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"needs at least 2 classes.*task.kind=regression"):
        build_trainer(load_config(None, ["kasmina.layers=[]"]), data=regression_bundle(),
                      run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --- Tamiyo's reference: the chance level -------------------------------------------------


def test_the_chance_level_is_what_an_output_that_knows_nothing_scores(tiny_data):
    bundle = regression_bundle()
    sample = torch.zeros(2, 1)
    chance = Task(TaskConfig(kind="regression")).chance_level(bundle, sample)
    targets = bundle.train.tensors[1]
    assert chance.loss == pytest.approx(targets.var(unbiased=False).item(), rel=1e-5)
    assert chance.score == 0.0 and "training targets' mean" in chance.what  # R² of the mean
    by_mse = Task(TaskConfig(kind="regression", monitor="mse")).chance_level(bundle, sample)
    assert by_mse.score is None  # no collapse check where chance is not known by definition
    l1 = Task(TaskConfig(kind="regression", loss="mae")).chance_level(bundle, sample)
    around_mean = (targets - targets.mean()).abs().mean().item()
    assert l1.loss == pytest.approx(around_mean, rel=1e-5)
    classes = Task(TaskConfig()).chance_level(tiny_data, torch.zeros(2, 4))
    assert classes.loss == pytest.approx(math.log(4)) and classes.score == 0.25
    # Any indexable dataset (read item by item), and a user's metric that took the name "r2":
    pairs = [(torch.zeros(3), float(i % 3)) for i in range(30)]
    listed = DataBundle("pairs", pairs, pairs, None, input_shape=(3,), num_classes=1)
    own = Task(TaskConfig(kind="regression", monitor="r2", mode="max", metrics=[
        {"name": "plugins_for_task_tests:worst_error", "label": "r2"}]))
    chance = own.chance_level(listed, torch.zeros(2, 1))
    assert chance.loss == pytest.approx(2 / 3) and chance.score is None  # var of 0, 1, 2


def test_regression_divergence_is_measured_against_the_mean_collapse_only_where_known():
    def detector(chance: ChanceLevel) -> EmergencyDetector:
        return EmergencyDetector(chance=chance, collapse_margin=0.02, chance_loss_factor=3.0,
                                 divergence_factor=3.0, divergence_epochs=1, divergence_window=5,
                                 divergence_loss_floor=0.05)

    mean = ChanceLevel(2.0, None, "the loss of predicting the training targets' mean")
    d = detector(mean)
    assert d.check(make_packet(0, 5.0, acc=-5.0)) is None  # 5 < 3 x 2
    assert d.check(make_packet(1, 1.0, acc=0.9)) is None
    assert d.check(make_packet(2, 2.0, acc=-2.0)) is None  # a score far below: no collapse
    emergency = detector(mean).check(make_packet(0, 7.0, acc=-7.0))
    assert emergency.kind == "divergence" and "predicting the training targets' mean" in (
        emergency.reason)
    r2 = detector(ChanceLevel(1.0, 0.0, "mean"))  # R²: chance is 0 by definition
    assert r2.check(make_packet(0, 0.2, acc=0.8)) is None
    assert r2.check(make_packet(1, 1.0, acc=0.01)).kind == "collapse"
    # A loss that is negative at chance (a log-likelihood) gives no scale: no such check.
    assert detector(ChanceLevel(-1.0, None, "nll")).check(make_packet(0, 50.0, acc=0)) is None


# --- contracts and checkpoints ------------------------------------------------------------


def test_named_metrics_round_trip_and_older_packets_still_load():
    packet = make_packet(3, 0.2, 0.9, validation_metrics={"mse": 0.2, "r2": 0.9},
                         counterfactual={"s": EvalMetrics(0.3, 0.8, {"mse": 0.3, "r2": 0.8})})
    assert SystemStatePacket.from_json(packet.to_json()) == packet
    old = json.loads(packet.to_json())
    del old["validation_metrics"], old["counterfactual"]["s"]["metrics"]
    loaded = SystemStatePacket.from_dict(old)
    assert loaded.validation_metrics == {} and loaded.counterfactual["s"].metrics == {}


def test_the_fingerprint_holds_the_task_and_older_checkpoints_compare_as_the_default(tiny_data):
    model = torch.nn.Linear(12, 4)
    default = RunFingerprint(TolariaConfig(), tiny_data, model)
    before_tasks = {k: v for k, v in default.state_dict().items() if not k.startswith("task.")}
    default.load_state_dict(before_tasks)  # a checkpoint written before the task section
    changed = TolariaConfig()
    changed.task.monitor = "loss"
    with pytest.raises(RunMismatch, match=r'task.monitor \(null -> "loss"\)'):
        RunFingerprint(changed, tiny_data, model).load_state_dict(before_tasks)


# --- runs ---------------------------------------------------------------------------------


def test_a_regression_run_grows_and_its_summary_reports_r2_and_mse(tmp_path):
    config = regression_config(
        tmp_path, "run.seed=1", "run.epochs=6", "data.dataset=friedman1",
        "data.kwargs={n_train: 500, n_test: 200}", "data.batch_size=32",
        "model.kwargs={hidden: [8, 8]}", 'kasmina.layers=["hidden.*"]', "kasmina.blend_epochs=1",
        "optimizer.seed_lr_multiplier=1.0", "tamiyo.blueprints=[residual_mlp]",
        "tamiyo.plateau_min_improvement=10", "tamiyo.min_training_epochs=1",
        "checkpoint.test_of=last",  # the summary then describes the final model, checked below
    )
    trainer = build_trainer(config, run_dir=tmp_path / "run")
    summary = trainer.train()
    assert summary["seeds"].get("fossilized", 0) >= 1
    assert summary["params_final"] > summary["params_initial"]
    assert summary["task"] == "regression" and summary["monitor"] == "r2"
    assert "test_accuracy" not in summary
    # The summary's test metrics are those of the final model on the test split.
    x, y = trainer.data.test.tensors
    trainer.model.eval()
    with torch.no_grad():
        predicted = trainer.model(x).numpy()
    assert summary["test_r2"] == pytest.approx(sk.r2_score(y.numpy(), predicted), abs=1e-6)
    assert summary["test_mse"] == pytest.approx(
        sk.mean_squared_error(y.numpy(), predicted), rel=1e-5)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert all(line["val_accuracy"] == line["val_metrics"]["r2"] for line in lines)
    assert summary["best_val_r2"] == max(line["val_metrics"]["r2"] for line in lines)
    assert summary["final_val_mae"] == lines[-1]["val_metrics"]["mae"]


def test_a_user_loss_function_and_a_torchmetrics_monitor_drive_a_run(tmp_path):
    config = regression_config(
        tmp_path, "run.epochs=3", "kasmina.layers=[]",
        "task.loss=plugins_for_task_tests:smooth_l1", "task.loss_kwargs={beta: 0.5}",
        "task.metrics=[mae, 'torchmetrics.regression:MeanAbsoluteError']",
        "task.monitor=MeanAbsoluteError",
    )
    data = regression_bundle()
    trainer = build_trainer(config, data=data, model=torch.nn.Linear(6, 1))
    calls = plugins_for_task_tests.CALLS["smooth_l1"]
    summary = trainer.train()
    assert plugins_for_task_tests.CALLS["smooth_l1"] > calls + 3 * len(trainer.train_loader)
    x, y = data.val.tensors
    with torch.no_grad():
        output = trainer.model(x)
    measured = trainer.last_record
    assert measured["val_loss"] == pytest.approx(
        F.smooth_l1_loss(output, y, beta=0.5).item(), rel=1e-5)
    mae = (output - y).abs().mean().item()
    assert measured["val_metrics"]["MeanAbsoluteError"] == pytest.approx(mae, rel=1e-5)
    assert measured["val_metrics"]["mae"] == pytest.approx(mae, rel=1e-5)
    assert measured["val_accuracy"] == pytest.approx(-mae, rel=1e-5)  # min mode, negated
    assert summary["monitor_mode"] == "min"
    assert summary["best_val_MeanAbsoluteError"] <= summary["final_val_MeanAbsoluteError"]
    assert np.isfinite(summary["test_MeanAbsoluteError"])


@pytest.mark.slow
def test_the_regression_example_trains_end_to_end_and_grows(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "tolaria.cli", "train", "--config", str(EXAMPLE),
         "--run-dir", str(run), "--set", "run.progress=false",
         "--set", f"data.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["seeds"].get("fossilized", 0) >= 1
    assert summary["test_r2"] > 0.8 and "test_r2" in done.stdout
