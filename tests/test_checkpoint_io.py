"""The durable file format: lossless codec, verified reads, no code execution on load."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from drills import PlantedPickle, flip_byte, truncate
from tolaria.checkpoint_io import (
    MANIFEST_FILE,
    STATE_FILE,
    TENSORS_FILE,
    join_tensors,
    read_checkpoint_dir,
    split_tensors,
    write_checkpoint_dir,
)
from tolaria.errors import CheckpointError


def _nested_state():
    return {
        "state": {"fc.weight": {"step": torch.tensor(7.0), "exp_avg": torch.randn(3, 4)}},
        "groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": ["fc.weight"]}],
        "by_int": {0: "zero", 5: (1, 2)},
        "has_tag_key": {"__tolaria__": "user data"},
        "rng": np.arange(5, dtype=np.uint32),
        "np_scalar": np.float64(2.5),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "nan": math.nan,
        "none": None,
        "flag": True,
    }


def _assert_same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_codec_round_trips_types_through_json():
    tree = _nested_state()
    document, tensors = split_tensors(tree, "opt")
    assert all(key.startswith("opt/") for key in tensors)
    decoded = join_tensors(json.loads(json.dumps(document)), tensors)
    tree["np_scalar"] = 2.5  # NumPy scalars become the equal Python number
    _assert_same(tree, decoded)


def test_codec_keeps_colliding_paths_apart():
    tree = {"a/b": torch.zeros(1), "a": {"b": torch.ones(1)}}
    document, tensors = split_tensors(tree, "x")
    assert len(tensors) == 2
    _assert_same(tree, join_tensors(document, tensors))


def test_codec_rejects_unsupported_values_naming_where():
    with pytest.raises(CheckpointError, match=r"x/cfg/fn.*function"):
        split_tensors({"cfg": {"fn": lambda: 0}}, "x")


def _write(tmp_path: Path, name="ckpt") -> Path:
    document, tensors = split_tensors(_nested_state(), "s")
    return write_checkpoint_dir(tmp_path / name, tensors, {"s": document})


def test_write_then_read_round_trip_leaves_no_temporaries(tmp_path):
    tree = _nested_state()
    document, tensors = split_tensors(tree, "s")
    path = write_checkpoint_dir(tmp_path / "ckpt", tensors, {"s": document})
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [TENSORS_FILE, STATE_FILE, MANIFEST_FILE]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    loaded_tensors, state = read_checkpoint_dir(path)
    tree["np_scalar"] = 2.5
    _assert_same(tree, join_tensors(state["s"], loaded_tensors))


def test_write_refuses_to_overwrite(tmp_path):
    path = _write(tmp_path)
    before = (path / TENSORS_FILE).read_bytes()
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        write_checkpoint_dir(path, {"t": torch.zeros(1)}, {})
    assert (path / TENSORS_FILE).read_bytes() == before


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: flip_byte(p / TENSORS_FILE), "SHA-256"),
        (lambda p: flip_byte(p / STATE_FILE), "SHA-256"),
        (lambda p: truncate(p / TENSORS_FILE), "truncated"),
        (lambda p: (p / STATE_FILE).unlink(), "missing"),
        (lambda p: truncate(p / MANIFEST_FILE), "not valid JSON"),
        (lambda p: (p / MANIFEST_FILE).write_text('{"format": "other"}'), "not a Tolaria"),
        (lambda p: _edit_manifest(p, lambda m: m["files"].update({STATE_FILE: "x"})),
         "malformed entry"),
        (lambda p: _edit_manifest(p, lambda m: m["files"].pop(STATE_FILE)), "malformed file list"),
    ],
)
def test_damaged_checkpoints_are_detected(tmp_path, damage, message):
    path = _write(tmp_path)
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint_dir(path)


def test_newer_format_version_is_refused(tmp_path):
    path = _write(tmp_path)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["version"] = 99
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="version 99"):
        read_checkpoint_dir(path)


def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    edit(manifest)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("target", [TENSORS_FILE, STATE_FILE, MANIFEST_FILE])
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_planted_pickle_is_refused_without_running_it(tmp_path, target, writer):
    path = _write(tmp_path)
    marker = tmp_path / "pwned"
    payload = {"model": PlantedPickle(marker), "weights": torch.zeros(3)}
    if writer == "pickle":
        (path / target).write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path / target)
    if target != MANIFEST_FILE:  # a careful attacker also fixes the checksums
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        data = (path / target).read_bytes()
        manifest["files"][target] = {
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)
        }
        (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"not (a )?valid"):
        read_checkpoint_dir(path)
    assert not marker.exists()
    pickle.loads(pickle.dumps(PlantedPickle(marker)))  # the payload is live: loading it would fire
    assert marker.exists()


def test_every_supported_dtype_and_layout_round_trips_through_the_writer(tmp_path):
    from tolaria.checkpoint_io import _SAFETENSORS_DTYPES

    generator = torch.Generator().manual_seed(0)
    tensors = {
        str(dtype): (torch.randn(3, 5, generator=generator) * 50).to(dtype)
        for dtype in _SAFETENSORS_DTYPES
    }
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["transposed"] = torch.arange(12.0).reshape(3, 4).t()  # not contiguous
    path = write_checkpoint_dir(tmp_path / "ckpt", tensors, {})
    loaded, _ = read_checkpoint_dir(path)
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        as_bytes = [t.contiguous().reshape(-1).view(torch.uint8) for t in (loaded[name], tensor)]
        assert torch.equal(*as_bytes), name  # bit for bit, NaN payloads included


def test_unsupported_dtype_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(CheckpointError, match="complex64"):
        write_checkpoint_dir(tmp_path / "ckpt", {"z": torch.zeros(2, dtype=torch.complex64)}, {})
    assert list(tmp_path.iterdir()) == []
