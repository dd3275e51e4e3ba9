"""The durable store, the in-memory ring and RNG capture, without the live components."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from drills import tree_bytes
from tolaria.checkpoint import (
    CheckpointStore,
    Snapshot,
    SnapshotRing,
    capture_rng_state,
    restore_rng_state,
)
from tolaria.errors import CheckpointError


def make_snapshot(epoch: int, size: int = 16) -> Snapshot:
    """A snapshot whose every tensor is derived from ``epoch``, so loads can be checked."""
    generator = torch.Generator().manual_seed(epoch)
    return Snapshot(
        epoch=epoch,
        global_step=10 * epoch,
        components={
            "model": {
                "structure": {"seeds": {"hidden.0.0": {"state": "training", "alpha": 0.25}}},
                "weights": {
                    "0.weight": torch.randn(size, 4, generator=generator),
                    "0.bias": torch.randn(size, generator=generator),
                },
            },
            "optimizer": {
                "state": {"0.weight": {"step": torch.tensor(float(epoch)),
                                       "exp_avg": torch.randn(size, 4, generator=generator)}},
                "groups": [{"role": "host", "betas": (0.9, 0.999)}],
            },
            "tamiyo": {"incidents": [{"epoch": epoch, "kind": "divergence"}]},
            "rng": seeded_rng_state(epoch),
            "trainer": {"current_epoch": epoch + 1, "best_val_accuracy": 0.5},
        },
    )


def seeded_rng_state(seed: int) -> dict:
    """The RNG state after seeding every generator with ``seed`` (same in every process)."""
    saved = capture_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    state = capture_rng_state()
    restore_rng_state(saved)
    return state


def assert_snapshots_equal(a: Snapshot, b: Snapshot) -> None:
    assert (a.epoch, a.global_step) == (b.epoch, b.global_step)
    for name in ("tamiyo", "trainer"):
        assert a[name] == b[name]
    assert a["model"]["structure"] == b["model"]["structure"]
    assert list(a["model"]["weights"]) == list(b["model"]["weights"])
    for name in a["model"]["weights"]:
        assert a["model"]["weights"][name].dtype == b["model"]["weights"][name].dtype
        assert torch.equal(a["model"]["weights"][name], b["model"]["weights"][name])
    state_a, state_b = a["optimizer"]["state"]["0.weight"], b["optimizer"]["state"]["0.weight"]
    assert all(torch.equal(state_a[k], state_b[k]) for k in ("step", "exp_avg"))
    assert a["optimizer"]["groups"] == b["optimizer"]["groups"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["rng"]["python"] == b["rng"]["python"]


# ------------------------------------------------------------------ durable store


def test_save_and_load_latest_round_trip_exactly(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep=2)
    snapshot = make_snapshot(3)
    path = store.save(snapshot)
    assert store.checkpoints() == [path]
    assert_snapshots_equal(snapshot, store.load_latest())


def test_keep_prunes_oldest_and_sequence_orders_repeated_epochs(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for epoch in (0, 1, 2, 1):  # the last one: the same epoch again after a rollback
        store.save(make_snapshot(epoch))
    names = [p.name for p in store.checkpoints()]
    assert names == ["ckpt-000002-epoch-2", "ckpt-000003-epoch-1"]
    assert store.load_latest().epoch == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no leftovers


def test_corrupt_newest_falls_back_to_previous_and_reports_it(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    store.save(make_snapshot(0))
    store.save(make_snapshot(1))
    newest = store.save(make_snapshot(2))
    tensors = newest / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])
    skipped = []
    loaded = store.load_latest(on_skip=lambda path, reason: skipped.append((path, reason)))
    assert_snapshots_equal(make_snapshot(1), loaded)
    assert len(skipped) == 1
    assert skipped[0][0] == newest
    assert "tensors.safetensors" in skipped[0][1] and "\n" not in skipped[0][1]


def test_no_valid_checkpoint_raises_and_changes_nothing(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    for epoch in (0, 1):
        path = store.save(make_snapshot(epoch))
        (path / "state.json").write_text("{}")
    before = tree_bytes(tmp_path)
    skipped = []
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints"):
        store.load_latest(on_skip=lambda path, reason: skipped.append(path))
    assert len(skipped) == 2
    assert tree_bytes(tmp_path) == before


def test_empty_store_says_there_is_nothing(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints in"):
        CheckpointStore(tmp_path / "missing", keep=1).load_latest()
    assert not (tmp_path / "missing").exists()


def test_failed_save_keeps_existing_checkpoints(tmp_path):
    store = CheckpointStore(tmp_path, keep=1)
    store.save(make_snapshot(0))
    before = tree_bytes(tmp_path)
    bad = make_snapshot(1)
    bad["trainer"]["callback"] = print
    with pytest.raises(CheckpointError, match="trainer/callback"):
        store.save(bad)
    assert tree_bytes(tmp_path) == before


# ------------------------------------------------------------------ kill -9 while saving

_WRITER = """
import os, sys, time
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from test_checkpoint_store import make_snapshot
from tolaria.checkpoint import CheckpointStore

directory, mode = Path(sys.argv[1]), sys.argv[2]
store = CheckpointStore(directory, keep=2)
if mode == "pause":
    store.save(make_snapshot(0))
    store.save(make_snapshot(1))
    def paused_replace(src, dst):  # stop between the temp write and the commit rename
        (directory.parent / "paused").touch()
        time.sleep(60)
    os.replace = paused_replace
    store.save(make_snapshot(2))
