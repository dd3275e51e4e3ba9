"""The nightly policy update: a LoRA adapter on the frozen champion, with EWC (design §6.2.3,
ACADEMY.md §4 step 3).

**Base.** The parent version's *merged* scorer, frozen.  "Merge the previous adapter, attach a
new one" is exactly that: every version's ``policy.safetensors`` already holds base + its own
adapter, merged by peft, so a new adapter goes on those weights.  peft's LoRA wraps each of
the scorer's ``nn.Linear`` layers: ``W + ΔW`` with ``ΔW = (α/r)·B·A``.

**Loss.** The same importance-weighted regression as base policy v0
(:func:`tolaria.academy.pretrain.weighted_loss`) on the *recent* decision points -- the chosen
action's score against its reward, weights ``min(1/propensity, importance_clip)`` -- divided by
the rewards' weighted mean square (:func:`~tolaria.academy.pretrain.reward_spread`), so 1 is
"no better than scoring every action 0" whatever the reward's units; plus the EWC term
``ewc · Σ_layers Σ F ⊙ ΔW²``.  With a frozen base the classic penalty on the base weights is
zero: it is the adapter's update that must not move what the history relied on.

**Fisher.** The diagonal Fisher of the merged base policy's log-likelihood on the historical
points, exact: for ``π = softmax(s/τ)``, ``∇ log π(a|s) = (∇s_a − Σ_b π_b ∇s_b)/τ``, so per
weight ``F = E_s Var_{a∼π(·|s)}[∇_W s_a] / τ²`` -- the π-weighted variance of the per-action
score gradients, summed over the few actions of each point (no sampling).  It is divided by
its mean over all adapted weights: ``Σ F ⊙ ΔW²`` is then a squared norm of the update in
which a weight the history's choices depend on counts more and an idle one less, and the
fit term and the penalty are both of order 1 for a change that matters -- which is what
makes ``ewc = 1`` the default (docs/academy.md has the measurements).

Full-batch Adam, one thread, fixed seeds: the same replay gives the same bytes.  peft is
imported here only, when a session trains: a daytime run never needs it.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from tolaria.academy.pretrain import (
    Examples,
    deterministic,
    examples,
    reward_spread,
    weighted_loss,
)
from tolaria.config import NightlyConfig
from tolaria.errors import ConfigError, TolariaError
from tolaria.tamiyo.scorer import CandidateScorer

ADAPTER_NAME = "default"  # peft's: one adapter per candidate
CANDIDATE_DIR = "candidate"


def lora_targets(scorer: nn.Module) -> list[str]:
    """The scorer's ``nn.Linear`` layers by name: what LoRA adapts."""
    return [name for name, module in scorer.named_modules() if isinstance(module, nn.Linear)]


