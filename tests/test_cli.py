"""The `tolaria` command: config errors are one line with exit code 2; a real run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tolaria.cli import main
from tolaria.config import TolariaConfig, load_config
from tolaria.errors import ConfigError


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tolaria.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def write_config(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_unknown_key_names_the_dotted_path_and_the_file(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", {"optimizer": {"lrr": 0.1}})
    assert main(["train", "--config", config]) == 2
    err = capsys.readouterr().err
    assert "optimizer.lrr: unknown key" in err
    assert "c.yaml" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_wrong_type_names_the_field(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", {"run": {"epochs": "many"}})
    assert main(["config", "--config", config]) == 2
    err = capsys.readouterr().err
    assert "run.epochs" in err and "'many'" in err


def test_missing_file_is_one_clear_line(tmp_path, capsys):
    assert main(["config", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.yaml: config file not found" in err
    assert len(err.splitlines()) == 1


def test_override_of_unknown_section_key_is_rejected():
    with pytest.raises(ConfigError, match=r"kasmina\.chunkz: unknown key"):
        load_config(None, ["kasmina.chunkz=3"])


def test_overrides_are_typed_yaml():
    config = load_config(None, ["run.epochs=5", "kasmina.layers=[hidden.0]", "optimizer.lr=1e-2"])
    assert config.run.epochs == 5
    assert config.kasmina.layers == ["hidden.0"]
    assert config.optimizer.lr == pytest.approx(0.01)


def test_config_command_prints_the_default_which_round_trips(capsys):
    assert main(["config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert TolariaConfig.model_validate(printed) == load_config()


def test_existing_run_directory_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("precious: true\n")
    assert main(["train", "--run-dir", str(run)]) == 2
    assert "tolaria resume" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == "precious: true\n"


@pytest.mark.slow
def test_two_epoch_run_through_the_cli(tmp_path):
    run = tmp_path / "run"
    result = run_cli(
        "train",
        "--run-dir",
        str(run),
        "--set",
        "run.epochs=2",
        "--set",
        "data.kwargs={num_samples: 600}",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--set",
        "run.tensorboard=false",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["status"] == "completed"
    assert 0.0 <= summary["final_val_accuracy"] <= 1.0
    assert sum(summary["seeds"].values()) > 0  # the default host carries seeds
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert "Tolaria run summary" in result.stdout + result.stderr


def test_a_bad_host_leaves_no_run_directory_behind(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--run-dir",
            str(run),
            "--set",
            "model.kwargs={width: 3}",
            "--set",
            f"data.cache_dir={tmp_path / 'cache'}",
            "--set",
            "data.kwargs={num_samples: 300}",
        ]
    )
    assert code == 2
    assert "model.kwargs" in capsys.readouterr().err
    assert not run.exists()  # the same command, corrected, can be run again as is


def test_resuming_a_completed_run_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(load_config().to_yaml())
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    before = sorted(p.name for p in run.iterdir())
    assert main(["resume", str(run)]) == 0
    assert "already completed" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before


def test_plot_draws_a_finished_run_and_refuses_an_empty_one(
    tmp_path, tiny_config, tiny_data, capsys
):
    from tolaria.build import build_trainer

    build_trainer(tiny_config, run_dir=tmp_path / "run", data=tiny_data).train()
    out = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text(load_config().to_yaml())
    assert main(["plot", str(empty)]) == 2
    assert "no epochs recorded yet" in capsys.readouterr().err
    assert not (empty / "curves.png").exists()
