"""The best checkpoint, early stopping, and the grown model back (load_model, evaluate).

The runs are the tiny blobs runs of conftest.py; where a test needs growth it uses the
drills' aggressive controller (every epoch a plateau, one-epoch trials).  Metrics are
compared within 1e-6: a model out of a checkpoint must score what the run recorded.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from drills import GROWTH, metrics
from tolaria import cli, load_model
from tolaria.build import build_trainer
from tolaria.checkpoint import CheckpointStore, checkpoint_epoch
from tolaria.config import CheckpointConfig, EarlyStoppingConfig, load_config
from tolaria.contracts import SeedState
from tolaria.errors import CheckpointError, ConfigError, NoCheckpoint
from tolaria.inference import evaluate_model
from tolaria.kasmina import ablated
from tolaria.rundir import RunDirectory
from tolaria.selection import ModelSelection

TOLERANCE = 1e-6


def grow(config) -> None:
    """The drills' controller: a seed grafts at once and moves on every epoch."""
    for setting in GROWTH:
        key, value = setting.split("=")
        section, field = key.split(".")
        setattr(getattr(config, section), field, float(value) if "." in value else int(value))


def no_growth(config) -> None:
    config.tamiyo.min_epochs_before_growth = 1000


def measured(trainer, model, loader) -> tuple[float, float]:
    result = evaluate_model(trainer, model, loader)
    return result.loss, result.accuracy


def recorded(record: dict) -> tuple[float, float]:
    return record["val_loss"], record["val_accuracy"]


def kept_records(run_dir) -> dict[int, dict]:
    """epoch -> the metrics line the run kept (the highest attempt)."""
    return {r["epoch"]: r for r in sorted(metrics(run_dir), key=lambda r: r["attempt"])}


def assert_close(a: tuple[float, ...], b: tuple[float, ...]) -> None:
    assert all(math.isclose(x, y, abs_tol=TOLERANCE) for x, y in zip(a, b, strict=True)), (a, b)


# -- the best checkpoint -----------------------------------------------------------------


def test_the_best_epoch_is_kept_when_it_is_not_among_the_last_n(tiny_config, tiny_data,
                                                                tmp_path):
    # A monitor whose best is an early epoch: the largest training loss.
    tiny_config.checkpoint.monitor, tiny_config.checkpoint.mode = "train_loss", "max"
    tiny_config.run.epochs, tiny_config.checkpoint.every_epochs = 5, 2
    trainer = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run")
    summary = trainer.train()

    kept = kept_records(tmp_path / "run")
    best = max(kept, key=lambda epoch: kept[epoch]["train_loss"])
    store = CheckpointStore(tmp_path / "run" / "checkpoints", keep=2)
    durable = [checkpoint_epoch(path) for path in store.checkpoints()]
    assert durable == [3, 4] and best not in durable  # pruned by the last-N rule, if it were one
    assert store.best().name == f"best-epoch-{best}-attempt-1"
    assert summary["best"] == {"monitor": "train_loss", "mode": "max", "epoch": best,
                               "attempt": 1, "value": kept[best]["train_loss"],
                               "checkpoint": f"checkpoints/best-epoch-{best}-attempt-1"}
    assert summary["test_of"] == f"best (epoch {best})"
    # The best checkpoint is the model as its epoch validated it...
    model = load_model(tmp_path / "run", "best", trials="keep")
    assert_close(measured(trainer, model, trainer.val_loader), recorded(kept[best]))
    # ...and the summary's test metrics are its.
    assert_close(measured(trainer, model, trainer.loaders.test),
                 (summary["test_loss"], summary["test_accuracy"]))
    assert measured(trainer, trainer.model, trainer.loaders.test) != (
        summary["test_loss"], summary["test_accuracy"])  # not the last model's


