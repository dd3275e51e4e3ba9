"""User code that fails, named as ``module:function`` by test_cli_hardening.py."""

from __future__ import annotations


def raising_dataset():
    raise ValueError("boom")


def raising_host(input_shape, num_classes):
    raise RuntimeError("no such layer")
