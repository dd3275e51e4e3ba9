"""Bad input is one line naming its cause, and loses nothing already written; a run stopped
early (Ctrl-C, a crash before its first checkpoint) can always be continued."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tolaria.cli import main

#: A small real run: digits trains an epoch in well under a second.
DIGITS = [
    "data.dataset=digits",
    "run.device=cpu",
    "run.progress=false",
    "run.tensorboard=false",
    "checkpoint.every_epochs=0",
]


def sets(*settings: str) -> list[str]:
    return [f"--set={s}" for s in settings]


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


# -- config files that do not read ---------------------------------------------------------


@pytest.mark.parametrize(("content", "message"), [
    (b"run:\n  epochs: 3\n  name: [a, b\n",
     "line 4, column 1: not valid YAML: expected ',' or ']', but got '<stream end>' "
     "(while parsing a flow sequence at line 3, column 9)"),
    (b"run: !!python/object/apply:os.system [echo hi]\n",
     "line 1, column 6: not valid YAML: could not determine a constructor for the tag "
     "'!!python/object/apply:os.system'"),
    (b"run:\n  name: caf\xe9\n", "line 2, column 12: not UTF-8 text (byte 0xe9)"),
])
def test_a_config_file_that_does_not_read_is_one_line_naming_file_and_position(
    tmp_path, capsys, content, message
):
    config = tmp_path / "c.yaml"
    config.write_bytes(content)
    assert main(["config", "--config", str(config)]) == 2
    assert one_line(capsys) == f"tolaria: error: {config}: {message}"


# -- user code that raises -----------------------------------------------------------------


@pytest.mark.parametrize(("setting", "message"), [
    ("data.dataset=plugins_for_cli_tests:raising_dataset",
     "data.dataset='plugins_for_cli_tests:raising_dataset': raising_dataset(...) raised "
     "ValueError('boom')"),
    ("model.host=plugins_for_cli_tests:raising_host",
     "model.host='plugins_for_cli_tests:raising_host': raising_host(...) raised "
     "RuntimeError('no such layer')"),
])
def test_user_code_that_raises_is_one_line_and_the_traceback_only_when_asked(
    tmp_path, capsys, monkeypatch, setting, message
):
    run = tmp_path / "run"
    command = ["train", "--run-dir", str(run), *sets(*DIGITS, setting)]
    assert main(command) == 2
    assert one_line(capsys) == f"tolaria: error: {message}"

    assert main(["--debug", *command]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "The above exception was the direct cause" in err
    assert err.strip().splitlines()[-1] == f"tolaria: error: {message}"

    monkeypatch.setenv("TOLARIA_DEBUG", "1")
    assert main(command) == 2
    assert "Traceback" in capsys.readouterr().err
    assert not run.exists()


# -- a finished run to work on -------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A completed two-epoch run; tests work on copies of it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--run-dir", str(run), *sets(*DIGITS, "run.epochs=2")]) == 0
    return run


@pytest.fixture
def run_copy(finished, tmp_path, capsys) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    capsys.readouterr()
    return copy


# -- tolaria plot --------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "problem"), [
    ("missing/curves.png", "no folder {folder}"),
    ("curves.bmp", "cannot write .bmp (supported: .eps, "),
    ("curves", "cannot write a file without an extension (supported: .eps, "),
])
def test_plot_refuses_an_output_it_cannot_write_in_one_line(run_copy, capsys, name, problem):
    out = run_copy / name
    before = tree(run_copy)
    assert main(["plot", str(run_copy), "--out", str(out)]) == 2
    line = one_line(capsys)
    assert line.startswith(f"tolaria: error: --out {out}: {problem.format(folder=out.parent)}")
    assert tree(run_copy) == before
    assert not (run_copy / "missing").exists()  # no folder made on the quiet