def test_load_model_best_of_a_grown_run_reproduces_its_summary(tiny_config, tiny_data,
                                                               tmp_path):
    grow(tiny_config)
    tiny_config.run.epochs = 5
    trainer = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run")
    summary = trainer.train()
    assert summary["params_final"] > summary["params_initial"]  # it grew

    model = load_model(tmp_path / "run", trials="keep")  # best, by default
    assert not model.training and next(model.parameters()).device.type == "cpu"
    assert_close(measured(trainer, model, trainer.loaders.test),
                 (summary["test_loss"], summary["test_accuracy"]))
    best = kept_records(tmp_path / "run")[summary["best"]["epoch"]]
    assert_close(measured(trainer, model, trainer.val_loader), recorded(best))
    with torch.no_grad():  # a plain module on plain tensors
        assert model(torch.zeros(3, 12)).shape == (3, 4)


def test_summary_tests_the_last_model_when_asked_or_without_a_run_directory(
    tiny_config, tiny_data, tmp_path
):
    tiny_config.run.epochs = 3
    in_memory = build_trainer(tiny_config, data=tiny_data).train()
    assert in_memory["test_of"] == "last (epoch 2)"
    assert in_memory["best"]["checkpoint"] is None and in_memory["best"]["epoch"] is not None

    tiny_config.checkpoint.test_of = "last"
    trainer = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run")
    summary = trainer.train()
    assert summary["test_of"] == "last (epoch 2)"
    assert_close(measured(trainer, trainer.model, trainer.loaders.test),
                 (summary["test_loss"], summary["test_accuracy"]))


def test_a_rollback_goes_back_to_the_best_of_the_epochs_it_keeps(tiny_config, tiny_data,
                                                                 tmp_path):
    # The training loss falls every epoch: each epoch is the new best.
    tiny_config.checkpoint.monitor, tiny_config.checkpoint.every_epochs = "train_loss", 0
    trainer = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run")
    for epoch in range(4):
        trainer.run_epoch(epoch)
    losses = [kept_records(tmp_path / "run")[e]["train_loss"] for e in range(4)]
    assert losses == sorted(losses, reverse=True)
    # The same incident twice: the second rollback goes one epoch further back (to 2), and
    # the best of epoch 3, which it abandons, goes with it.
    trainer.restore_from_checkpoint("drill")
    trainer.restore_from_checkpoint("drill")
    assert trainer.current_epoch == 3 and trainer.selection.best["epoch"] == 2
    # Epoch 1's best stays while the rollback ring holds a snapshot naming it.
    assert [p.name for p in trainer.store.best_checkpoints()] == [
        "best-epoch-1-attempt-1", "best-epoch-2-attempt-1"]
    model = load_model(tmp_path / "run", trials="keep")
    assert_close(measured(trainer, model, trainer.val_loader),
                 recorded(kept_records(tmp_path / "run")[2]))


def test_a_resume_after_a_kill_reproduces_the_best_and_the_summary(tiny_config, tiny_data,
                                                                   tmp_path):
    grow(tiny_config)
    tiny_config.checkpoint.monitor = "train_loss"  # a new best every epoch
    tiny_config.run.epochs, tiny_config.checkpoint.every_epochs = 6, 2
    reference = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "reference")
    expected = reference.train()

    killed = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run")
    for epoch in range(5):  # epoch 4's best is written, its durable checkpoint never is
        killed.run_epoch(epoch)
    killed.run_dir.close()
    store = CheckpointStore(tmp_path / "run" / "checkpoints", keep=2)
    assert store.best().name == "best-epoch-4-attempt-1"  # written after the newest durable
    assert checkpoint_epoch(store.checkpoints()[-1]) == 3

    run_dir, _ = RunDirectory.open_existing(tmp_path / "run")
    resumed = build_trainer(tiny_config, data=tiny_data, run_dir=run_dir)
    assert resumed.resume() == 4
    assert [p.name for p in store.best_checkpoints()] == ["best-epoch-3-attempt-1"]
    summary = resumed.train()
    for result in (summary, expected):
        result.pop("wall_time_s")
    assert summary == expected
    best = expected["best"]["epoch"]
    assert [p.name for p in store.best_checkpoints()] == [f"best-epoch-{best}-attempt-1"]


