"""The command line researchers expect: a typo answered before torch is imported, --version,
help for every argument, commented `tolaria config`, numbers as run names, user modules from
the current directory, and no mnist1d import when its data is cached."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
import yaml

import tolaria
from tolaria import cli
from tolaria.config import TolariaConfig, load_config
from tolaria.config_comments import field_comments
from tolaria.data import load_data
from tolaria.errors import ConfigError
from tolaria.plugins import resolve_callable


def test_a_config_typo_is_answered_before_torch_is_imported():
    code = (
        "import sys\n"
        "from tolaria.cli import main\n"
        "codes = [main(['train', '--set', 'optimizer.lrr=0.1']), main(['config'])]\n"
        "print(codes, [m for m in ('torch', 'numpy') if m in sys.modules], file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert lines == ["tolaria: error: <built-in default>: optimizer.lrr: unknown key",
                     "[2, 0] []"]


def test_version_names_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"tolaria {tolaria.__version__}\n"


def _parsers(parser: argparse.ArgumentParser, name: str = "tolaria"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_subcommand_and_argument_has_help():
    parser = cli._parser()
    missing = []
    for name, command in _parsers(parser):
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{name} {choice.dest}" for choice in action._choices_actions
                            if not choice.help]
            elif not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert len(list(_parsers(parser))) >= 5  # tolaria and its subcommands
    assert missing == []


def test_every_config_field_has_a_comment():
    missing = [section for section in TolariaConfig.model_fields
               if section not in field_comments(TolariaConfig)]
    for section, field in TolariaConfig.model_fields.items():
        comments = field_comments(field.annotation)
        missing += [f"{section}.{name}" for name in field.annotation.model_fields
                    if name not in comments]
    assert missing == []


def test_config_prints_each_fields_comment_above_it_and_round_trips(capsys):
    assert cli.main(["config", "--set", "run.epochs=7"]) == 0
    text = capsys.readouterr().out
    assert TolariaConfig.model_validate(yaml.safe_load(text)) == load_config(None, ["run.epochs=7"])
    lines = text.splitlines()
    epochs = lines.index("  epochs: 7")
    assert lines[epochs - 1] == (
        "  # Epochs to train (`tolaria resume --set run.epochs=N` continues to N).")
    # A comment of several lines keeps them all, in order, right above its field.
    threads = lines.index("  num_threads: 1")
    assert lines[threads - 3].startswith("  # CPU threads for torch ops")
    assert lines[lines.index("run:") - 1].startswith("# The run:")

    assert cli.main(["config", "--set", "run.epochs=7", "--no-comments"]) == 0
    plain = capsys.readouterr().out
    assert "#" not in plain and yaml.safe_load(plain) == yaml.safe_load(text)


def test_a_number_is_a_run_name(tmp_path):
    assert load_config(None, ["run.name=123"]).run.name == "123"
    config_file = tmp_path / "c.yaml"
    config_file.write_text("run: {name: 2.5}\n")
    assert load_config(config_file).run.name == "2.5"
    with pytest.raises(ConfigError, match=r"run\.name: Input should be a valid string"):
        load_config(None, ["run.name=true"])


def test_module_function_is_found_in_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_models_for_test.py").write_text("def make():\n    return 42\n")
    monkeypatch.chdir(tmp_path)
    # As the `tolaria` console script starts: its sys.path holds neither '' nor the cwd.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwd_models_for_test", raising=False)
    assert resolve_callable("cwd_models_for_test:make", "model.host")() == 42
    assert sys.path[0] == str(tmp_path)
    monkeypatch.delitem(sys.modules, "cwd_models_for_test")


def test_a_cached_mnist1d_loads_without_importing_mnist1d(tmp_path, monkeypatch):
    config = load_config(None, [f"data.cache_dir={tmp_path}", "data.kwargs.num_samples=200"]).data
    cold = load_data(config, seed=0)  # generates, and remembers the generator's defaults
    assert len(list(tmp_path.glob("mnist1d-*-defaults.json"))) == 1
    for name in ("mnist1d", "mnist1d.data", "mnist1d.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # any `import mnist1d` now fails
    warm = load_data(config, seed=0)
    assert torch.equal(warm.train.tensors[0], cold.train.tensors[0])
    # Unknown generator arguments are still refused from the remembered defaults.
    bad = config.model_copy(update={"kwargs": {"num_sample": 10}})
    with pytest.raises(ConfigError, match="num_sample"):
        load_data(bad, seed=0)


def test_a_damaged_defaults_memo_is_asked_again(tmp_path):
    config = load_config(None, [f"data.cache_dir={tmp_path}", "data.kwargs.num_samples=200"]).data
    first = load_data(config, seed=0)
    (memo,) = tmp_path.glob("mnist1d-*-defaults.json")
    memo.write_text("[1, 2")  # torn
    again = load_data(config, seed=0)
    assert torch.equal(again.val.tensors[1], first.val.tensors[1])
    assert "num_samples" in json.loads(memo.read_text())
