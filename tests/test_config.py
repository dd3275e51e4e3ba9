"""The config classes' defaults are the built-in default job: a config file changes only
the fields it names, whatever section they are in."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tolaria.cli import main
from tolaria.config import TolariaConfig, load_config


def fields(config: TolariaConfig) -> dict[str, Any]:
    """Every field by its dotted path: ``{"run.epochs": 30, ...}``."""
    return {
        f"{section}.{name}": value
        for section, values in config.model_dump().items()
        for name, value in values.items()
    }


def differences(a: TolariaConfig, b: TolariaConfig) -> dict[str, tuple[Any, Any]]:
    left, right = fields(a), fields(b)
    return {path: (left[path], right[path]) for path in left if left[path] != right[path]}


def test_the_classes_defaults_are_the_built_in_default_job():
    assert TolariaConfig() == load_config(None)


@pytest.mark.parametrize(
    ("content", "path", "value"),
    [
        ({"run": {"epochs": 7}}, "run.epochs", 7),
        ({"tamiyo": {"max_active_seeds": 1}}, "tamiyo.max_active_seeds", 1),
    ],
)
def test_a_config_file_changes_only_the_field_it_sets(tmp_path, content, path, value):
    config_file = tmp_path / "one-field.yaml"
    config_file.write_text(yaml.safe_dump(content))
    default = load_config(None)
    assert differences(default, load_config(config_file)) == {
        path: (fields(default)[path], value)
    }


def test_the_config_command_for_a_one_field_file_differs_from_the_default_in_one_line(
    tmp_path, capsys
):
    config_file = tmp_path / "epochs.yaml"
    config_file.write_text("run: {epochs: 7}\n")
    assert main(["config"]) == 0
    default = capsys.readouterr().out.splitlines()
    assert main(["config", "--config", str(config_file)]) == 0
    from_file = capsys.readouterr().out.splitlines()
    changed = [(a, b) for a, b in zip(default, from_file, strict=True) if a != b]
    assert changed == [("  epochs: 30", "  epochs: 7")]
