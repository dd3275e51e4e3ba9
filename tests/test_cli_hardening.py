"""Bad input is one line naming its cause, and loses nothing already written; a run stopped
early (Ctrl-C, a crash before its first checkpoint) can always be continued."""

from __future__ import annotations

import pytest

from tolaria.cli import main


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
