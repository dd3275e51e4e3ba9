"""Training controls (tolaria.stepping): gradient accumulation, clipping, precision, device.

The trainer-level tests train a seedless host on tiny blobs, so nothing grows and two runs
differ only by the control under test.  250 training samples: batches of 8 end with a
batch of 2, so the accumulation windows' weighting is exercised on a short batch too.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from test_hardening import FAST
from tolaria.build import build_trainer
from tolaria.cli import main
from tolaria.config import OptimizerConfig
from tolaria.optim import DynamicOptimizerManager
from tolaria.stepping import AccumulationWindows, BatchStepper

#: Accumulated and large-batch runs add the same float32 numbers in another order: after
#: 3 epochs of SGD with momentum the weights agree to ~1e-7; a real difference is ~1e-2.
TOLERANCE = 1e-5


@pytest.fixture
def data(tiny_data):
    x, y = tiny_data.train.tensors
    tiny_data.train = TensorDataset(x[:250], y[:250])
    return tiny_data


@pytest.fixture
def config(tiny_config):
    tiny_config.kasmina.layers = []
    tiny_config.run.epochs = 3
    tiny_config.optimizer.name = "SGD"
    tiny_config.optimizer.lr = 0.05
    tiny_config.optimizer.kwargs = {"momentum": 0.9, "weight_decay": 1e-3}
    return tiny_config


def trained(config, data, *, batch_size, k=1, **changes):
    config = config.model_copy(deep=True)
    config.data.batch_size = batch_size
    config.optimizer.accumulate_batches = k
    for key, value in changes.items():
        section, field = key.split("__")
        setattr(getattr(config, section), field, value)
    trainer = build_trainer(config, data=data)
    lrs = []
    for epoch in range(config.run.epochs):
        trainer.run_epoch(epoch)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    return trainer, lrs


def max_difference(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return max((x - y).abs().max().item() for x, y in pairs)


def test_accumulating_k_batches_equals_one_batch_k_times_larger(config, data):
    accumulated, _ = trained(config, data, batch_size=8, k=4)
    large, _ = trained(config, data, batch_size=32)
    assert max_difference(accumulated.model, large.model) < TOLERANCE
    # global_step counts optimizer steps: 8 per epoch (7 windows of 32 samples, one of 26).
    assert accumulated.global_step == large.global_step == 3 * 8
    small, _ = trained(config, data, batch_size=8)  # the control: the same batches, no window
    assert max_difference(small.model, large.model) > 100 * TOLERANCE


def test_windows_weigh_each_batch_by_its_share_of_the_window():
    windows = AccumulationWindows(num_samples=250, batch_size=8, k=4)
    assert (windows.batches, windows.steps_per_epoch) == (32, 8)
    assert [windows.weight(b) for b in (0, 3, 28, 31)] == [8 / 32, 8 / 32, 8 / 26, 2 / 26]
    assert [b for b in range(32) if windows.closes(b)] == list(range(3, 32, 4))
    uneven = AccumulationWindows(num_samples=250, batch_size=8, k=3)  # 10 windows of 3, one of 2
    assert uneven.steps_per_epoch == 11 and uneven.closes(29) and uneven.closes(31)
    assert sum(uneven.weight(b) for b in (30, 31)) == pytest.approx(1.0)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_the_schedule_counts_optimizer_steps_and_ends_where_it_would_without_accumulation(
    config, data, interval
):
    schedule = {"scheduler__name": "CosineAnnealingLR", "scheduler__interval": interval}
    _, accumulated = trained(config, data, batch_size=8, k=4, **schedule)
    _, large = trained(config, data, batch_size=32, **schedule)
    assert accumulated == pytest.approx(large, abs=1e-12)
    assert accumulated[-1] == pytest.approx(0.0, abs=1e-12)  # T_max came from the run: ended
    assert accumulated[0] < config.optimizer.lr


def linear_stepper(*, k=1, grad_scaler=None, **clip):
    """An SGD step of lr 1 (the update is minus the gradient) on a fresh linear model."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    manager = DynamicOptimizerManager(model, OptimizerConfig(name="SGD", lr=1.0, **clip))
    windows = AccumulationWindows(num_samples=8 * k, batch_size=8, k=k)
    return model, manager, BatchStepper(manager, windows, manager.config, grad_scaler)


