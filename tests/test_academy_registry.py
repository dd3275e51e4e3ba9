"""The policy registry: versions whole or absent, a damaged champion never runs, promote and
revert move CHAMPION along its recorded history; `tolaria academy status|promote|revert`."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tolaria.academy import registry as registry_module
from tolaria.academy.registry import CARD_FIELDS, PolicyRegistry, PolicyVersion
from tolaria.academy.replay import ReplayBuffer
from tolaria.cli import main
from tolaria.errors import PolicyVersionError, ReplayError


def fake_v0(directory: Path) -> Path:
    """A base policy as the pretrain ships it, made by hand: save_file and a card."""
    directory.mkdir(parents=True)
    save_file({"score.weight": torch.arange(6.0).reshape(2, 3)}, directory / "policy.safetensors")
    digest = hashlib.sha256((directory / "policy.safetensors").read_bytes()).hexdigest()
    card = {"version": "v0", "parent": None, "created": "2026-01-01T00:00:00+00:00",
            "trained_on": "campaign: mnist1d, digits", "gates": {}, "training_s": 12.5,
            "scorer": {"hidden": 8}, "sha256": digest}
    (directory / "card.json").write_text(json.dumps(card))
    return directory


@pytest.fixture
def builtin(tmp_path) -> Path:
    return fake_v0(tmp_path / "package" / "v0")


@pytest.fixture
def registry(tmp_path, builtin) -> PolicyRegistry:
    return PolicyRegistry(tmp_path / "academy", builtin=builtin)


def card(parent: str | None = "v0", **extra) -> dict:
    return {"parent": parent, "trained_on": "replay p1-p40", "training_s": 3.0,
            "scorer": {"hidden": 8}, **extra}


def tensors(seed: int) -> dict[str, torch.Tensor]:
    return {"score.weight": torch.randn(2, 3, generator=torch.Generator().manual_seed(seed))}


def register_versions(registry: PolicyRegistry, count: int) -> list[PolicyVersion]:
    return [registry.register(tensors(n), card(f"v{n}")) for n in range(count)]


def warnings_of(call) -> tuple[object, list[str]]:
    heard: list[str] = []
    return call(heard.append), heard


# -- versions ---------------------------------------------------------------------------


def test_versions_are_listed_by_number_and_keep_what_was_registered(registry, tmp_path):
    assert registry.versions() == ["v0"]
    made = register_versions(registry, 10)
    assert registry.versions() == [f"v{n}" for n in range(11)]  # v10 after v9, not after v1
    v10 = registry.load("v10")
    assert torch.equal(v10.tensors["score.weight"], tensors(9)["score.weight"])
    assert v10 == made[-1] and set(CARD_FIELDS) <= set(v10.card)
    assert v10.card["parent"] == "v9" and v10.card["gates"] == {}
    assert datetime.fromisoformat(v10.card["created"]).tzinfo is not None
    digest = hashlib.sha256((v10.path / "policy.safetensors").read_bytes()).hexdigest()
    assert v10.card["sha256"] == digest
    assert v10.adapter is None


def test_the_builtin_v0_stands_in_until_the_academy_has_its_own(registry, builtin, tmp_path):
    v0 = registry.champion()
    assert (v0.name, v0.path) == ("v0", builtin)
    assert torch.equal(v0.tensors["score.weight"], torch.arange(6.0).reshape(2, 3))
    assert not (tmp_path / "academy").exists()  # reading creates nothing
    own = fake_v0(registry.directory / "v0")
    (own / "card.json").write_text((own / "card.json").read_text().replace("12.5", "99"))
    assert registry.load("v0").path == own and registry.load("v0").card["training_s"] == 99


def test_a_card_without_what_only_the_trainer_knows_is_refused(registry):
    with pytest.raises(PolicyVersionError, match="card needs trained_on, scorer"):
        registry.register(tensors(0), {"parent": "v0", "training_s": 1.0})
    with pytest.raises(PolicyVersionError, match="'latest' is not a policy version name"):
        registry.register(tensors(0), card("latest"))
    assert registry.versions() == ["v0"]


def test_an_adapter_is_part_of_the_version_and_checked_like_it(registry, tmp_path):
    adapter = tmp_path / "adapter_out"
    (adapter / "nested").mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    (adapter / "nested" / "weights.bin").write_bytes(b"\x00\x01")
    version = registry.register(tensors(1), card(), adapter=adapter)
    assert (version.adapter / "nested" / "weights.bin").read_bytes() == b"\x00\x01"
    assert set(version.card["adapter_sha256"]) == {"adapter_config.json", "nested/weights.bin"}
    (version.adapter / "adapter_config.json").write_text('{"r": 8}')
    with pytest.raises(PolicyVersionError, match=r"adapter/adapter_config\.json: SHA-256 differs"):
        registry.load(version.name)


# -- damage -----------------------------------------------------------------------------


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "card not JSON": (lambda v: (v / "card.json").write_text("{not json"), "card.json: not JSON"),
    "card lacks a field": (
        lambda v: (v / "card.json").write_text(json.dumps(
            {k: x for k, x in json.loads((v / "card.json").read_text()).items() if k != "sha256"}
        )),
        "card.json: lacks sha256",
    ),
    "tensors changed": (lambda v: flip_a_byte(v / "policy.safetensors"),
                        "policy.safetensors: SHA-256 differs"),
    "tensors missing": (lambda v: (v / "policy.safetensors").unlink(),
                        "policy.safetensors: missing"),
    "another version's card": (
        lambda v: (v / "card.json").write_text(
            (v / "card.json").read_text().replace('"version": "v3"', '"version": "v2"')),
        "names version 'v2', not v3",
    ),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_a_damaged_champion_falls_back_to_the_newest_good_version_below_it(registry, damage):
    register_versions(registry, 4)
    registry.promote("v3", reason="best so far")
    harm, cause = DAMAGES[damage]
    harm(registry.directory / "v3")

    with pytest.raises(PolicyVersionError, match=cause) as error:
        registry.load("v3")
    assert "\n" not in str(error.value)
    assert registry.versions() == ["v0", "v1", "v2", "v4"]
    champion, heard = warnings_of(lambda warn: registry.champion(warn=warn))
    assert champion.name == "v2"  # below v3, so not the newer, never-promoted v4
    assert len(heard) == 1 and "\n" not in heard[0]
    assert "CHAMPION names v3" in heard[0] and cause in heard[0] and "running v2" in heard[0]


def test_the_fallback_passes_over_every_damaged_version_below(registry):
    register_versions(registry, 3)
    registry.promote("v3", reason="r")
    for name in ("v3", "v2"):
        flip_a_byte(registry.directory / name / "policy.safetensors")
    champion, heard = warnings_of(lambda warn: registry.champion(warn=warn))
    assert champion.name == "v1" and len(heard) == 1


@pytest.mark.parametrize(("content", "expected", "cause"), [
    ("latest\n", "v0", "'latest' is not a version name"),
    ("v9\n", "v2", "CHAMPION names v9, which does not load: v9: no such policy version"),
    (b"\xff\xfe", "v0", "unreadable"),
])
def test_a_bad_champion_file_falls_back_with_one_warning(registry, content, expected, cause):
    register_versions(registry, 2)
    champion_file = registry.directory / "CHAMPION"
    if isinstance(content, bytes):
        champion_file.write_bytes(content)
    else:
        champion_file.write_text(content)
    champion, heard = warnings_of(lambda warn: registry.champion(warn=warn))
    assert champion.name == expected
    assert len(heard) == 1 and cause in heard[0]


def test_no_good_version_at_all_is_one_error_line(tmp_path):
    registry = PolicyRegistry(tmp_path / "academy", builtin=tmp_path / "no-such-v0")
    with pytest.raises(PolicyVersionError, match="v0: no such policy version in the built-in"):
        registry.champion()
    registry.register(tensors(0), card(None))
    registry.promote("v1", reason="r")
    (registry.directory / "v1" / "card.json").write_text("[]")
    with pytest.raises(PolicyVersionError, match="not a JSON object; and no good policy version"):
        registry.champion(warn=lambda line: None)


# -- atomic registration -----------------------------------------------------------------


def test_a_leftover_of_a_killed_writer_is_ignored_then_cleaned(registry):
    register_versions(registry, 1)
    leftover = registry.directory / ".v2.tmp-99999"
    leftover.mkdir()
    (leftover / "policy.safetensors").write_bytes(b"half")
    stale_champion = registry.directory / ".CHAMPION.tmp-99999"
    stale_champion.write_text("v2")
    assert registry.versions() == ["v0", "v1"]

    version = registry.register(tensors(5), card("v1"))
    assert version.name == "v2"
    assert not leftover.exists() and not stale_champion.exists()
    assert registry.versions() == ["v0", "v1", "v2"]


def test_a_failed_write_leaves_no_version_and_takes_no_name(registry, monkeypatch):
    real = registry_module._write_synced

    def disk_full_at_the_card(path, data):
        if path.name == "card.json":
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(registry_module, "_write_synced", disk_full_at_the_card)
    with pytest.raises(PolicyVersionError, match="v1: cannot write the policy version") as error:
        registry.register(tensors(0), card())
    assert "No space left" in str(error.value)
    assert [p.name for p in registry.directory.iterdir()] == [".lock"]  # no vN, no temp
    monkeypatch.undo()
    assert registry.register(tensors(0), card()).name == "v1"


KILLED_REGISTER = """
import os, signal, sys, torch
from pathlib import Path
from tolaria.academy.registry import PolicyRegistry

