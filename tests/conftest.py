"""Shared fixtures: tiny in-memory data so trainer tests take seconds, not minutes."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from tolaria.config import ACADEMY_VARIABLE, TolariaConfig
from tolaria.data import DataBundle

# The test models are tiny: one thread is fastest, and immune to a busy machine's stalls.
torch.set_num_threads(1)

# The fault drills' shared tooling and the collector of docs/reliability.md (tests/drills.py).
pytest_plugins = ["drills"]


@pytest.fixture(scope="session", autouse=True)
def session_academy(tmp_path_factory):
    """Runs that name no academy (the CLI's, and those of the processes tests start) record
    into this session's own replay buffer, never into the checkout's ``runs/academy``."""
    patch = pytest.MonkeyPatch()
    patch.setenv(ACADEMY_VARIABLE, str(tmp_path_factory.mktemp("academy")))
    yield
    patch.undo()


def make_blobs(n: int, features: int, classes: int, seed: int) -> TensorDataset:
    """Gaussian blobs around fixed centres (shared by every split): learnable in a few epochs."""
    centers = torch.randn(classes, features, generator=torch.Generator().manual_seed(0)) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, features, generator=g)
    return TensorDataset(x, y)


@pytest.fixture
def tiny_data() -> DataBundle:
    return DataBundle(
        name="blobs",
        train=make_blobs(256, 12, 4, seed=1),
        val=make_blobs(128, 12, 4, seed=2),
        test=make_blobs(128, 12, 4, seed=3),
        input_shape=(12,),
        num_classes=4,
    )


@pytest.fixture
def tiny_config(tmp_path) -> TolariaConfig:
    config = TolariaConfig()
    config.run.epochs = 4
    config.run.device = "cpu"
    config.run.progress = False
    config.run.tensorboard = False
    config.data.batch_size = 32
    config.data.cache_dir = str(tmp_path / "cache")
    config.academy.dir = str(tmp_path / "academy")  # not the checkout's runs/academy
    config.model.kwargs = {"hidden": [16, 16]}
    config.optimizer.lr = 1e-2
    config.checkpoint.every_epochs = 2
    # Not the default job's single seed on the input: blobs are not signals, and these tests
    # drive the lifecycle of many seeds at once (hidden layers, 4 chunks each), with grafts
    # that train at the host's rate so they matter within a few epochs.
    config.kasmina.layers = ["hidden.*"]
    config.kasmina.chunks = 4
    config.optimizer.seed_lr_multiplier = 1.0
    config.tamiyo.blueprints = ["residual_mlp", "low_rank"]
    config.tamiyo.param_budget_fraction = 1.0
    return config