def big_loss(model):
    x = torch.linspace(-50, 50, 48).reshape(8, 6)
    return model(x).pow(2).mean()


def window_update(model, stepper, k) -> torch.Tensor:
    """All parameters' change over one window of ``k`` batches, flattened."""
    before = [p.detach().clone() for p in model.parameters()]
    for batch in range(k):
        assert stepper(big_loss(model), batch) is (batch == k - 1)  # one step, at the end
    after = zip(model.parameters(), before, strict=True)
    return torch.cat([(p.detach() - b).flatten() for p, b in after])


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("clip, bound", [
    ({"clip_grad_norm": 0.5}, lambda update: update.norm()),
    ({"clip_grad_value": 0.01}, lambda update: update.abs().max()),
])
def test_clipping_bounds_the_update_of_the_window(clip, bound, k):
    limit = next(iter(clip.values()))
    model, _, stepper = linear_stepper(k=k, **clip)
    assert 0 < bound(window_update(model, stepper, k)) <= limit * (1 + 1e-5)
    model, _, unclipped = linear_stepper(k=k)
    assert bound(window_update(model, unclipped, k)) > 10 * limit  # the control


def test_a_grad_scaler_clips_the_true_gradients_skips_inf_steps_and_survives_growth():
    # fp16 runs only on CUDA; its scaler's protocol is the same on CPU, and so is ours.
    scaled_model, manager, scaled = linear_stepper(
        grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16), clip_grad_norm=0.5
    )
    plain_model, _, plain = linear_stepper(clip_grad_norm=0.5)
    assert scaled(big_loss(scaled_model), 0) and plain(big_loss(plain_model), 0)
    # Scaled by a power of two and unscaled before the clip: the very same step.
    assert max_difference(scaled_model, plain_model) == 0.0

    weights = copy.deepcopy(scaled_model.state_dict())
    assert scaled(big_loss(scaled_model) * torch.inf, 0)  # inf gradients...
    assert all(torch.equal(p, weights[n]) for n, p in scaled_model.state_dict().items())
    assert scaled.grad_scaler.get_scale() == 2.0**15  # ...skip the step and halve the scale
    assert manager.state_dict()["counters"]["steps"] == 2  # the schedule still counts it

    scaled_model.extra = nn.Linear(6, 3)  # growth: a parameter joins the optimizer
    manager.rebuild_optimizer()
    grown = scaled_model.extra.weight.detach().clone()
    loss = big_loss(scaled_model) + scaled_model.extra(torch.ones(1, 6)).sum()
    assert scaled(loss, 0)
    assert not torch.equal(scaled_model.extra.weight, grown)  # the same scaler trains it
    state = scaled.grad_scaler.state_dict()
    assert state["scale"] == 2.0**15 and state["_growth_tracker"] == 1


def test_bf16_autocast_on_cpu_trains_close_to_fp32(config, data):
    config.run.epochs = 1  # still far from fitted: a loss that says something
    seen = set()
    bf16, _ = trained(config, data, batch_size=32, run__precision="bf16")
    fp32, _ = trained(config, data, batch_size=32)
    hook = bf16.model.head.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    metrics, _ = bf16.evaluate(bf16.val_loader)
    hook.remove()
    assert seen == {torch.bfloat16}  # the forward pass really ran in bfloat16...
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # ...on fp32 weights
    reference, _ = fp32.evaluate(fp32.val_loader)
    # bfloat16 keeps ~3 significant digits; here the losses agree to ~1e-4 of their size.
    assert abs(metrics.loss - reference.loss) < 0.01 * reference.loss
    assert max_difference(bf16.model, fp32.model) > 0  # and it is not the fp32 run