def kill_instead_of_renaming(source, target):  # the worst moment: all written, not renamed
    os.kill(os.getpid(), signal.SIGKILL)

os.replace = kill_instead_of_renaming
PolicyRegistry(Path(sys.argv[1]), builtin=Path(sys.argv[2])).register(
    {"w": torch.ones(2)}, {"parent": "v1", "trained_on": "x", "training_s": 0.0, "scorer": {}})
"""


@pytest.mark.slow
def test_a_kill_9_while_registering_leaves_no_half_version(registry, builtin):
    register_versions(registry, 1)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_REGISTER, str(registry.academy_dir), str(builtin)],
        capture_output=True, text=True, timeout=300,
    )
    assert killed.returncode == -9, killed.stderr
    assert [p.name for p in registry.directory.glob(".v2.tmp-*")]  # it died mid-write
    assert registry.versions() == ["v0", "v1"]
    assert registry.register(tensors(2), card("v1")).name == "v2"
    assert not list(registry.directory.glob(".v2.tmp-*"))


def test_concurrent_registers_take_distinct_names(registry):
    def register_three(seed: int) -> None:
        for n in range(3):
            registry.register(tensors(seed * 10 + n), card())

    threads = [threading.Thread(target=register_three, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert registry.versions() == [f"v{n}" for n in range(7)]
    with ReplayBuffer.in_academy(registry.academy_dir) as replay:
        assert sorted(a["version"] for a in replay.attempts()) == [f"v{n}" for n in range(1, 7)]


# -- promote and revert ------------------------------------------------------------------


def champion_file(registry: PolicyRegistry) -> str:
    return (registry.directory / "CHAMPION").read_text()


def test_promote_and_revert_walk_back_through_the_champions_not_the_numbers(registry):
    register_versions(registry, 3)
    registry.promote("v1", reason="first nightly")
    registry.promote("v3", reason="better on digits")
    registry.promote("v3", reason="again: nothing to do")
    assert champion_file(registry) == "v3\n" and registry.champion().name == "v3"

    assert registry.revert(reason="incidents on mnist1d") == "v1"  # v3's predecessor, not v2
    assert registry.revert(reason="v1 too") == "v0"
    with pytest.raises(PolicyVersionError, match="nothing to revert to: no champion before v0"):
        registry.revert(reason="again")
    assert champion_file(registry) == "v0\n"

    with ReplayBuffer.in_academy(registry.academy_dir) as replay:
        moves = [(a["kind"], a["version"], a["parent"], a["outcome"], a["detail"]["reason"])
                 for a in replay.attempts() if a["kind"] != "register"]
    assert moves == [
        ("revert", "v0", "v1", "reverted", "v1 too"),
        ("revert", "v1", "v3", "reverted", "incidents on mnist1d"),
        ("promote", "v3", "v1", "promoted", "better on digits"),
        ("promote", "v1", "v0", "promoted", "first nightly"),
    ]


def test_a_champion_promoted_again_after_a_revert_reverts_to_the_one_before(registry):
    register_versions(registry, 2)
    registry.promote("v1", reason="a")
    registry.promote("v2", reason="b")
    registry.revert(reason="c")
    registry.promote("v2", reason="fixed")
    assert registry.revert(reason="d") == "v1"
    assert registry.revert(reason="e") == "v0"


def test_revert_passes_over_a_previous_champion_that_no_longer_loads(registry):
    register_versions(registry, 3)
    for name in ("v1", "v2", "v3"):
        registry.promote(name, reason="r")
    flip_a_byte(registry.directory / "v2" / "policy.safetensors")
    target, heard = warnings_of(lambda warn: registry.revert(reason="bad v3", warn=warn))
    assert target == "v1" and champion_file(registry) == "v1\n"
    assert len(heard) == 1 and "v2/policy.safetensors: SHA-256 differs" in heard[0]


def test_a_move_killed_before_its_record_is_still_reverted_to_the_last_recorded(registry):
    register_versions(registry, 2)
    registry.promote("v1", reason="recorded")
    (registry.directory / "CHAMPION").write_text("v2\n")  # as a kill after the replace leaves it
    assert registry.revert(reason="r") == "v1"


def test_promote_refuses_a_version_that_does_not_load(registry):
    register_versions(registry, 2)
    registry.promote("v1", reason="r")
    (registry.directory / "v2" / "card.json").unlink()
    for name, cause in [("v2", "v2/card.json: missing"), ("v7", "v7: no such policy version"),
                        ("latest", "'latest' is not a policy version name")]:
        with pytest.raises(PolicyVersionError, match=cause):
            registry.promote(name, reason="r")
    assert champion_file(registry) == "v1\n"


def test_an_unusable_replay_buffer_refuses_the_move_before_it_happens(registry):
    register_versions(registry, 1)
    (registry.academy_dir / "replay.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(ReplayError, match="not a Tolaria replay buffer"):
        registry.promote("v1", reason="r")
    assert not (registry.directory / "CHAMPION").exists()
    assert registry.champion().name == "v0"


# -- the command line --------------------------------------------------------------------


@pytest.fixture
def shipped(monkeypatch, builtin) -> Path:
    """The CLI's registry finds ``builtin`` as the package's v0; tables get a wide terminal
    so that a cell's text is on one line (test_status_in_80_columns_cuts_nothing)."""
    monkeypatch.setattr(registry_module, "BUILTIN_V0", builtin)
    monkeypatch.setenv("COLUMNS", "200")
    return builtin


