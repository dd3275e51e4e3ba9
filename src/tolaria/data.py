"""Datasets, reproducible splits and a data order that is a pure function of (seed, epoch).

Three splits, three roles: ``train`` is learned from, ``val`` (carved from the training
split with ``DataConfig.val_fraction``) is the only split Tamiyo's decisions may look at,
and ``test`` is the dataset's own held-out split, reported and never used to decide.

Reproducibility contract:

* the train/val split depends only on ``(seed, dataset)``;
* the order of training batches in epoch ``e`` depends only on ``(seed, e)``
  (``EpochShuffleSampler``), so a run resumed at epoch ``e`` replays exactly the batches
  the original run would have seen, with no RNG state to carry; under ``W`` processes
  (``tolaria.distributed``) rank ``r``'s share is a function of ``(seed, e, r, W)``
  (``ShardedEpochSampler``), and the ranks' batches ``t`` together are the single
  process's batch ``t``;
* building a dataset never disturbs the caller's global ``random``/``numpy``/``torch``
  RNG streams.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    Sampler,
    SequentialSampler,
    Subset,
    TensorDataset,
)

from tolaria.atomic import write_atomic
from tolaria.config import DataConfig
from tolaria.errors import ConfigError, RunMismatch
from tolaria.plugins import check_kwargs, construct, is_reference, resolve_callable
from tolaria.registry import Registry

#: What a built-in dataset's loader returns: ``(train, test, input_shape, num_classes)``;
#: ``load_data`` carves the validation split out of ``train``.
_Loaded = tuple[Dataset, Dataset | None, tuple[int, ...], int]

BUILTIN_DATASETS: Registry[Callable[[DataConfig], _Loaded]] = Registry("dataset", "data.dataset")

# Domain tags keep the split's random stream apart from every epoch's order stream even
# when seed and epoch coincide.
_SPLIT_STREAM = 0x5B117
_ORDER_STREAM = 0x0DE12


@dataclass
class DataBundle:
    """A dataset's three splits and what a host needs to know to fit it."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset | None
    #: Per-sample input shape (no batch dimension).
    input_shape: tuple[int, ...]
    #: Classes; for regression, the number of outputs (the host's output width).
    num_classes: int


@dataclass
class Loaders:
    train: DataLoader
    #: The training loader's sampler: call ``set_epoch(e)`` before iterating epoch ``e``.
    train_sampler: EpochShuffleSampler
    val: DataLoader
    test: DataLoader | None
    #: Samples per training batch of this process: ``data.batch_size`` over the ranks.
    train_batch_size: int


def _permutation(n: int, *entropy: int) -> np.ndarray:
    """A permutation of ``range(n)`` fixed by ``entropy`` alone (no global RNG involved)."""
    words = [e % 2**64 for e in entropy]  # SeedSequence wants non-negative ints
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words))).permutation(n)


class EpochShuffleSampler(Sampler[int]):
    """Shuffled indices whose order in epoch ``e`` is a permutation seeded by ``(seed, e)``.

    Iterating twice in the same epoch yields the same order; the order never depends on
    how many epochs ran before, so resuming is just ``set_epoch(e)``.
    """

    #: Processes sharing each epoch (``ShardedEpochSampler``): one here.
    world_size = 1

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ConfigError(f"cannot shuffle an empty dataset (n={n})")
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(_permutation(self.n, _ORDER_STREAM, self.seed, self.epoch).tolist())

    def __len__(self) -> int:
        return self.n

    def state_dict(self) -> dict[str, int]:
        """JSON-able data-order state for checkpoints: (seed, epoch) is all there is."""
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise ConfigError(
                f"data order was recorded for n={state['n']}, seed={state['seed']} but this "
                f"run has n={self.n}, seed={self.seed}: the dataset or seed changed"
            )
        # Single-process checkpoints have no world size: they were written by one process.
        recorded = state.get("world_size", 1)
        if recorded != self.world_size:  # every older checkpoint too: the search stops here
            raise RunMismatch(
                f"the checkpoint was written by a run of {recorded} process(es), this one has "
                f"{self.world_size}: resume with the same number (tolaria resume --nproc "
                f"{recorded}, or torchrun --nproc-per-node) -- the sums over ranks would round "
                "differently and the run would not be reproduced bit for bit"
            )
        self.epoch = state["epoch"]