@pytest.mark.parametrize("settings, message", [
    (["run.precision=fp16", "run.device=cpu"], "run.precision='fp16' needs CUDA"),
    (["run.amp=true"], "run.amp: replaced by run.precision"),
    (["run.device=gpu"], "run.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["run.device=cuda:1x"], "run.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    pytest.param(["run.device=cuda:0"], "run.device='cuda:0': CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")),
])
def test_a_control_the_run_cannot_honour_is_one_line_and_leaves_nothing(
    tmp_path, capsys, settings, message
):
    run = tmp_path / "run"
    code = main(["train", "--run-dir", str(run), *(f"--set={s}" for s in [*FAST, *settings])])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_resume_with_accumulation_and_clipping_is_bit_exact(config, data, tmp_path):
    config.run.epochs = 4
    config.data.batch_size = 8
    config.optimizer.accumulate_batches = 3  # 32 batches: the last window holds 2
    config.optimizer.clip_grad_norm = 1.0
    config.scheduler.name, config.scheduler.interval = "CosineAnnealingLR", "step"
    config.checkpoint.every_epochs = 2
    reference = build_trainer(config, data=data, run_dir=tmp_path / "reference")
    reference.train()

    stopped = build_trainer(config, data=data, run_dir=tmp_path / "stopped")
    for epoch in range(3):  # the durable checkpoint is epoch 1's; epoch 2 is lost
        stopped.run_epoch(epoch)
    resumed = build_trainer(config, data=data, run_dir=stopped.run_dir)
    assert resumed.resume() == 2
    resumed.train()
    assert resumed.global_step == reference.global_step == 4 * 11
    for name, weight in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], weight), name
    assert resumed.optimizer.param_groups[0]["lr"] == reference.optimizer.param_groups[0]["lr"]


# --- CUDA: skipped on a CPU machine; `make gpu-check` runs them ---------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_precisions_train_on_an_indexed_device_close_to_fp32(config, data, precision):
    index = torch.cuda.device_count() - 1
    low, _ = trained(config, data, batch_size=32, k=2, run__precision=precision,
                     run__device=f"cuda:{index}")
    full, _ = trained(config, data, batch_size=32, k=2, run__device=f"cuda:{index}")
    assert low.device == torch.device("cuda", index)
    assert all(p.device == low.device for p in low.model.parameters())
    assert ("grad_scaler" in low.components) is (precision == "fp16")
    metrics, _ = low.evaluate(low.val_loader)
    reference, _ = full.evaluate(full.val_loader)
    assert abs(metrics.loss - reference.loss) < 0.05 * reference.loss + 0.01


@cuda
def test_cuda_fp16_scaler_state_joins_checkpoints_and_resume_is_exact(config, data, tmp_path):
    config.run.device, config.run.precision = "cuda", "fp16"
    config.data.batch_size, config.optimizer.accumulate_batches = 8, 3
    config.optimizer.clip_grad_norm = 1.0
    config.checkpoint.every_epochs = 1
    reference = build_trainer(config, data=data, run_dir=tmp_path / "reference")
    reference.train()
    stopped = build_trainer(config, data=data, run_dir=tmp_path / "stopped")
    for epoch in range(2):
        stopped.run_epoch(epoch)
    saved_scale = stopped.stepper.grad_scaler.get_scale()
    resumed = build_trainer(config, data=data, run_dir=stopped.run_dir)
    assert resumed.resume() == 2
    assert resumed.stepper.grad_scaler.get_scale() == saved_scale
    resumed.train()
    for name, weight in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], weight), name
    assert resumed.stepper.grad_scaler.state_dict() == reference.stepper.grad_scaler.state_dict()