def academy(tmp_path, *args: str) -> list[str]:
    return ["academy", *args, "--academy", str(tmp_path / "academy")]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_status_of_a_missing_academy_says_so_and_lists_the_builtin(tmp_path, shipped, capsys):
    assert main(academy(tmp_path, "status")) == 0
    out = capsys.readouterr().out
    assert "no academy directory yet" in out
    assert "champion: v0" in out and re.search(r"v0 \*\s+built-in", out)
    assert "campaign: mnist1d, digits" in out and "replay buffer: none yet" in out
    assert not (tmp_path / "academy").exists()


def test_status_shows_versions_replay_and_attempts(tmp_path, shipped, capsys):
    registry = PolicyRegistry(tmp_path / "academy")
    registry.register(tensors(1), card(gates={"history_score": 0.97, "diversity_score": 0.5}))
    registry.register(tensors(2), card("v1"))
    registry.promote("v1", reason="gates passed")
    (registry.directory / "v2" / "card.json").write_text("{")
    with ReplayBuffer.in_academy(registry.academy_dir) as replay:
        replay.begin_run("runs/a", task="digits/mlp[32]", fingerprint={}, config={},
                         hardware={}, policy="learned", policy_version="v1")
        replay.add_point("runs/a", {"point_id": "p1", "epoch": 0, "attempt": 1, "slot": 0,
                                    "observation": {}, "candidates": [], "chosen": 0,
                                    "propensity": 1.0, "policy": "learned",
                                    "policy_version": "v1"})
    assert main(academy(tmp_path, "status")) == 0
    out = capsys.readouterr().out
    assert "champion: v1" in out and re.search(r"v1 \*\s+v0", out)
    assert re.search(r"v0\s+built-in", out)
    assert "history_score=0.97 diversity_score=0.5" in out
    assert re.search(r"v2\s+-\s+does not load", out)
    assert "v2/card.json:notJSON" in re.sub(r"\s+", "", out)  # a long path may wrap
    assert "1 decision points" in out and "digits/mlp[32]" in out
    assert "promoted" in out and "reason=gates passed" in out and "registered" in out