# -- the grown model back ----------------------------------------------------------------


def test_load_model_last_of_a_killed_run_reproduces_its_checkpoint_epoch(
    tiny_config, tiny_data, tmp_path
):
    no_growth(tiny_config)  # no decision changes the model after its epoch's validation
    tiny_config.checkpoint.every_epochs = 1
    trainer = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run")
    for epoch in range(3):
        trainer.run_epoch(epoch)
    trainer.run_dir.close()  # killed: no summary
    assert not (tmp_path / "run" / "summary.json").exists()

    model = load_model(tmp_path / "run", "last", trials="keep")
    assert_close(measured(trainer, model, trainer.val_loader),
                 recorded(kept_records(tmp_path / "run")[2]))
    newest = CheckpointStore(tmp_path / "run" / "checkpoints", keep=2).checkpoints()[-1]
    one = load_model(newest)  # a checkpoint directory on its own
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(),
                                                model.state_dict().values(), strict=True))


def test_trials_are_dropped_or_kept_at_their_alpha(tiny_config, tiny_data, tmp_path):
    grow(tiny_config)
    tiny_config.checkpoint.every_epochs, tiny_config.run.epochs = 1, 8
    trainer = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run")
    blending = (SeedState.BLENDING, SeedState.PROBATIONARY)
    for epoch in range(8):
        trainer.run_epoch(epoch)
        if any(s in blending for s in trainer.tamiyo.seed_states.values()):
            break
    on_trial = [i for i, s in trainer.tamiyo.seed_states.items() if s.is_active]
    assert any(trainer.tamiyo.seed_states[i] in blending for i in on_trial)

    keep = load_model(tmp_path / "run", "last", trials="keep")
    drop = load_model(tmp_path / "run", "last", trials="drop")
    live = trainer.model.eval()
    x = tiny_data.val.tensors[0][:32]
    with torch.no_grad():
        assert torch.allclose(keep(x), live(x), atol=TOLERANCE)
        with ablated(live, on_trial):  # the live model with every trial's alpha at 0
            assert torch.allclose(drop(x), live(x), atol=TOLERANCE)
        assert not torch.allclose(keep(x), drop(x), atol=1e-3)
    trial_weights = {name for name in keep.state_dict() if ".blueprint." in name} - set(
        drop.state_dict())
    assert trial_weights and all(".kasmina." in name for name in trial_weights)


def test_load_model_refuses_what_it_cannot_load_in_one_line(tiny_config, tiny_data, tmp_path):
    tiny_config.checkpoint.monitor, tiny_config.run.epochs = None, 1
    build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run").train()
    with pytest.raises(NoCheckpoint, match="no best checkpoint"):
        load_model(tmp_path / "run")
    with pytest.raises(ConfigError, match="neither a run directory nor a checkpoint"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="trials='some'"):
        load_model(tmp_path / "run", "last", trials="some")

    # A host from user code must be importable where the model is loaded.
    tiny_config.checkpoint.monitor = "val_accuracy"
    tiny_config.model.host, tiny_config.model.kwargs = "plugins_for_data_tests:tiny_host", {}
    tiny_config.kasmina.layers = ["1"]
    build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "user").train()
    assert load_model(tmp_path / "user")(torch.zeros(2, 12)).shape == (2, 4)
    fingerprint = next((tmp_path / "user" / "checkpoints").glob("best-*")) / "state.json"
    state = json.loads(fingerprint.read_text())
    state["components"]["fingerprint"]["model.host"] = json.dumps("not_a_module_here:make")
    _rewrite_state(fingerprint.parent, state)
    with pytest.raises(ConfigError, match="cannot import module 'not_a_module_here'"):
        load_model(tmp_path / "user")


