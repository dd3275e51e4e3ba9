"""What the nightly sandbox jobs read: the session's files, each refused in one line naming
it when it is not what it should be.

- decision points: ``data/*.json``, a JSON list of ``ReplayBuffer.points()`` entries;
- a policy directory: ``policy.safetensors`` and a ``card.json`` holding the scorer's
  architecture (``scorer``) -- a registry version, or a candidate the train job wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tolaria.academy.registry import CARD_FILE, POLICY_FILE
from tolaria.errors import TolariaError
from tolaria.tamiyo.scorer import CandidateScorer


def load_points(path: Path) -> list[dict[str, Any]]:
    try:
        points = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise TolariaError(f"{path}: not a list of decision points ({exc})") from None
    if not isinstance(points, list):
        raise TolariaError(f"{path}: not a list of decision points")
    return points


def read_policy(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(architecture, tensors)`` of the policy directory ``directory``."""
    directory = Path(directory)
    try:
        architecture = json.loads((directory / CARD_FILE).read_text())["scorer"]
        return dict(architecture), load_file(directory / POLICY_FILE)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise TolariaError(f"{directory}: not a policy directory ({exc!r})") from None


def load_scorer(directory: Path) -> CandidateScorer:
    architecture, tensors = read_policy(directory)
    try:
        return CandidateScorer.from_tensors(architecture, tensors)
    except (TypeError, RuntimeError) as exc:  # an architecture the tensors do not fit
        raise TolariaError(f"{directory}: its tensors do not fit its scorer ({exc})") from None
