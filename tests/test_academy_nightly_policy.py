"""The nightly policy learning: snapshots, the LoRA adapter with EWC, the validation gates."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from test_tamiyo_policy import dormant, observe, telemetry
from tolaria.academy import gates
from tolaria.academy.adapter import fisher_diagonal, lora_targets, train_job
from tolaria.academy.campaign import SYNTHETIC, CampaignTask, campaign_config
from tolaria.academy.job_inputs import load_scorer
from tolaria.academy.pretrain import examples, logged_candidates
from tolaria.academy.registry import BUILTIN_V0, read_version
from tolaria.academy.replay import ReplayBuffer
from tolaria.academy.snapshot import (
    continue_snapshot,
    create_training_snapshot,
    load_snapshot,
    save_snapshot,
)
from tolaria.build import build_trainer
from tolaria.config import NightlyConfig
from tolaria.errors import CheckpointError, RepeatedFailureError, TolariaError
from tolaria.tamiyo.features import GLOBAL_FEATURES, encode
from tolaria.tamiyo.growth import candidates
from tolaria.tamiyo.policy import Observation
from tolaria.tamiyo.scorer import CandidateScorer

TEMPERATURE = 0.02  # the daytime default: the Fisher's and the diversity gate's policy
CPU = {"device_type": "cpu", "device_name": "x86", "cpu_count": 2, "memory_gib": 8}
CUDA = {"device_type": "cuda", "device_name": "H100", "cpu_count": 32, "memory_gib": 512,
        "cuda_memory_gib": 80}


def v0_scorer() -> CandidateScorer:
    version = read_version(BUILTIN_V0, "v0")
    return CandidateScorer.from_tensors(version.card["scorer"], version.tensors)


def points_on(observations, chosen=0, reward=0.0, propensity=0.5) -> list[dict]:
    """Decision points as the replay gives them, one per observation."""
    return [{"observation": obs.to_dict(), "run_id": "r", "task": "t", "point_id": f"p{i}",
             "candidates": [c.to_dict() for c in candidates(obs, budget=obs.param_budget_left)],
             "chosen": chosen, "propensity": propensity, "reward": reward}
            for i, obs in enumerate(observations)]


def small_points() -> list[dict]:
    """Five points of one to three dormant seeds with different telemetry and scores."""
    return points_on(
        observe([dormant(f"a.{j}", telemetry(f"a.{j}", dead=0.1 * i * j, grad=1.0 + j))
                 for j in range(1 + i % 3)], acc=0.5 + 0.05 * i)
        for i in range(5)
    )


def constant_scorer(wait: float = 0.0, candidate: float = 0.0) -> CandidateScorer:
    """Every wait scored ``wait``, every candidate ``candidate`` (biases only)."""
    scorer = CandidateScorer.build()
    with torch.no_grad():
        for parameter in scorer.parameters():
            parameter.zero_()
        scorer.wait[-1].bias.fill_(wait)
        scorer.candidate[-1].bias.fill_(candidate)
    return scorer.eval()


# ------------------------------------------------------------------------------ the Fisher
def test_the_fisher_is_the_exact_categorical_fisher_of_the_softmax_policy():
    """Against the definition, action by action: F = E_s Σ_a π(a|s) (∇_W log π(a|s))²."""
    scorer, points = v0_scorer(), small_points()
    fisher = fisher_diagonal(scorer, examples(points), TEMPERATURE)
    layers = {name: scorer.get_submodule(name).weight for name in lora_targets(scorer)}
    brute = {name: torch.zeros_like(w, dtype=torch.float64) for name, w in layers.items()}
    for point in points:
        observation = Observation.from_dict(point["observation"])
        log_pi = torch.log_softmax(
            scorer(*encode(observation, logged_candidates(observation, point["candidates"])))
            .double() / TEMPERATURE, dim=0)
        for a in range(len(log_pi)):
            grads = torch.autograd.grad(log_pi[a], list(layers.values()), retain_graph=True)
            for name, g in zip(layers, grads, strict=True):
                brute[name] += log_pi[a].exp().detach() * g.double().square() / len(points)
    mean = torch.cat([b.flatten() for b in brute.values()]).mean()
    assert set(fisher) == set(layers) == {"candidate.0", "candidate.2", "candidate.4",
                                          "wait.0", "wait.2"}
    for name in layers:
        assert fisher[name].shape == layers[name].shape
        torch.testing.assert_close(fisher[name].double(), brute[name] / mean,
                                   rtol=1e-4, atol=1e-6)
    assert float(torch.cat([f.flatten() for f in fisher.values()]).mean()) == pytest.approx(1.0)


def test_the_fisher_of_a_greedy_policy_is_refused_in_one_line():
    with pytest.raises(TolariaError, match="temperature must be > 0"):
        fisher_diagonal(v0_scorer(), examples(small_points()), 0.0)


# ------------------------------------------------------------------------------ the gates
def test_history_task_score_caps_at_one_and_handles_non_positive_and_unfinished_scores():
    assert gates.task_score(0.45, 0.5) == pytest.approx(0.9)
    assert gates.task_score(0.9, 0.5) == 1.0  # one lucky task cannot hide another's regression
    assert gates.task_score(-0.2, 0.5) == 0.0
    # min-mode monitors are stored negated (-mse): twice the champion's error scores 0.5.
    assert gates.task_score(-0.2, -0.1) == pytest.approx(0.5)
    assert gates.task_score(-0.05, -0.1) == 1.0
    assert gates.task_score(0.0, 0.0) == 1.0 and gates.task_score(-0.1, 0.0) == 0.0
    assert gates.task_score(math.nan, 0.5) == 0.0 and gates.task_score(0.3, math.nan) == 1.0
    assert gates.history_score([(0.45, 0.5), (0.9, 0.5)]) == pytest.approx(0.95)
    with pytest.raises(TolariaError, match="at least one historical task"):
        gates.history_score([])


def test_diversity_is_zero_for_always_wait_and_always_one_blueprint_and_one_for_uniform():
    points = small_points()  # every seed offers the same two blueprints
    assert gates.diversity_score(constant_scorer(wait=1.0), points, TEMPERATURE) < 1e-6
    assert gates.diversity_score(constant_scorer(candidate=1.0), points, TEMPERATURE) \
        == pytest.approx(math.log(2) / math.log(3))  # never waits: two of three categories
    single = [p for p in points if len(p["candidates"]) == 2]  # one seed: wait, A, B
    assert gates.diversity_score(constant_scorer(), single, TEMPERATURE) == pytest.approx(1.0)
    blueprints = {c["blueprint"] for p in points for c in p["candidates"]}
    assert set(gates.marginal_actions(constant_scorer(), points, 0.0)) == {"wait", *blueprints}


def test_hardware_stability_flips_for_a_policy_that_reads_the_device_and_not_on_noise():
    points = small_points()
    assert gates.hardware_stability(v0_scorer(), points, [CPU], 0.0, seed=0) == 1.0
    # A policy that grafts only on an accelerator flips on every point under a CUDA profile.
    reads_device = constant_scorer(candidate=0.25)  # wait: 0.5 on a CPU, 0 on CUDA
    with torch.no_grad():
        reads_device.wait[0].weight[0, GLOBAL_FEATURES.index("accelerator")] = -1.0
        reads_device.wait[0].bias[0] = 0.5
        reads_device.wait[2].weight[0, 0] = 1.0
    assert gates.hardware_stability(reads_device, points, [CPU, CUDA], 0.0, seed=0) == 0.5
    # Noise moves the measured numbers by at most ±noise, deterministically.
    observation = points[1]["observation"]
    varied = gates.varied_observation(observation, None, 0.01, np.random.default_rng([0, 1]))
    packet = observation["packet"]
    assert varied.packet.validation_loss != packet["validation_loss"]
    assert abs(varied.packet.validation_loss / packet["validation_loss"] - 1) <= 0.01
    assert varied == gates.varied_observation(observation, None, 0.01,
                                              np.random.default_rng([0, 1]))
    assert varied.param_budget_left == observation["param_budget_left"]  # exact, not measured


def test_a_cuda_profile_is_unmirrorable_on_a_cpu_box_and_cpu_always_mirrorable():
    assert gates.unmirrorable(CPU) is None
    if not torch.cuda.is_available():
        assert gates.unmirrorable(CUDA) == "no cuda device on this machine"


def test_validation_divergence_is_the_mean_total_variation_distance():
    points = small_points()
    v0 = v0_scorer()
    assert gates.validation_divergence(v0, v0, points, TEMPERATURE) == 0.0
    waits, grafts = constant_scorer(wait=1.0), constant_scorer(candidate=1.0)
    assert gates.validation_divergence(waits, grafts, points, TEMPERATURE) == pytest.approx(1.0)


def test_the_report_names_the_first_failing_gate_in_the_designs_order_and_is_strict():
    thresholds = {"history_score": 0.95, "hardware_stability": 0.97, "diversity_score": 0.4}
    report = gates.GateReport({"history_score": 0.99, "hardware_stability": 0.97,
                               "diversity_score": 0.1}, thresholds)
    assert report.failed_gate == "hardware_stability" and not report.passed
    assert report.to_dict()["gates"]["diversity_score"] == {
        "value": 0.1, "threshold": 0.4, "passed": False}
    passing = gates.GateReport({"history_score": 1.0, "hardware_stability": 1.0,
                                "diversity_score": 0.5}, thresholds)
    assert passing.passed and passing.to_dict()["failed_gate"] is None


# ------------------------------------------------------------------------------ snapshots
def _tiny_config(tmp_path: Path):
    task = CampaignTask("clusters", (SYNTHETIC, "data.kwargs={family: clusters, size: 8, n: 400}",
                                     "model.kwargs={hidden: [8]}"))
    return campaign_config(task, 0, 4, tmp_path)


def test_a_snapshot_round_trips_and_continues_deterministically(tmp_path):
    config = _tiny_config(tmp_path)
    snapshot = create_training_snapshot(config.model_dump(mode="json"), run_id="run-1",
                                        task="clusters", hardware_env=CPU)
    assert list(snapshot) == ["model", "tamiyo", "optimizer", "hardware_env", "config", "task",
                              "run_id"]
    assert snapshot["hardware_env"] == CPU and set(snapshot["optimizer"].values()) == {"host"}
    loaded = load_snapshot(save_snapshot(snapshot, tmp_path / "s" / "0.pt"))
    assert loaded["tamiyo"] == snapshot["tamiyo"] and loaded["config"] == snapshot["config"]
    scores = [continue_snapshot(loaded, policy_dir=BUILTIN_V0, epochs=3, scratch=tmp_path / "x")
              for _ in range(2)]
    assert scores[0] == scores[1] and 0.0 < scores[0] <= 1.0
    assert list((tmp_path / "x").iterdir()) == []  # its scratch academy is gone


def test_a_snapshot_that_does_not_match_its_rebuilt_system_is_refused(tmp_path):
    snapshot = create_training_snapshot(_tiny_config(tmp_path), run_id="run-2", task="c",
                                        hardware_env=CPU)
    name = next(iter(snapshot["model"]))
    snapshot["model"][name] = snapshot["model"][name] + 1.0
    with pytest.raises(TolariaError, match="run run-2: the rebuilt host's weights differ"):
        continue_snapshot(snapshot, policy_dir=BUILTIN_V0, epochs=1, scratch=tmp_path / "x")


def test_a_run_that_cannot_be_rebuilt_here_is_one_line_naming_it(tmp_path):
    config = _tiny_config(tmp_path).model_dump(mode="json")
    config["data"]["dataset"] = "no_such_module_here:data"
    with pytest.raises(TolariaError, match=r"^run run-3: cannot be rebuilt here: .*no_such_mod"):
        create_training_snapshot(config, run_id="run-3", task="c", hardware_env=CPU)
    (tmp_path / "bad.pt").write_bytes(b"not a snapshot")
    with pytest.raises(CheckpointError, match=r"bad\.pt: not a training snapshot"):
        load_snapshot(tmp_path / "bad.pt")


# ------------------------------------------------------------------------ a workload's replay
HISTORY_TASKS = (
    CampaignTask("clusters", (SYNTHETIC, "data.kwargs={family: clusters, size: 12, n: 600}",
                              "model.kwargs={hidden: [16, 16]}")),
    CampaignTask("motifs", (SYNTHETIC, "data.kwargs={family: motifs, size: 16, n: 600}",
                            "model.kwargs={hidden: [16]}")),
)
#: The workload: a family the v0 campaign never saw.
WORKLOAD = CampaignTask("rings", (SYNTHETIC, "data.kwargs={family: rings, size: 8, n: 600}",
                                  "model.kwargs={hidden: [16, 16]}"))
#: An EWC weight whose effect on this tiny replay is far above the noise.
EWC_THAT_SHOWS = 100.0
#: The gates' tiny settings: the history gate continues each task's snapshot for 4 epochs.
SETTINGS = NightlyConfig(history_epochs=4)


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    """Daytime runs with the campaign's exploring policy (8 epochs each): four of each
    historical task, then six of the workload (four recent, two held out); the session's
    files (data/*.json, snapshots/*.pt) as the nightly session writes them."""
    root = tmp_path_factory.mktemp("nightly")
    plan = [(task, seed) for task in HISTORY_TASKS for seed in range(4)]
    plan += [(WORKLOAD, 10 + seed) for seed in range(6)]
    for index, (task, seed) in enumerate(plan):
        config = campaign_config(task, seed, 8, root)
        with contextlib.suppress(RepeatedFailureError):
            build_trainer(config, run_dir=root / "runs" / f"{index:02d}").train()
    with ReplayBuffer.in_academy(root / "academy") as buffer:
        points, runs = buffer.points(), buffer.runs()
    work = sorted({p["run_id"] for p in points if "rings" in p["task"]})
    split = {
        "history": [p for p in points if "rings" not in p["task"]],
        "recent": [p for p in points if "rings" in p["task"] and p["run_id"] not in work[-2:]],
        "held_out": [p for p in points if p["run_id"] in work[-2:]],
    }
    files = {}
    for name, chosen in split.items():
        files[name] = root / "data" / f"{name}.json"
        files[name].parent.mkdir(exist_ok=True)
        files[name].write_text(json.dumps(chosen))
    newest = {run["task"]: run for run in runs if "rings" not in run["task"]}
    files["snapshots"] = [
        save_snapshot(create_training_snapshot(run["config"], run_id=run["run_id"], task=task,
                                               hardware_env=run["hardware"]),
                      root / "snapshots" / f"{k}.pt")
        for k, (task, run) in enumerate(sorted(newest.items()))
    ]
    files["profiles"] = sorted({json.dumps(run["hardware"], sort_keys=True) for run in runs})
    return {"root": root, "points": split, **files}


#: The blueprint a corrupted reward favours (``_corrupted(..., "favour")``).
FAVOURED = "residual_mlp"


def _corrupted(replay, how: str) -> Path:
    """The recent points with rewards corrupted: ``favour`` pays 1 for grafting
    ``FAVOURED`` and 0 for anything else, ``flip`` negates every reward (what paid now
    costs)."""
    points = json.loads(replay["recent"].read_text())
    for point in points:
        if point["reward"] is None:
            continue
        if how == "favour":
            chosen = point["candidates"][point["chosen"] - 1] if point["chosen"] else None
            point["reward"] = float(chosen is not None and chosen["blueprint"] == FAVOURED)
        else:
            point["reward"] = -point["reward"]
    path = replay["root"] / "data" / f"recent-{how}.json"
    path.write_text(json.dumps(points))
    return path


def _night(replay, scratch: Path, *, recent: Path | None = None, ewc: float | None = None):
    """train_job then validate_job, as the session runs them in the sandbox."""
    settings = SETTINGS if ewc is None else SETTINGS.model_copy(update={"ewc": ewc})
    trained = train_job({
        "base": str(BUILTIN_V0), "recent": str(recent or replay["recent"]),
        "history": str(replay["history"]), "settings": settings.model_dump(), "seed": 0,
        "temperature": TEMPERATURE,
    }, scratch)
    validated = gates.validate_job({
        "candidate": trained["candidate"], "champion": str(BUILTIN_V0),
        "held_out": str(replay["held_out"]), "snapshots": [str(p) for p in replay["snapshots"]],
        "profiles": [json.loads(p) for p in replay["profiles"]] + [CUDA],
        "settings": settings.model_dump(), "seed": 0, "temperature": TEMPERATURE,
    }, scratch)
    return trained, validated


@pytest.fixture(scope="module")
def own_night(replay, tmp_path_factory):
    return _night(replay, tmp_path_factory.mktemp("own"))


def _gate_values(validated) -> dict[str, float]:
    return {name: gate["value"] for name, gate in validated["gates"].items()}


@pytest.mark.slow
def test_an_adapter_on_the_workloads_own_replay_passes_every_gate(own_night, replay):
    trained, validated = own_night
    assert validated["failed_gate"] is None, _gate_values(validated)
    assert all(gate["passed"] for gate in validated["gates"].values())
    assert trained["examples"] == sum(p["reward"] is not None and p["propensity"] is not None
                                      for p in replay["points"]["recent"])
    assert trained["loss_last"] < trained["loss_first"]
    assert trained["loss_last"] == pytest.approx(trained["fit_last"] + trained["ewc_penalty_last"])
    assert [h["task"] for h in validated["history"]] == sorted(
        {p["task"] for p in replay["points"]["history"]})
    assert validated["profiles_tested"] == [json.loads(p) for p in replay["profiles"]]
    assert validated["profiles_unmirrorable"] == (
        [] if torch.cuda.is_available() else [{"profile": CUDA, "why": "no cuda device on "
                                                                       "this machine"}])
    assert 0.0 < validated["validation_divergence"] <= 1.0


@pytest.mark.slow
def test_an_adapter_trained_on_corrupted_rewards_is_rejected_by_the_diversity_gate(
    replay, tmp_path
):
    """A reward that pays for one blueprint only: the adapter collapses onto it
    (measured: residual_mlp 1.0, diversity 2e-8), which the history and stability gates
    cannot see (1.0 and 1.0) and the diversity gate refuses.  (Rewarding every graft +1 no
    longer fails a gate: with seeds that cannot wreck their host, grafting everywhere
    scored 1.0 on history, and it spreads over blueprints: diversity 0.68.)"""
    _, validated = _night(replay, tmp_path, recent=_corrupted(replay, "favour"))
    assert validated["failed_gate"] == "diversity_score", _gate_values(validated)
    marginal = gates.marginal_actions(load_scorer(tmp_path / "candidate"),
                                      replay["points"]["held_out"], TEMPERATURE)
    assert marginal[FAVOURED] > 0.99, marginal


@pytest.mark.slow
def test_ewc_limits_forgetting_of_the_historical_tasks(replay, tmp_path):
    """A replay that pulls away from the history (what paid there costs now: every reward
    negated), with and without the penalty: the penalty keeps the policy's choices on the
    historical points nearer the champion's (measured at weight 100: mean TV 0.93 without,
    0.53 with) and its history score no lower (1.0 and 1.0).  At the default weight (10)
    the difference on this replay is within 0.01 (docs/academy.md, "Nightly learning")."""
    recent = _corrupted(replay, "flip")
    history, v0 = replay["points"]["history"], v0_scorer()
    measured = {}
    for ewc in (0.0, EWC_THAT_SHOWS):
        _, validated = _night(replay, tmp_path / f"ewc-{ewc}", recent=recent, ewc=ewc)
        candidate = load_scorer(tmp_path / f"ewc-{ewc}" / "candidate")
        measured[ewc] = {
            "history_score": validated["gates"]["history_score"]["value"],
            "divergence_on_history": gates.validation_divergence(candidate, v0, history,
                                                                 TEMPERATURE),
        }
    free, held = measured[0.0], measured[EWC_THAT_SHOWS]
    assert held["divergence_on_history"] < free["divergence_on_history"] - 0.2, measured
    assert held["history_score"] >= free["history_score"], measured


@pytest.mark.slow
def test_the_merged_tensors_are_peft_s_merge_of_the_base_and_the_saved_adapter(own_night):
    from peft import PeftModel
    from safetensors.torch import load_file

    trained, _ = own_night
    candidate = Path(trained["candidate"])
    assert sorted(p.name for p in (candidate / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    merged = load_file(candidate / "policy.safetensors")
    reloaded = PeftModel.from_pretrained(v0_scorer(), candidate / "adapter").merge_and_unload()
    expected = reloaded.state_dict()
    assert set(merged) == set(v0_scorer().state_dict())
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name
    assert any(not torch.equal(merged[n], t) for n, t in v0_scorer().state_dict().items())
    config = json.loads((candidate / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (SETTINGS.rank, SETTINGS.alpha)


@pytest.mark.slow
def test_training_and_validation_are_deterministic_on_cpu(own_night, replay, tmp_path):
    trained, validated = own_night
    again_trained, again_validated = _night(replay, tmp_path)
    first, second = Path(trained["candidate"]), Path(again_trained["candidate"])
    files = ["policy.safetensors", "card.json", "adapter/adapter_config.json",
             "adapter/adapter_model.safetensors"]
    for name in files:
        if name == "card.json":  # its training_s is a wall time
            drop = lambda card: {k: v for k, v in card.items() if k != "training_s"}  # noqa: E731
            assert drop(json.loads((first / name).read_text())) == drop(
                json.loads((second / name).read_text()))
        else:
            assert (first / name).read_bytes() == (second / name).read_bytes(), name
    for key in ("loss_first", "loss_last", "ewc_penalty_last", "examples"):
        assert trained[key] == again_trained[key]
    assert validated == again_validated