def test_status_in_80_columns_cuts_nothing(tmp_path, shipped, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    registry = PolicyRegistry(tmp_path / "academy")
    trained_on = "replay of runs p1-p4000 on every task"
    registry.register(tensors(1), card(trained_on=trained_on))
    reason = "the nightly session of 2026-12-01 passed every gate"
    registry.promote("v1", reason=reason)
    assert main(academy(tmp_path, "status")) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    assert all(word in out for word in trained_on.split())
    # The reason wraps in the last column: nothing else sits beside its continuation lines.
    assert f"reason={reason}".replace(" ", "") in re.sub(r"\s+", "", out)


def test_status_warns_on_stderr_when_the_champion_is_damaged(tmp_path, shipped, capsys):
    registry = PolicyRegistry(tmp_path / "academy")
    register_versions(registry, 2)
    registry.promote("v2", reason="r")
    flip_a_byte(registry.directory / "v2" / "policy.safetensors")
    assert main(academy(tmp_path, "status")) == 0
    captured = capsys.readouterr()
    assert "champion: v1" in captured.out
    assert len(captured.err.strip().splitlines()) == 1
    assert "CHAMPION names v2, which does not load" in captured.err


def test_promote_and_revert_from_the_command_line(tmp_path, shipped, capsys):
    registry = PolicyRegistry(tmp_path / "academy")
    register_versions(registry, 2)
    assert main(academy(tmp_path, "promote", "v1")) == 0
    assert main(academy(tmp_path, "promote", "v2", "--reason", "nightly 3 passed")) == 0
    assert "champion: v2 (nightly 3 passed)" in capsys.readouterr().err
    assert main(academy(tmp_path, "revert", "--reason", "rollback blamed v2")) == 0
    assert "champion: v1 (reverted: rollback blamed v2)" in capsys.readouterr().err
    assert champion_file(registry) == "v1\n"
    newest = registry.attempts(1)[0]
    assert (newest["kind"], newest["version"], newest["parent"]) == ("revert", "v1", "v2")
    assert newest["detail"]["reason"] == "rollback blamed v2"


@pytest.mark.parametrize(("args", "cause"), [
    (("promote", "v9"), "v9: no such policy version"),
    (("promote", "best"), "'best' is not a policy version name"),
    (("revert",), "nothing to revert to: no champion before v0"),
])
def test_command_line_refusals_are_one_line_with_exit_code_2(tmp_path, shipped, capsys,
                                                            args, cause):
    assert main(academy(tmp_path, *args)) == 2
    line = error_line(capsys)
    assert line.startswith("tolaria: error:") and cause in line
    assert not (tmp_path / "academy" / "policies" / "CHAMPION").exists()