class ShardedEpochSampler(EpochShuffleSampler):
    """Rank ``rank``'s share of epoch ``e`` when ``world_size`` processes train on global
    batches of ``batch_size`` samples.

    The epoch's order is the single process's (a permutation seeded by ``(seed, e)``); it is
    cut into global batches and each global batch into ``world_size`` equal consecutive
    slices, of which this rank takes slice ``rank``.  Equal slices make DDP's mean of the
    ranks' gradients the gradient of the whole global batch, so the last global batch is cut
    to a multiple of ``world_size``: at most ``world_size - 1`` samples of an epoch (other
    ones each epoch) are left out.
    """

    def __init__(self, n: int, seed: int, *, batch_size: int, rank: int, world_size: int) -> None:
        super().__init__(n, seed)
        if batch_size % world_size:
            raise ConfigError(
                f"data.batch_size={batch_size} is the global batch, split over {world_size} "
                f"processes: it must be a multiple of {world_size}"
            )
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        #: Samples of an epoch the ranks train on together (all but the trimmed tail).
        self.used = n - (n % batch_size) % world_size
        if self.used < world_size:
            raise ConfigError(
                f"the training split has {n} samples: too few for {world_size} processes"
            )

    def __iter__(self) -> Iterator[int]:
        order = _permutation(self.n, _ORDER_STREAM, self.seed, self.epoch)[: self.used]
        full = self.used - self.used % self.batch_size  # samples in whole global batches
        slices = order[:full].reshape(-1, self.world_size, self.batch_size // self.world_size)
        tail = order[full:].reshape(self.world_size, -1)
        return iter(np.concatenate((slices[:, self.rank].ravel(), tail[self.rank])).tolist())

    def __len__(self) -> int:
        return self.used // self.world_size

    def state_dict(self) -> dict[str, int]:
        return {**super().state_dict(), "world_size": self.world_size}


def load_data(config: DataConfig, seed: int) -> DataBundle:
    """Build the bundle named by ``config.dataset`` with its validation split carved by ``seed``."""
    name = config.dataset
    if is_reference(name):  # user functions take data.kwargs and return their own shapes
        return _load_user(config, seed)
    train, test, input_shape, num_classes = BUILTIN_DATASETS.get(name)(config)
    train, val = split_train_val(train, config.val_fraction, seed)
    return DataBundle(name, train, val, test, tuple(input_shape), num_classes)


def split_train_val(dataset: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out ``round(n * val_fraction)`` samples chosen by ``seed``.

    In-memory tensor datasets are split into new ``TensorDataset``s (contiguous tensors,
    cheap batches); anything else becomes two ``Subset`` views.
    """
    n = len(dataset)  # type: ignore[arg-type]
    n_val = round(n * val_fraction)
    if n_val < 1 or n_val >= n:
        raise ConfigError(
            f"data.val_fraction={val_fraction}: leaves {n - n_val} training and {n_val} "
            f"validation samples out of {n}; both must be at least 1"
        )
    order = _permutation(n, _SPLIT_STREAM, seed)
    # Sorted, so each split is a set determined by the seed and keeps the source's order.
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    if isinstance(dataset, TensorDataset):
        train_t, val_t = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
        return (
            TensorDataset(*(t[train_t] for t in dataset.tensors)),
            TensorDataset(*(t[val_t] for t in dataset.tensors)),
        )
    return Subset(dataset, train_idx.tolist()), Subset(dataset, val_idx.tolist())


def make_loaders(
    bundle: DataBundle,
    config: DataConfig,
    seed: int,
    *,
    pin_memory: bool = False,
    shard: tuple[int, int] | None = None,
) -> Loaders:
    """Loaders for the bundle; only training is shuffled, and only by ``EpochShuffleSampler``.

    ``pin_memory`` (page-locked batches) only pays off when batches are copied to a CUDA
    device: the trainer asks for it on CUDA runs only.  ``shard=(rank, world_size)`` gives
    one process of a multi-process run its share: of every training batch
    (``ShardedEpochSampler``) and a contiguous part of the validation split (its sums are
    added over the ranks); the test split, measured once for the summary, goes to rank 0.
    """
    n, batch_size = len(bundle.train), config.batch_size  # type: ignore[arg-type]
    val, test = bundle.val, bundle.test
    if shard is None:
        sampler = EpochShuffleSampler(n, seed)
    else:
        rank, world_size = shard
        sampler = ShardedEpochSampler(n, seed, batch_size=batch_size, rank=rank,
                                      world_size=world_size)
        batch_size //= world_size
        val, test = _contiguous_part(val, rank, world_size), test if rank == 0 else None

    def in_order(dataset: Dataset) -> DataLoader:
        order = SequentialSampler(dataset)  # type: ignore[arg-type]
        return _loader(dataset, order, config, seed, pin_memory, batch_size)

    return Loaders(
        train=_loader(bundle.train, sampler, config, seed, pin_memory, batch_size),
        train_sampler=sampler,
        val=in_order(val),
        test=None if test is None else in_order(test),
        train_batch_size=batch_size,
    )


def _contiguous_part(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Part ``rank`` of ``world_size`` nearly equal contiguous parts of ``dataset``."""
    n = len(dataset)  # type: ignore[arg-type]
    if n < world_size:
        raise ConfigError(
            f"the validation split has {n} samples: too few for {world_size} processes "
            "(raise data.val_fraction)"
        )
    part = np.array_split(np.arange(n), world_size)[rank]
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[part[0] : part[-1] + 1] for t in dataset.tensors))
    return Subset(dataset, part.tolist())


