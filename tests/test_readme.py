"""README.md is true: its commands parse with the real parser and run as written in a clean
directory, its config files validate, its `make` targets exist, and every name its "Coming
from Lightning" table promises exists."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

import tolaria
from tolaria.cli import _parser
from tolaria.config import TolariaConfig, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
README = (REPO_ROOT / "README.md").read_text()
MAKEFILE = (REPO_ROOT / "Makefile").read_text()

# As the `tolaria` console script runs: -P keeps the current directory off sys.path, so a
# user module is found only because Tolaria looks there.
TOLARIA = [sys.executable, "-P", "-m", "tolaria"]


def fenced_blocks(language: str) -> list[str]:
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", README, re.M | re.S)
            if lang == language]


def commands(program: str) -> list[list[str]]:
    """Every ``program ...`` line of the README's bash blocks, split as a shell would."""
    found = []
    for block in fenced_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens and tokens[0] == program:
                found.append(tokens)
    return found


def file_blocks() -> dict[str, str]:
    """Code blocks that name their file in their first line (``# grow.yaml``)."""
    files = {}
    for language in ("yaml", "python"):
        for block in fenced_blocks(language):
            first = block.splitlines()[0]
            if match := re.fullmatch(r"# ([\w.]+\.(?:yaml|py))", first):
                files[match.group(1)] = block
    return files


def is_synopsis(tokens: list[str]) -> bool:
    """A usage line (``[--out FILE]``, ``RUN_DIR``, ``...``) rather than a runnable command;
    a YAML list in a value (``kasmina.layers=["2"]``) has balanced brackets."""
    return any(token.startswith("[") or token.count("]") > token.count("[")
               or "..." in token or re.fullmatch(r"[A-Z_]+", token) for token in tokens)


TOLARIA_COMMANDS = commands("tolaria")
CONCRETE = [c for c in TOLARIA_COMMANDS if not is_synopsis(c)]
SYNOPSES = [c for c in TOLARIA_COMMANDS if is_synopsis(c)]


def test_the_readme_has_the_commands_this_file_checks():
    assert len(SYNOPSES) >= 4 and len(CONCRETE) >= 3
    assert {"grow.yaml", "mymodels.py"} <= file_blocks().keys()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: sub for action in parser._actions
            if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}


@pytest.mark.parametrize("tokens", SYNOPSES, ids=" ".join)
def test_each_usage_line_names_real_subcommands_and_flags(tokens):
    parser = _parser()
    options = {o for action in parser._actions for o in action.option_strings}
    for token in tokens[1:]:  # down the subcommands it names (`tolaria academy promote`)
        if token not in subcommands(parser):
            break
        parser = subcommands(parser)[token]
        options |= {o for action in parser._actions for o in action.option_strings}
    flags = {flag for token in tokens[1:] for flag in re.findall(r"--[a-z][a-z-]*", token)}
    assert flags <= options, f"unknown flags {sorted(flags - options)}"


@pytest.mark.parametrize("tokens", CONCRETE, ids=" ".join)
def test_each_command_parses_and_its_config_validates(tokens, tmp_path, monkeypatch):
    for name, text in file_blocks().items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    try:
        args = _parser().parse_args(tokens[1:])
    except SystemExit as exit_:  # --version and --help exit 0 once they have printed
        assert exit_.code == 0, f"{' '.join(tokens)} does not parse"
        return
    if hasattr(args, "overrides") and hasattr(args, "config"):
        config = args.config
        if config is not None and not config.exists():
            config = REPO_ROOT / config  # a file of the repository (examples/), not the README
        load_config(config, args.overrides)  # a ConfigError names the wrong field


def test_every_make_target_the_readme_names_exists():
    targets = {t for tokens in commands("make") for t in tokens[1:]}
    targets |= set(re.findall(r"`make ([\w-]+)`", README))
    assert {"demo", "test", "bench", "gpu-check"} <= targets
    missing = [t for t in targets if not re.search(rf"^{re.escape(t)}:", MAKEFILE, re.M)]
    assert missing == []


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*TOLARIA, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, COLUMNS="200"))