def _rewrite_state(checkpoint, state: dict) -> None:
    """Replace a checkpoint's state.json and fix its manifest, as a user editing it would."""
    import hashlib

    data = json.dumps(state).encode()
    (checkpoint / "state.json").write_bytes(data)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"sha256": hashlib.sha256(data).hexdigest(),
                                       "bytes": len(data)}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


# -- early stopping ----------------------------------------------------------------------


def test_early_stopping_stops_says_so_and_leaves_the_last_epoch_durable(
    tiny_config, tiny_data, tmp_path
):
    no_growth(tiny_config)
    tiny_config.run.epochs, tiny_config.checkpoint.every_epochs = 20, 0
    # Nothing after the first epoch improves by 10: the run stops after patience epochs.
    tiny_config.run.early_stopping = EarlyStoppingConfig(patience=2, min_delta=10.0)
    summary = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run").train()
    assert (summary["status"], summary["stopped_early"], summary["epochs"]) == (
        "completed", True, 3)
    assert summary["stop_reason"].startswith("early stopping: val_accuracy has not improved")
    assert summary["seeds_on_trial"] == {}
    newest = CheckpointStore(tmp_path / "run" / "checkpoints", keep=2).checkpoints()[-1]
    assert checkpoint_epoch(newest) == 2

    # Resumed with more epochs, it would stop at once, as the uninterrupted run did; a
    # looser patience lets it go on from its last epoch.
    tiny_config.run.early_stopping = EarlyStoppingConfig(patience=4, min_delta=10.0)
    run_dir, _ = RunDirectory.open_existing(tmp_path / "run")
    resumed = build_trainer(tiny_config, data=tiny_data, run_dir=run_dir)
    assert resumed.resume() == 3
    assert resumed.train()["epochs"] == 5


def single_seed_trial(config) -> None:
    """One seed, grafted at once; a culled one never comes back: the run's one trial."""
    grow(config)
    config.kasmina.layers, config.kasmina.chunks = ["hidden.0"], 1
    config.kasmina.embargo_epochs = 100
    config.run.epochs = 20
    config.run.early_stopping = EarlyStoppingConfig(patience=1, min_delta=10.0)


def test_early_stopping_waits_for_a_seed_on_trial(tiny_config, tiny_data, tmp_path):
    single_seed_trial(tiny_config)
    summary = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run").train()
    states = [r["seed_states"] for r in kept_records(tmp_path / "run").values()]
    on_trial = [any(SeedState(s).is_active for s in epoch.values()) for epoch in states]
    # Patience ran out after epoch 1; the run went on to the first epoch with no trial.
    assert on_trial[1] and summary["stopped_early"]
    assert summary["epochs"] == on_trial.index(False, 1) + 1
    assert summary["seeds_on_trial"] == {}


def test_early_stopping_during_trials_stops_and_names_the_seeds_on_trial(
    tiny_config, tiny_data, tmp_path
):
    single_seed_trial(tiny_config)
    tiny_config.run.early_stopping.during_trials = True
    summary = build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run").train()
    assert summary["stopped_early"] and summary["epochs"] == 2
    assert summary["seeds_on_trial"] and all(
        SeedState(state).is_active for state in summary["seeds_on_trial"].values())


def test_stop_reason_only_when_patience_is_spent_and_no_trial_runs():
    selection = ModelSelection(CheckpointConfig(), EarlyStoppingConfig(patience=2))
    selection.reference, selection.stale = 0.5, 1
    assert selection.stop_reason({}) is None
    selection.stale = 2
    assert selection.stop_reason({"a.0": SeedState.BLENDING}) is None
    assert selection.stop_reason({"a.0": SeedState.FOSSILIZED}) == (
        "early stopping: val_accuracy has not improved on 0.5 for 2 epochs")