def _loader(
    dataset: Dataset,
    sampler: Sampler[int],
    config: DataConfig,
    seed: int,
    pin_memory: bool,
    batch_size: int,
) -> DataLoader:
    common: dict[str, Any] = {
        "num_workers": config.num_workers,
        # Worker seeds come from the loader's own generator, never the global torch RNG:
        # otherwise starting workers would shift every later random draw, and a resumed
        # run (which starts them at another epoch) would diverge from the original.
        "generator": torch.Generator().manual_seed(seed),
        "pin_memory": pin_memory,
        "persistent_workers": config.num_workers > 0,
    }
    if isinstance(dataset, TensorDataset):
        # In-memory tensors: one advanced index per tensor fetches a whole batch, instead of
        # batch_size __getitem__ calls and a collate (about a third of a small model's epoch).
        batches = BatchSampler(sampler, batch_size, drop_last=False)
        return DataLoader(dataset, sampler=batches, batch_size=None, **common)
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, **common)


# --- built-in datasets ------------------------------------------------------------------


@contextmanager
def _preserved_global_rng() -> Iterator[None]:
    """Restore Python's and NumPy's global RNGs afterwards (mnist1d reseeds both)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _mnist1d_args(config: DataConfig) -> dict[str, Any]:
    return _with_options(_mnist1d_defaults(config), config, "mnist1d generator")


def _mnist1d_defaults(config: DataConfig) -> dict[str, Any]:
    """The generator's default arguments, remembered in ``data.cache_dir`` per mnist1d
    version: importing mnist1d (it pulls in matplotlib and scipy) takes about a second, and
    a run whose arrays are cached needs only these arguments, to find them."""
    from importlib.metadata import version

    memo = Path(config.cache_dir).expanduser() / f"mnist1d-{version('mnist1d')}-defaults.json"
    with suppress(OSError, ValueError):  # not remembered yet, or unreadable
        remembered = json.loads(memo.read_bytes())
        if isinstance(remembered, dict):
            return remembered
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    del args["url"]  # only the download path uses it; we never download
    with suppress(OSError):  # only a shortcut: a cache_dir we cannot write is fine
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo, json.dumps(args, sort_keys=True), durable=False)
    return args


def _with_options(defaults: dict[str, Any], config: DataConfig, what: str) -> dict[str, Any]:
    """``defaults`` updated by ``data.kwargs``; a key it does not know is a ``ConfigError``."""
    unknown = sorted(set(config.kwargs) - set(defaults))
    if unknown:
        raise ConfigError(
            f"data.kwargs: unknown {what} argument(s) {', '.join(map(repr, unknown))} "
            f"(accepted: {', '.join(sorted(defaults))})"
        )
    return {**defaults, **config.kwargs}


def _mnist1d_cache_path(config: DataConfig, args: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    return Path(config.cache_dir).expanduser() / f"mnist1d-{key}.npz"


def generate_mnist1d(args: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run the mnist1d package's local generator (never its download path)."""
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    with _preserved_global_rng():
        data = make_dataset(ObjectView(dict(args)))
    return {
        "x": data["x"].astype(np.float32),
        "y": data["y"].astype(np.int64),
        "x_test": data["x_test"].astype(np.float32),
        "y_test": data["y_test"].astype(np.int64),
    }


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in ("x", "y", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        # Missing or unreadable (e.g. a foreign file): regenerate rather than fail.
        return None


def _write_cache_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Temp file in the same directory + ``os.replace``: readers never see a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mnist1d(config: DataConfig) -> _Loaded:
    args = _mnist1d_args(config)
    path = _mnist1d_cache_path(config, args)
    arrays = _read_cache(path)
    if arrays is None:
        arrays = generate_mnist1d(args)
        try:
            _write_cache_atomically(path, arrays)
        except OSError as exc:
            raise ConfigError(
                f"data.cache_dir={config.cache_dir!r}: cannot write the MNIST-1D cache "
                f"({exc.strerror or exc})"
            ) from None
    return (
        TensorDataset(torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])),
        TensorDataset(torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"])),
        (arrays["x"].shape[1],),
        10,
    )


