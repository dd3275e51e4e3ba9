"""User-code fixtures referenced as ``module:function`` by test_data.py and test_hosts.py.

pytest puts ``tests/`` on ``sys.path``, so ``plugins_for_data_tests:...`` imports this file
the way a user's own module would be imported.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from tolaria.data import DataBundle


def tiny_dataset(n: int = 50, features: int = 6, classes: int = 3):
    """``(train, test, num_classes)``: labels are the row index mod ``classes``."""
    x = torch.arange(n * features, dtype=torch.float32).reshape(n, features)
    y = torch.arange(n) % classes
    test = TensorDataset(x[:10].clone(), y[:10].clone())
    return TensorDataset(x, y), test, classes


def tiny_bundle():
    train, test, classes = tiny_dataset()
    return DataBundle("tiny", train, test, None, (6,), classes)


def not_a_dataset():
    return [1, 2, 3]


def tiny_host(input_shape, num_classes, width: int = 4):
    return nn.Sequential(
        nn.Flatten(), nn.Linear(input_shape[-1], width), nn.Linear(width, num_classes)
    )


def not_a_module(input_shape, num_classes):
    return "a string"