def segment_softmax(
    wait: torch.Tensor, rows: torch.Tensor, point: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's ``softmax(scores / τ)`` over wait and its candidate rows, float64:
    (``π(wait)`` [P], ``π(row)`` [M])."""
    wait, rows = wait.double() / temperature, rows.double() / temperature
    top = wait.scatter_reduce(0, point, rows, reduce="amax")
    e_wait, e_rows = (wait - top).exp(), (rows - top[point]).exp()
    total = e_wait.index_add(0, point, e_rows)
    return e_wait / total, e_rows / total[point]


def fisher_diagonal(
    scorer: CandidateScorer, history: Examples, temperature: float
) -> dict[str, torch.Tensor]:
    """``F`` of every adapted layer's weight, ``[out, in]``, normalised to mean 1 over all of
    them (all zero when the policy is certain everywhere: nothing to protect)."""
    if temperature <= 0:
        raise ConfigError("the EWC Fisher needs a stochastic policy: temperature must be > 0")
    from torch.func import functional_call, grad, vmap

    weights = {f"{name}.weight": scorer.get_submodule(name).weight.detach()
               for name in lora_targets(scorer)}

    def wait_score(w, g, c):  # one point's wait score, seen beside candidate row c
        return functional_call(scorer, w, (g, c[None]))[0]

    def row_score(w, g, c):  # candidate row c's score at a point of global features g
        return functional_call(scorer, w, (g, c[None]))[1]

    g, c, point = history.global_features, history.candidates, history.point
    # Every point has a row, so the wait gradient of a point is taken at its first row.
    first = torch.zeros(len(g), dtype=torch.long).scatter_reduce(
        0, point, torch.arange(len(c)), reduce="amin", include_self=False
    )
    with torch.no_grad():
        pi_wait, pi_rows = segment_softmax(*scorer.score_batch(g, c, point), point, temperature)
    grad_wait = vmap(grad(wait_score), in_dims=(None, 0, 0))(weights, g, c[first])
    grad_rows = vmap(grad(row_score), in_dims=(None, 0, 0))(weights, g[point], c)
    fisher = {}
    for key in weights:
        jw, jr = grad_wait[key].double(), grad_rows[key].double()
        shape = (-1, *[1] * (jw.dim() - 1))
        first_moment = (pi_wait.view(shape) * jw).index_add(0, point, pi_rows.view(shape) * jr)
        second_moment = (pi_wait.view(shape) * jw.square()).index_add(
            0, point, pi_rows.view(shape) * jr.square()
        )
        # Var_π[J] = E_π[J²] − E_π[J]² per point.  Wait's gradient lives in the wait head and
        # the rows' in the candidate MLP (each is 0 in the other), so one sum covers both.
        variance = (second_moment - first_moment.square()).clamp(min=0)
        # Detached: the per-sample gradients are functions of the scorer's own parameters.
        fisher[key.removesuffix(".weight")] = variance.mean(0).detach() / temperature**2
    scale = torch.cat([f.flatten() for f in fisher.values()]).mean()
    return {name: (f / scale if scale > 0 else f).float() for name, f in fisher.items()}


@dataclass
class NightlyAdapter:
    """A trained candidate: the base with its new adapter (peft, unmerged), and how it went."""

    model: Any  # peft.PeftModel
    architecture: dict[str, Any]
    parent: str | None
    steps: int
    loss_first: float
    loss_last: float
    fit_last: float
    ewc_penalty_last: float
    examples: int
    history_points: int
    training_s: float

    def merged(self) -> dict[str, torch.Tensor]:
        """The candidate's weights: base + adapter, merged by peft (the scorer's keys)."""
        merged = copy.deepcopy(self.model).merge_and_unload()
        return {name: t.detach().clone().contiguous() for name, t in merged.state_dict().items()}

    def scorer(self) -> CandidateScorer:
        return CandidateScorer.from_tensors(self.architecture, self.merged())

    def save(self, directory: Path) -> Path:
        """``directory/policy.safetensors`` (merged), ``adapter/`` (peft's own
        ``save_pretrained`` files) and a ``card.json`` draft (parent, scorer, trained_on,
        training_s) the session completes when it registers the version."""
        from tolaria.academy.registry import ADAPTER_DIR, CARD_FILE, POLICY_FILE

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory / ADAPTER_DIR)
        # peft adds a model-card template ("[More Information Needed]"): the card is ours.
        (directory / ADAPTER_DIR / "README.md").unlink(missing_ok=True)
        save_file(self.merged(), directory / POLICY_FILE)
        card = {
            "parent": self.parent,
            "scorer": self.architecture,
            "trained_on": {"examples": self.examples, "history_points": self.history_points},
            "training_s": round(self.training_s, 3),
        }
        (directory / CARD_FILE).write_text(json.dumps(card, indent=1) + "\n")
        return directory


def ewc_penalty(model: Any, fisher: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``Σ_layers Σ F ⊙ ΔW²``, ``ΔW`` as peft defines it (``get_delta_weight``: ``(α/r)·B·A``)."""
    layers = dict(model.get_base_model().named_modules())
    return sum(
        (f * layers[name].get_delta_weight(ADAPTER_NAME).square()).sum()
        for name, f in fisher.items()
    )