def _digits(config: DataConfig) -> _Loaded:
    """scikit-learn's bundled 8x8 digits; a fixed 80/20 train/test split.

    The test split is the dataset's own, so it is fixed (``split_seed``, default 0) and
    does not move with the run seed: test numbers stay comparable across seeds.
    """
    from sklearn.datasets import load_digits

    options = _with_options({"test_fraction": 0.2, "split_seed": 0}, config, "digits")
    if not 0.0 < options["test_fraction"] < 1.0:
        raise ConfigError(
            f"data.kwargs.test_fraction={options['test_fraction']}: must be in (0, 1)"
        )
    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    train, test = split_train_val(
        TensorDataset(x, y), options["test_fraction"], options["split_seed"]
    )
    return train, test, (1, 8, 8), 10


def _cifar10(config: DataConfig) -> _Loaded:
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise ConfigError(
            "data.dataset='cifar10' needs torchvision: pip install torchvision "
            "(the first run also needs internet to download CIFAR-10 into data.cache_dir)"
        ) from None
    root = Path(config.cache_dir).expanduser() / "cifar10"
    transform = transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    ])
    if config.kwargs:
        raise ConfigError(f"data.kwargs: cifar10 takes no arguments, got {sorted(config.kwargs)}")
    try:
        train = datasets.CIFAR10(root, train=True, download=True, transform=transform)
        test = datasets.CIFAR10(root, train=False, download=True, transform=transform)
    except (OSError, RuntimeError) as exc:
        raise ConfigError(
            f"data.dataset='cifar10': cannot load or download CIFAR-10 into {root} ({exc}); "
            "the first run needs internet"
        ) from None
    return train, test, (3, 32, 32), 10


