"""Auto-revert (design §6.4 ``Emergency_Rollback -> Policy_vN``): tiny in-process runs of a
learned policy whose version is a nightly child of v0, failing and not."""

from __future__ import annotations

import builtins
import errno
import fcntl
import json
import os
import re
from pathlib import Path

import pytest

from drills import CLI_SETTINGS, run_cli, train_args
from plugins_for_academy import graft_happy_scorer
from tolaria.academy import auto_revert
from tolaria.academy.auto_revert import REASON_PREFIX
from tolaria.academy.registry import CHAMPION_FILE, LOCK_FILE, PolicyRegistry, write_version
from tolaria.academy.replay import ReplayBuffer
from tolaria.build import build_trainer
from tolaria.cli import main
from tolaria.tamiyo.scorer import DEFAULT_ARCHITECTURE


@pytest.fixture
def registry(tiny_config) -> PolicyRegistry:
    """An academy whose own v0 (standing in for the built-in) and its nightly child v1 are
    the same graft-happy scorer: under either, a run takes the same decisions and meets the
    same incident, so only the lineage differs.  v1 is the champion."""
    registry = PolicyRegistry(tiny_config.academy_dir())
    tensors = graft_happy_scorer().state_dict()
    card = {"trained_on": "test", "training_s": 0.0, "scorer": DEFAULT_ARCHITECTURE}
    registry.directory.mkdir(parents=True)
    write_version(registry.directory / "v0", tensors,
                  {**card, "version": "v0", "parent": None, "created": "-", "gates": {}})
    registry.register(tensors, {**card, "parent": "v0"})
    registry.promote("v1", reason="nightly: every gate passed")
    return registry


def learned(config, *, poisoned: bool):
    """Greedy learned policy; ``poisoned``: NaN logits in one epoch, an emergency rollback
    whose incident implicates the grafts on trial (``plugins_for_drills``)."""
    config.tamiyo.policy = "learned"
    config.tamiyo.temperature = 0.0
    config.run.epochs = 5 if poisoned else 2
    if poisoned:
        config.model.host = "plugins_for_drills:poisoned_mlp"
        config.model.kwargs = {"poison": "nan", "start": 3, "stop": 4}
    return config


def incidents(run_dir: Path) -> list[dict]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "incident"]


def reverts(registry: PolicyRegistry) -> list[dict]:
    return [a for a in registry.attempts() if a["kind"] == "revert"]


def champion(registry: PolicyRegistry) -> str:
    return (registry.directory / CHAMPION_FILE).read_text().strip()


def lines_of(text: str, word: str) -> list[str]:
    return [line for line in text.splitlines() if word in line]


# -- an incident that implicates the version's graft -----------------------------------------


def test_an_implicated_graft_of_a_nightly_child_reverts_the_champion_once(
    tiny_config, tiny_data, tmp_path, registry, capsys
):
    config = learned(tiny_config, poisoned=True)
    # Both start under v1, the champion: the second meets its incident after the revert.
    first, second = (build_trainer(config, data=tiny_data, run_dir=tmp_path / name)
                     for name in ("first", "second"))
    summary = first.train()
    assert summary["status"] == "completed" and summary["rollbacks"] >= 1  # the run went on
    [move] = reverts(registry)
    assert (move["version"], move["parent"], champion(registry)) == ("v0", "v1", "v0")
    incident = incidents(tmp_path / "first")[0]
    point = incident["implicated_points"][0]
    layer = point["seed_id"].rpartition(".")[0]
    assert move["detail"]["reason"] == (
        f"{REASON_PREFIX}run {(tmp_path / 'first').resolve()}: rollback at epoch "
        f"{incident['epoch']} implicated {point['point_id']} (v1's graft of seed "
        f"{point['seed_id']} on layer {layer}, blueprint {point['blueprint']})"
    )
    [announcement] = lines_of(capsys.readouterr().err, "auto-revert")
    assert announcement.startswith("tolaria: warning: auto-revert: champion v1 -> v0")

    assert second.train()["rollbacks"] >= 1 and incidents(tmp_path / "second")
    assert len(reverts(registry)) == 1 and champion(registry) == "v0"  # it had moved
    assert lines_of(capsys.readouterr().err, "auto-revert") == []
    assert build_trainer(config, data=tiny_data).tamiyo.policy.version == "v0"  # the next run


@pytest.mark.parametrize("case", ["v0, which has no parent", "a pinned v1"])
def test_the_same_incident_reverts_nothing_under_v0_or_a_pinned_version(
    tiny_config, tiny_data, tmp_path, registry, capsys, case
):
    config = learned(tiny_config, poisoned=True)
    if case == "a pinned v1":
        config.tamiyo.policy_version = "v1"
    else:
        registry.revert(reason="by hand")
    expected = champion(registry), len(reverts(registry))
    trainer = build_trainer(config, data=tiny_data, run_dir=tmp_path / "run")
    trainer.train()
    assert trainer.tamiyo.policy.version == expected[0]
    assert incidents(tmp_path / "run")[0]["implicated_points"]  # a graft was implicated
    assert (champion(registry), len(reverts(registry))) == expected
    said = lines_of(capsys.readouterr().err, "auto-revert")
    if case == "a pinned v1":
        [note] = said
        assert note.startswith("tolaria: note: auto-revert: rollback at epoch")
        assert "nothing reverted: this run pins v1 (tamiyo.policy_version)" in note
    else:
        assert said == []


# -- the incident rate -------------------------------------------------------------------------


