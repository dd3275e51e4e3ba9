"""A dataset named in configs by test_best_model.py (``plugins_for_best_model:blobs``), so
that `tolaria evaluate` can load a run's data from its config.yaml."""

from __future__ import annotations

from conftest import make_blobs


def blobs():
    """``(train, test, num_classes)``: conftest's blobs, a run that learns in seconds."""
    return make_blobs(160, 12, 4, seed=1), make_blobs(64, 12, 4, seed=3), 4