def train_nightly_policy(
    base: CandidateScorer,
    recent: Sequence[Mapping[str, Any]],
    history: Sequence[Mapping[str, Any]],
    settings: NightlyConfig,
    *,
    temperature: float,
    seed: int,
    parent: str | None = None,
) -> NightlyAdapter:
    """Design §6.2.3: freeze ``base`` (the parent's merged scorer), attach a new LoRA adapter,
    train it on the ``recent`` decision points with the EWC penalty of the ``history``
    points (replay points as ``ReplayBuffer.points()`` gives them)."""
    from peft import LoraConfig, get_peft_model

    started = time.perf_counter()
    try:
        data = examples(recent, max_weight=settings.importance_clip)
    except ValueError:
        raise TolariaError(
            "no recent decision point with a known outcome and propensity to train on"
        ) from None
    try:
        past = examples(history, max_weight=settings.importance_clip)
    except ValueError:
        past = None  # no history: nothing to protect, no penalty
    frozen = copy.deepcopy(base).eval().requires_grad_(False)  # the base policy, frozen
    fisher = {} if past is None else fisher_diagonal(frozen, past, temperature)
    scale = reward_spread(data) ** 2
    # A list would be stored as a set and written in hash order: one exact-match regex keeps
    # adapter_config.json the same bytes on every run.
    targets = "|".join(re.escape(name) for name in lora_targets(frozen))
    with deterministic(seed):
        model = get_peft_model(frozen, LoraConfig(
            r=settings.rank, lora_alpha=settings.alpha, target_modules=targets,
            lora_dropout=0.0, bias="none",
        ))
        scorer = model.get_base_model()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=settings.lr, foreach=False)

        def objective() -> tuple[torch.Tensor, torch.Tensor]:
            fit = weighted_loss(scorer, data) / scale
            penalty = ewc_penalty(model, fisher) if fisher else torch.zeros(())
            return fit, penalty

        loss_first = None
        for _ in range(settings.steps):
            optimizer.zero_grad(set_to_none=True)
            fit, penalty = objective()
            loss = fit + settings.ewc * penalty
            loss_first = float(loss.detach()) if loss_first is None else loss_first
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            fit, penalty = objective()
    model.eval()
    return NightlyAdapter(
        model=model,
        architecture=dict(base.architecture),
        parent=parent,
        steps=settings.steps,
        loss_first=loss_first,
        loss_last=float(fit + settings.ewc * penalty),
        fit_last=float(fit),
        ewc_penalty_last=float(settings.ewc * penalty),
        examples=len(data),
        history_points=0 if past is None else len(past),
        training_s=time.perf_counter() - started,
    )


def train_job(payload: Mapping[str, Any], scratch: Path) -> dict[str, Any]:
    """The sandbox job (nightly contract): train the candidate on ``payload``'s base version,
    recent and history points; write it to ``scratch/candidate/``."""
    from tolaria.academy.job_inputs import load_points
    from tolaria.academy.registry import CARD_FILE, read_version

    base_dir = Path(payload["base"])
    try:
        name = json.loads((base_dir / CARD_FILE).read_text())["version"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TolariaError(f"{base_dir}: not a policy version ({exc!r})") from None
    parent = read_version(base_dir, name)
    base = CandidateScorer.from_tensors(parent.card["scorer"], parent.tensors)
    adapter = train_nightly_policy(
        base,
        load_points(payload["recent"]),
        load_points(payload["history"]),
        NightlyConfig.model_validate(payload["settings"]),
        temperature=float(payload["temperature"]),
        seed=int(payload["seed"]),
        parent=name,
    )
    candidate = adapter.save(Path(scratch) / CANDIDATE_DIR)
    return {
        "candidate": str(candidate),
        "training_s": round(adapter.training_s, 3),
        "steps": adapter.steps,
        "loss_first": adapter.loss_first,
        "loss_last": adapter.loss_last,
        "fit_last": adapter.fit_last,
        "ewc_penalty_last": adapter.ewc_penalty_last,
        "examples": adapter.examples,
        "history_points": adapter.history_points,
    }
