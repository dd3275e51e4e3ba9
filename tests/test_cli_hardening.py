"""Bad input is one line naming its cause, and loses nothing already written; a run stopped
early (Ctrl-C, a crash before its first checkpoint) can always be continued."""

from __future__ import annotations

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