def test_monitor_mistakes_are_one_line_before_any_run_directory(tiny_config, tiny_data,
                                                                tmp_path):
    tiny_config.checkpoint.monitor = "val_f1"
    with pytest.raises(ConfigError, match=r"checkpoint\.monitor='val_f1': unknown metric"):
        build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run")
    tiny_config.checkpoint.monitor = None
    tiny_config.run.early_stopping = EarlyStoppingConfig()
    with pytest.raises(ConfigError, match=r"run\.early_stopping needs a checkpoint\.monitor"):
        build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- tolaria evaluate --------------------------------------------------------------------

SETTINGS = ["data.dataset=plugins_for_best_model:blobs", "run.epochs=3", "run.device=cpu",
            "run.progress=false", "run.tensorboard=false", "model.kwargs.hidden=[16]",
            "kasmina.layers=[hidden.*]", "tamiyo.blueprints=[residual_mlp]"]


def train_cli(run, tmp_path, *settings: str) -> dict:
    sets = [f"--set={s}" for s in [*SETTINGS, f"data.cache_dir={tmp_path}", *settings]]
    assert cli.main(["train", "--run-dir", str(run), *sets]) == 0
    return json.loads((run / "summary.json").read_text())


def evaluate(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert cli.main(["evaluate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_evaluate_prints_the_metrics_the_run_recorded(tmp_path, capsys):
    run = tmp_path / "run"
    summary = train_cli(run, tmp_path)

    test = evaluate(capsys, str(run))
    assert test["checkpoint"] == summary["best"]["checkpoint"]
    assert (test["split"], test["trials"], test["samples"]) == ("test", "keep", 64)
    assert_close((test["loss"], test["accuracy"]), (summary["test_loss"], summary["test_accuracy"]))
    val = evaluate(capsys, str(run), "--split", "val")
    assert_close((val["loss"], val["accuracy"]), recorded(kept_records(run)[val["epoch"]]))
    last = evaluate(capsys, str(run), "--checkpoint", "last", "--trials", "drop")
    assert last["epoch"] == 2 and last["checkpoint"].startswith("checkpoints/ckpt-")

    assert cli.main(["evaluate", str(run)]) == 0  # the table
    assert "accuracy" in capsys.readouterr().out


def test_evaluate_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in _one_line(capsys)

    run = tmp_path / "run"
    train_cli(run, tmp_path, "checkpoint.monitor=null", "run.epochs=1")
    capsys.readouterr()
    assert cli.main(["evaluate", str(run)]) == 2
    assert "no best checkpoint" in _one_line(capsys)
    assert load_config(run / "config.yaml").checkpoint.monitor is None


def test_resume_leaves_a_run_that_stopped_early_unless_asked_to_go_on(tmp_path, capsys):
    run = tmp_path / "run"
    summary = train_cli(run, tmp_path, "run.epochs=10", "tamiyo.min_epochs_before_growth=1000",
                        "run.early_stopping.patience=1", "run.early_stopping.min_delta=10")
    assert summary["stopped_early"] and summary["epochs"] == 2
    capsys.readouterr()
    assert cli.main(["resume", str(run)]) == 0
    assert "already completed" in capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2

    assert cli.main(["resume", str(run), "--set", "run.early_stopping.patience=3"]) == 0
    assert "resuming" in capsys.readouterr().err
    resumed = json.loads((run / "summary.json").read_text())
    assert (resumed["epochs"], resumed["stopped_early"]) == (4, True)
    assert load_config(run / "config.yaml").run.early_stopping.patience == 3


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_a_checkpoint_that_fails_to_load_is_one_line(tiny_config, tiny_data, tmp_path):
    tiny_config.run.epochs = 1
    build_trainer(tiny_config, data=tiny_data, run_dir=tmp_path / "run").train()
    best = CheckpointStore(tmp_path / "run" / "checkpoints", keep=2).best()
    (best / "tensors.safetensors").write_bytes(b"torn")
    with pytest.raises(CheckpointError, match=r"tensors\.safetensors"):
        load_model(tmp_path / "run")
