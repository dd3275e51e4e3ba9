"""Datasets, splits and data order: reproducible, cached, and quiet on the global RNGs."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from tolaria import data as data_module
from tolaria.config import DataConfig
from tolaria.data import (
    DataBundle,
    EpochShuffleSampler,
    load_data,
    make_loaders,
    split_train_val,
)
from tolaria.errors import ConfigError

MNIST_SAMPLES = 500


@pytest.fixture
def mnist_config(tmp_path) -> DataConfig:
    return DataConfig(cache_dir=str(tmp_path / "cache"), kwargs={"num_samples": MNIST_SAMPLES})


@pytest.fixture
def mnist(mnist_config) -> DataBundle:
    return load_data(mnist_config, seed=0)


# --- MNIST-1D -----------------------------------------------------------------------------


def test_mnist1d_shapes_classes_and_dtypes(mnist):
    assert mnist.name == "mnist1d"
    assert mnist.input_shape == (40,)
    assert mnist.num_classes == 10
    # mnist1d's own 80/20 split, then 20 % of train held out for validation.
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (320, 80, 100)
    for split in (mnist.train, mnist.val, mnist.test):
        x, y = split.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (40,)
        assert y.dtype == torch.int64
        assert int(y.min()) >= 0 and int(y.max()) <= 9
    assert set(mnist.train.tensors[1].tolist()) == set(range(10))


def test_mnist1d_second_load_hits_the_cache(mnist_config, mnist, monkeypatch):
    cache_dir = _cache_dir(mnist_config)
    cache_files = sorted(p.name for p in cache_dir.iterdir())
    # The arrays, and the generator's defaults remembered beside them.
    assert [name.rsplit(".", 1)[-1] for name in cache_files] == ["json", "npz"]

    def must_not_generate(args):
        raise AssertionError("regenerated although the cache holds these arrays")

    monkeypatch.setattr(data_module, "generate_mnist1d", must_not_generate)
    again = load_data(mnist_config, seed=0)
    assert torch.equal(again.train.tensors[0], mnist.train.tensors[0])
    assert torch.equal(again.test.tensors[1], mnist.test.tensors[1])
    # Atomic write leaves no temp file behind.
    assert sorted(p.name for p in cache_dir.iterdir()) == cache_files


def _cache_dir(config: DataConfig) -> Path:
    return Path(config.cache_dir).expanduser()


def test_mnist1d_cache_is_keyed_by_generator_args(mnist_config, mnist):
    other = mnist_config.model_copy(update={"kwargs": {"num_samples": 300}})
    bundle = load_data(other, seed=0)
    assert len(bundle.train) + len(bundle.val) == 240
    assert len(list(_cache_dir(mnist_config).glob("*.npz"))) == 2


def test_corrupt_cache_is_regenerated(mnist_config, mnist):
    (path,) = _cache_dir(mnist_config).glob("*.npz")
    path.write_bytes(b"not an npz archive")
    again = load_data(mnist_config, seed=0)
    assert torch.equal(again.val.tensors[0], mnist.val.tensors[0])


def test_generation_leaves_global_rngs_untouched(tmp_path):
    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    load_data(DataConfig(cache_dir=str(tmp_path), kwargs={"num_samples": 200}), seed=3)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and after[2:] == np_state[2:]
    assert np.array_equal(after[1], np_state[1])
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_unknown_mnist1d_argument(tmp_path):
    with pytest.raises(ConfigError, match="num_sample"):
        load_data(DataConfig(cache_dir=str(tmp_path), kwargs={"num_sample": 10}), seed=0)


# --- splits ---------------------------------------------------------------------------------


def test_split_is_a_seeded_partition():
    dataset = TensorDataset(torch.arange(100))
    train, val = split_train_val(dataset, 0.25, seed=7)
    train_ids, val_ids = set(train.tensors[0].tolist()), set(val.tensors[0].tolist())
    assert len(val_ids) == 25 and len(train_ids) == 75
    assert train_ids | val_ids == set(range(100))
    _, again_val = split_train_val(dataset, 0.25, seed=7)
    assert torch.equal(again_val.tensors[0], val.tensors[0])
    _, other_val = split_train_val(dataset, 0.25, seed=8)
    assert set(other_val.tensors[0].tolist()) != val_ids


def test_split_of_a_generic_dataset_uses_subsets():
    dataset = list(range(30))  # indexable and sized, but not a TensorDataset
    train, val = split_train_val(dataset, 0.5, seed=0)
    assert sorted(list(train) + list(val)) == dataset


def test_split_that_leaves_a_side_empty_is_an_error():
    with pytest.raises(ConfigError, match="val_fraction"):
        split_train_val(TensorDataset(torch.arange(3)), 0.1, seed=0)


def test_load_data_split_depends_on_seed(mnist_config, mnist):
    same = load_data(mnist_config, seed=0)
    other = load_data(mnist_config, seed=1)
    assert torch.equal(same.val.tensors[0], mnist.val.tensors[0])
    assert not torch.equal(other.val.tensors[0], mnist.val.tensors[0])
    # The test split is the dataset's own: never moved by the run seed.
    assert torch.equal(other.test.tensors[0], mnist.test.tensors[0])


# --- data order ------------------------------------------------------------------------------


def _order(sampler: EpochShuffleSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_order_is_a_pure_function_of_seed_and_epoch():
    walked = EpochShuffleSampler(64, seed=5)
    history = [_order(walked, e) for e in range(4)]
    jumped = EpochShuffleSampler(64, seed=5)
    assert _order(jumped, 3) == history[3]  # no dependence on the epochs before
    assert _order(jumped, 3) == history[3]  # nor on iterating twice
    assert all(sorted(order) == list(range(64)) for order in history)
    assert len({tuple(order) for order in history}) == 4
    assert _order(EpochShuffleSampler(64, seed=6), 3) != history[3]


def test_sampler_state_round_trip_and_mismatch():
    sampler = EpochShuffleSampler(10, seed=2)
    sampler.set_epoch(4)
    resumed = EpochShuffleSampler(10, seed=2)
    resumed.load_state_dict(sampler.state_dict())
    assert list(resumed) == list(sampler)
    with pytest.raises(ConfigError, match="seed"):
        EpochShuffleSampler(10, seed=3).load_state_dict(sampler.state_dict())


def test_loaders_follow_the_sampler_and_keep_val_in_order(mnist, mnist_config):
    loaders = make_loaders(mnist, mnist_config, seed=9)
    loaders.train_sampler.set_epoch(2)
    labels = torch.cat([y for _, y in loaders.train])
    expected = mnist.train.tensors[1][torch.tensor(list(loaders.train_sampler))]
    assert torch.equal(labels, expected)
    first_x, _ = next(iter(loaders.train))
    assert first_x.shape == (mnist_config.batch_size, 40)
    assert torch.equal(torch.cat([y for _, y in loaders.val]), mnist.val.tensors[1])
    assert loaders.test is not None
    no_test = DataBundle("x", mnist.train, mnist.val, None, (40,), 10)
    assert make_loaders(no_test, mnist_config, seed=9).test is None


# --- digits, cifar10 ------------------------------------------------------------------------


def test_digits_shapes_range_and_fixed_test_split():
    bundle = load_data(DataConfig(dataset="digits"), seed=0)
    assert bundle.input_shape == (1, 8, 8) and bundle.num_classes == 10
    x, _ = bundle.train.tensors
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 1797
    assert len(bundle.test) == round(1797 * 0.2)
    other = load_data(DataConfig(dataset="digits"), seed=1)
    assert torch.equal(other.test.tensors[0], bundle.test.tensors[0])
    assert not torch.equal(other.val.tensors[0], bundle.val.tensors[0])


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision here")
def test_cifar10_without_torchvision_says_how_to_install(tmp_path):
    with pytest.raises(ConfigError, match="pip install torchvision"):
        load_data(DataConfig(dataset="cifar10", cache_dir=str(tmp_path)), seed=0)


# --- user datasets and errors ---------------------------------------------------------------


def test_user_dataset_tuple_gets_a_validation_split_and_input_shape():
    config = DataConfig(dataset="plugins_for_data_tests:tiny_dataset", kwargs={"features": 5})
    bundle = load_data(config, seed=0)
    assert bundle.input_shape == (5,) and bundle.num_classes == 3
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (40, 10, 10)


def test_user_dataset_bundle_is_used_as_is():
    bundle = load_data(DataConfig(dataset="plugins_for_data_tests:tiny_bundle"), seed=0)
    assert bundle.name == "tiny" and bundle.test is None and len(bundle.val) == 10


@pytest.mark.parametrize(
    ("dataset", "kwargs", "message"),
    [
        ("imagenet", {}, "built-in: mnist1d, digits, cifar10"),
        ("no_such_module_xyz:make", {}, "no_such_module_xyz"),
        ("plugins_for_data_tests:missing", {}, "no attribute 'missing'"),
        ("plugins_for_data_tests:not_a_dataset", {}, "must return a DataBundle"),
        ("plugins_for_data_tests:tiny_dataset", {"colour": 1}, "'colour'"),
    ],
)
def test_bad_dataset_references_are_config_errors(dataset, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        load_data(DataConfig(dataset=dataset, kwargs=kwargs), seed=0)


def test_loader_workers_never_draw_from_the_global_rng(tmp_path):
    """Starting worker processes must not move torch's global RNG (resume exactness)."""
    from tolaria.config import DataConfig
    from tolaria.data import DataBundle, make_loaders

    data = torch.utils.data.TensorDataset(torch.randn(64, 3), torch.arange(64) % 2)
    bundle = DataBundle("t", data, data, None, (3,), 2)
    config = DataConfig(batch_size=16, num_workers=1, cache_dir=str(tmp_path))
    loaders = make_loaders(bundle, config, seed=0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for _ in loaders.train:
        pass
    assert torch.equal(torch.get_rng_state(), before)