else:
    existing = store.checkpoints()
    epoch = int(existing[-1].name.rsplit("-", 1)[1]) + 1 if existing else 0
    while True:
        store.save(make_snapshot(epoch, size=200_000))
        print(epoch, flush=True)
        epoch += 1
"""


def _spawn_writer(directory: Path, mode: str) -> subprocess.Popen:
    script = _WRITER.format(tests=str(Path(__file__).parent))
    return subprocess.Popen(
        [sys.executable, "-c", script, str(directory), mode],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
    )


def test_kill_between_temp_write_and_rename_keeps_previous_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    writer = _spawn_writer(directory, "pause")
    deadline = time.monotonic() + 60
    while not (tmp_path / "paused").exists():
        assert writer.poll() is None, "writer exited before reaching the rename"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert any(p.name.startswith(".tmp-") for p in directory.iterdir())  # torn write exists
    store = CheckpointStore(directory, keep=2)
    assert_snapshots_equal(make_snapshot(1), store.load_latest())
    store.save(make_snapshot(2))  # the next save clears the leftover
    assert not any(p.name.startswith(".") for p in directory.iterdir())
    assert_snapshots_equal(make_snapshot(2), store.load_latest())


def test_kill_at_random_moments_never_loses_a_completed_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints"
    chance = random.Random(1234)
    for _ in range(4):
        writer = _spawn_writer(directory, "random")
        completed = int(writer.stdout.readline())  # at least one save returned
        time.sleep(chance.uniform(0.0, 0.3))
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        completed = max([completed, *map(int, writer.stdout.read().split())])
        loaded = CheckpointStore(directory, keep=2).load_latest()
        assert completed <= loaded.epoch <= completed + 1  # a save that returned is durable
        assert_snapshots_equal(make_snapshot(loaded.epoch, size=200_000), loaded)


# ------------------------------------------------------------------ in-memory ring


def test_ring_keeps_last_k_and_finds_newest_before():
    ring = SnapshotRing(3)
    for epoch in range(-1, 5):
        ring.push(make_snapshot(epoch))
    assert len(ring) == 3
    assert ring.newest_before(5).epoch == 4
    assert ring.newest_before(4).epoch == 3
    assert ring.newest_before(2) is None  # epoch 1 and older were evicted


def test_ring_drops_the_abandoned_timeline_after_a_rollback():
    ring = SnapshotRing(5)
    for epoch in range(4):
        ring.push(make_snapshot(epoch))
    ring.push(make_snapshot(2))  # rolled back to 1, then epoch 2 ran again
    assert len(ring) == 3
    assert ring.newest_before(10).epoch == 2
    assert ring.newest_before(10).global_step == 20


def test_ring_capacity_must_be_positive():
    with pytest.raises(CheckpointError, match="capacity"):
        SnapshotRing(0)


# ------------------------------------------------------------------ RNG


def _draws():
    return (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())


@pytest.mark.parametrize("through_disk", [False, True])
def test_rng_state_restores_every_generator(tmp_path, through_disk):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()
    snapshot = make_snapshot(0)
    snapshot.components["rng"] = capture_rng_state()
    expected = _draws()
    if through_disk:
        store = CheckpointStore(tmp_path, keep=1)
        store.save(snapshot)
        snapshot = store.load_latest()
    _draws()  # move every generator on
    restore_rng_state(snapshot["rng"])
    assert _draws() == expected


def test_ring_hands_out_only_the_oldest_of_a_full_ring():
    single = SnapshotRing(1)
    single.push(make_snapshot(0))
    assert single.recyclable() is None  # never the only rollback target
    ring = SnapshotRing(2)
    ring.push(make_snapshot(0))
    assert ring.recyclable() is None  # not full: nothing would be evicted
    ring.push(make_snapshot(1))
    assert ring.recyclable().epoch == 0
    assert len(ring) == 1 and ring.newest_before(2).epoch == 1


def test_a_full_disk_fails_the_save_cleanly_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch
):
    import errno

    import tolaria.checkpoint_io

    store = CheckpointStore(tmp_path, keep=1)
    store.save(make_snapshot(0))
    before = tree_bytes(tmp_path)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tolaria.checkpoint_io.os, "fsync", no_space)
    with pytest.raises(CheckpointError, match="No space left"):
        store.save(make_snapshot(1))
    monkeypatch.undo()
    assert tree_bytes(tmp_path) == before  # nothing pruned
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000-epoch-0"]  # no temporary
    assert store.load_latest().epoch == 0


def test_a_checkpoint_of_the_old_fixed_section_layout_is_refused_in_one_line(tmp_path):
    from tolaria.checkpoint_io import write_checkpoint_dir

    old = {"epoch": 3, "global_step": 30, "model": [], "structure": {}, "optimizer": {},
           "tamiyo": {}, "rng": {}, "extra": {}}  # what Tolaria 0.1.0 wrote (layout 1)
    write_checkpoint_dir(tmp_path / "ckpt-000000-epoch-3", {}, old)
    skipped = []
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints"):
        CheckpointStore(tmp_path, keep=2).load_latest(on_skip=lambda p, why: skipped.append(why))
    (reason,) = skipped
    assert "snapshot layout 1 was written by another Tolaria release" in reason
    assert "\n" not in reason