@pytest.mark.parametrize(("margin", "min_runs", "reverted"), [
    (0.5, 3, True),    # v1: 3 incidents in 3 runs (1.0 per run), v0: none -- 1.0 > 0.5
    (1.0, 3, False),   # 1.0 is not more than 1.0
    (0.5, 4, False),   # three runs a side are too few to compare
])
def test_an_incident_rate_beyond_the_parents_by_the_margin_reverts_at_run_end(
    tiny_config, tiny_data, tmp_path, registry, capsys, margin, min_runs, reverted
):
    with ReplayBuffer.in_academy(registry.academy_dir) as replay:
        for number, (version, rollbacks) in enumerate(
            [("v0", 0), ("v0", 0), ("v0", 0), ("v1", 2), ("v1", 1)]
        ):
            replay.begin_run(f"earlier-{number}", task="blobs", fingerprint={}, config={},
                             hardware={}, policy="learned", policy_version=version)
            replay.end_run(f"earlier-{number}", status="completed",
                           metrics={"rollbacks": rollbacks})
        replay.begin_run("still-running", task="blobs", fingerprint={}, config={},
                         hardware={}, policy="learned", policy_version="v0")  # not counted
    config = learned(tiny_config, poisoned=False)
    config.academy.auto_revert.incident_margin = margin
    config.academy.auto_revert.min_runs = min_runs
    summary = build_trainer(config, data=tiny_data, run_dir=tmp_path / "run").train()
    assert summary["rollbacks"] == 0  # a clean run: only the rate can blame v1

    assert champion(registry) == ("v0" if reverted else "v1")
    said = lines_of(capsys.readouterr().err, "auto-revert")
    if reverted:
        [move] = reverts(registry)
        assert move["detail"]["reason"].endswith(
            "v1's incident rate 1.00 per run (3 runs) exceeds v0's 0.00 (3 runs) by more "
            "than 0.5"
        )
        assert len(said) == 1 and "champion v1 -> v0" in said[0]
    else:
        assert reverts(registry) == [] and said == []


# -- a revert that cannot be made --------------------------------------------------------------


@pytest.fixture
def read_only(registry, monkeypatch):
    """``policies/`` on a read-only file system: it reads, and nothing opens for writing."""
    real_open = builtins.open
    root = str(registry.directory.resolve()) + os.sep

    def open_read_only(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and os.path.realpath(file).startswith(root):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_read_only)
    return "Read-only file system"


@pytest.fixture
def locked(registry, monkeypatch):
    """Another writer holds the registry's lock and never lets go."""
    monkeypatch.setattr(auto_revert, "LOCK_TIMEOUT_S", 0.2)
    with open(registry.directory / LOCK_FILE, "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        yield "held it for more than 0.2 s"


@pytest.mark.parametrize("failure", ["read_only", "locked"])
def test_a_revert_that_fails_is_one_warning_and_the_run_completes(
    tiny_config, tiny_data, tmp_path, registry, capsys, request, failure
):
    cause = request.getfixturevalue(failure)
    summary = build_trainer(learned(tiny_config, poisoned=True), data=tiny_data,
                            run_dir=tmp_path / "run").train()
    assert summary["status"] == "completed" and summary["rollbacks"] >= 1
    [warning] = lines_of(capsys.readouterr().err, "warning")
    assert warning.startswith("tolaria: warning: auto-revert of v1 failed") and cause in warning
    assert "the champion is unchanged, the run goes on" in warning
    assert champion(registry) == "v1" and reverts(registry) == []


# -- the registry's side and the status report -----------------------------------------------


def test_a_revert_only_from_a_version_that_is_no_longer_champion_changes_nothing(registry):
    assert registry.revert(reason="r", only_from="v2") is None
    assert champion(registry) == "v1" and reverts(registry) == []
    assert registry.revert(reason="r", only_from="v1") == "v0"


def test_status_marks_an_auto_revert_and_shows_its_reason_whole(registry, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    blame = ("run /runs/nightly-check/run-17: rollback at epoch 3 implicated p7 (v1's graft "
             "of seed hidden.0.2 on layer hidden.0, blueprint low_rank)")
    registry.revert(reason=REASON_PREFIX + blame)
    assert main(["academy", "status", "--academy", str(registry.academy_dir)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"auto-revert\s+v0\s+v1\s+reverted\s+why: below", out)
    assert "\nauto-revert v1 -> v0 (" in out and f"): {blame}\n" in out  # one line, whole


@pytest.mark.slow
def test_tolaria_train_announces_the_revert_in_one_line_and_status_shows_it(
    tmp_path, registry, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "200")
    settings = [*CLI_SETTINGS, "run.epochs=4", "tamiyo.policy=learned", "tamiyo.temperature=0",
                "model.host=plugins_for_drills:poisoned_mlp",
                "model.kwargs={poison: nan, start: 3, stop: 4}",
                f"academy.dir={registry.academy_dir}"]
    train = run_cli(train_args(tmp_path / "run", tmp_path / "cache", settings))
    assert train.code == 0 and "Traceback" not in train.err
    [line] = lines_of(train.err, "auto-revert")
    assert line.startswith("tolaria: warning: auto-revert: champion v1 -> v0: rollback at")
    status = run_cli(["academy", "status", "--academy", str(registry.academy_dir)])
    assert status.code == 0 and "champion: v0" in status.out
    [why] = [x for x in status.out.splitlines() if x.startswith("auto-revert v1 -> v0")]
    assert f"run {(tmp_path / 'run').resolve()}: rollback at epoch" in why