def _friedman1(config: DataConfig) -> _Loaded:
    """Friedman #1, a regression problem scikit-learn generates locally (``task.kind:
    regression``): ``n_features`` inputs uniform on [0, 1], of which the first five matter,
    ``y = 10 sin(pi x1 x2) + 20 (x3 - 1/2)^2 + 10 x4 + 5 x5 + noise * N(0, 1)``.

    Inputs and target are standardised with the training split's statistics, so the chance
    level (predicting the mean) has a loss of 1 and the noise floor of the MSE is
    ``noise^2 / var(y)`` (about 0.04 at the default noise).  ``seed`` fixes the data, not
    the run: test numbers stay comparable across run seeds.
    """
    from sklearn.datasets import make_friedman1

    defaults = {"n_train": 2000, "n_test": 1000, "n_features": 10, "noise": 1.0, "seed": 0}
    options = _with_options(defaults, config, "friedman1")
    for key, least in (("n_train", 2), ("n_test", 1), ("n_features", 5)):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"data.kwargs.{key}={value!r}: must be an int >= {least}")
    n_train = options["n_train"]
    x, y = make_friedman1(
        n_samples=n_train + options["n_test"], n_features=options["n_features"],
        noise=options["noise"], random_state=options["seed"],
    )
    x = torch.from_numpy(x.astype(np.float32))
    y = torch.from_numpy(y.astype(np.float32)).unsqueeze(1)  # one target: (n, 1)
    x = (x - x[:n_train].mean(0)) / x[:n_train].std(0)
    y = (y - y[:n_train].mean(0)) / y[:n_train].std(0)
    train = TensorDataset(x[:n_train], y[:n_train])
    return train, TensorDataset(x[n_train:], y[n_train:]), (options["n_features"],), 1


BUILTIN_DATASETS.register("mnist1d", _mnist1d)
BUILTIN_DATASETS.register("digits", _digits)
BUILTIN_DATASETS.register("cifar10", _cifar10)
BUILTIN_DATASETS.register("friedman1", _friedman1)


# --- user datasets ----------------------------------------------------------------------


def _load_user(config: DataConfig, seed: int) -> DataBundle:
    """``module:function(**kwargs)`` -> a ``DataBundle`` or ``(train, test, num_classes)``."""
    field = f"data.dataset={config.dataset!r}"
    function = resolve_callable(config.dataset, "data.dataset")
    check_kwargs(function, config.kwargs, "data.kwargs")
    result = construct(function, field, **config.kwargs)
    if isinstance(result, DataBundle):
        return result
    if not (isinstance(result, tuple) and len(result) == 3):
        raise ConfigError(
            f"{field}: must return a DataBundle or a tuple (train_dataset, test_dataset, "
            f"num_classes), got {type(result).__name__}"
        )
    train, test, num_classes = result
    for split, dataset in (("train", train), ("test", test)):
        if dataset is None and split == "test":
            continue
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise ConfigError(
                f"{field}: the {split} dataset must support len() and indexing, "
                f"got {type(dataset).__name__}"
            )
    # For regression it is the number of outputs: classification's ">= 2" is the task's check.
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"{field}: num_classes must be an int >= 1, got {num_classes!r}")
    if len(train) == 0:
        raise ConfigError(f"{field}: the training dataset is empty")
    input_shape = _sample_shape(train[0], field)
    train, val = split_train_val(train, config.val_fraction, seed)
    return DataBundle(config.dataset, train, val, test, input_shape, num_classes)


def _sample_shape(sample: Any, field: str) -> tuple[int, ...]:
    if not (isinstance(sample, tuple | list) and len(sample) >= 2):
        raise ConfigError(f"{field}: a sample must be an (input, label) pair, got {sample!r:.80}")
    try:
        return tuple(torch.as_tensor(sample[0]).shape)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(
            f"{field}: a sample's input is not tensor-like ({type(sample[0]).__name__})"
        ) from None