def documented_sessions() -> list[tuple[list[str], list[str]]]:
    """``$ tolaria ...`` lines of the README's plain blocks, each with the lines it prints."""
    sessions: list[tuple[list[str], list[str]]] = []
    for block in fenced_blocks(""):
        current: list[str] | None = None  # the output lines of this block's last command
        for line in block.splitlines():
            if line.startswith("$ tolaria "):
                current = []
                sessions.append((shlex.split(line[2:])[1:], current))
            elif current is not None:
                current.append(line)
    return sessions


@pytest.mark.slow
def test_the_documented_errors_are_what_tolaria_prints(tmp_path):
    sessions = documented_sessions()
    assert len(sessions) >= 2
    # The user module the second example names, failing as the README says it does.
    (tmp_path / "mydata.py").write_text("def make():\n    raise ValueError('boom')\n")
    for args, expected in sessions:
        done = _run(args, tmp_path)
        assert (done.returncode, done.stderr.splitlines()) == (2, expected), args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydata.py"]  # nothing left behind


@pytest.mark.slow
def test_config_and_version_run_in_a_clean_directory(tmp_path):
    config = _run(["config"], tmp_path)
    assert config.returncode == 0
    assert TolariaConfig.model_validate(yaml.safe_load(config.stdout)) == TolariaConfig()
    version = _run(["--version"], tmp_path)
    assert version.stdout == f"tolaria {tolaria.__version__}\n"
    assert list(tmp_path.iterdir()) == []


#: The README's make_data body is "..."; this one keeps its signature and returns real data:
#: 8 features, 2 classes.
MAKE_DATA = '''

def make_data(n=2000):
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    cut = n * 4 // 5
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:]), 2
'''


@pytest.mark.slow
def test_bring_your_own_model_runs_from_the_current_directory(tmp_path):
    (command,) = [c for c in CONCRETE if "model.host=mymodels:make_model" in c]
    (tmp_path / "mymodels.py").write_text(file_blocks()["mymodels.py"] + MAKE_DATA)
    # The command as written, for two epochs instead of thirty.
    done = _run([*command[1:], "--set", "run.epochs=2"], tmp_path)
    assert done.returncode == 0, done.stderr
    (summary_file,) = tmp_path.glob("runs/*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 2
    width = 128  # model.kwargs.width reached make_model: Linear(8, 128), Linear(128, 2)
    assert summary["params_initial"] == (8 * width + width) + (width * 2 + 2)


# ---------------------------------------------------------------- "Coming from Lightning"
LIGHTNING = README.split("## Coming from Lightning", 1)[1].split("\n## ", 1)[0]
SPANS = re.findall(r"`([^`]+)`", LIGHTNING)
SECTIONS = "|".join(TolariaConfig.model_fields)
FIELDS = sorted({m for s in SPANS for m in re.findall(rf"\b(?:{SECTIONS})\.[a-z_.]*[a-z_]", s)})
API = sorted({m for s in SPANS for m in re.findall(r"\btolaria\.([A-Za-z_.]*[A-Za-z_])", s)})
SUBCOMMANDS = sorted({m for s in SPANS for m in re.findall(r"^tolaria ([a-z]+)", s)})

def field_exists(path: str) -> bool:
    model: type[BaseModel] = TolariaConfig
    for part in path.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return True  # a mapping field (kwargs): anything below it is a key
        if part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        models = [a for a in (annotation, *typing.get_args(annotation))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        model = models[0] if models else annotation
    return True


def test_the_lightning_table_names_fields_api_and_commands():
    assert len(FIELDS) >= 15 and {"load_model", "build_trainer"} <= set(API)
    assert {"train", "resume"} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("path", FIELDS)
def test_each_config_field_the_lightning_table_names_exists(path):
    assert field_exists(path)


@pytest.mark.parametrize("name", API)
def test_each_api_name_the_lightning_table_names_exists(name):
    target, parts = tolaria, name.split(".")
    for index, part in enumerate(parts):
        try:
            target = getattr(target, part)
        except AttributeError:  # a submodule not imported yet (tolaria.events)
            target = importlib.import_module(".".join(["tolaria", *parts[: index + 1]]))


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_the_lightning_table_names_exists(name):
    assert name in subcommands(_parser())
