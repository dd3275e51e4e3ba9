"""Does the learned base policy v0 grow hosts it has never seen as well as the heuristic?

On tasks *held out of the replay campaign* (a synthetic family the campaign never ran, and
built-in data on host widths it never used), each policy grows the same host with the same
seeds (the input and every hidden layer) and blueprints (the campaign's four), for the same
epochs, once per run seed (>= 3):

- ``heuristic``: Tamiyo's plateau-triggered heuristic (the default policy);
- ``v0``: ``tamiyo.policy: learned`` with the shipped base policy, greedy
  (``tamiyo.temperature: 0``, evaluation).

Per run: test accuracy of the final model, parameters added, grafts tried, grafts culled
(wasted: trained, then thrown away) and where the grafts went (blueprint, and input or
hidden layer).  The goal (ACADEMY.md §6): v0 at least as accurate, with fewer wasted grafts.

Then the nightly sessions on one of those workloads (``rings``, the demo's): ``--sessions``
times, ``--nightly-runs`` daytime runs of the exploring learned champion (seeds from 100, not
the evaluation's) into their own academy, then ``tolaria nightly``'s session; the champion
it leaves, greedy, is measured beside v0 and the heuristic on the same seeds.  Recorded per
session: its outcome, the gates (``history_score`` among them) and the adapter training time
against the design's 30 minutes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import bench_main
from tolaria.academy.campaign import CAMPAIGN_TASKS, GROWTH_SETTINGS, SYNTHETIC
from tolaria.academy.demo import demo_config
from tolaria.academy.nightly import run_session
from tolaria.academy.registry import PolicyRegistry
from tolaria.build import build_trainer
from tolaria.config import load_config
from tolaria.contracts import SeedState
from tolaria.events import Callback
from tolaria.hosts import count_parameters

#: Tasks no campaign run used: checked against ``CAMPAIGN_TASKS`` when the benchmark runs.
HELD_OUT: dict[str, list[str]] = {
    "rings/mlp[32,32]": [SYNTHETIC, "data.kwargs={family: rings, size: 8}",
                         "model.kwargs={hidden: [32, 32]}"],
    "mnist1d/mlp[48]": ["model.kwargs={hidden: [48]}"],
    "digits/mlp[24,24]": ["data.dataset=digits", "model.kwargs={hidden: [24, 24]}"],
}
POLICIES: dict[str, list[str]] = {
    "heuristic": ["tamiyo.policy=heuristic"],
    "v0": ["tamiyo.policy=learned", "tamiyo.policy_version=v0", "tamiyo.temperature=0"],
}
#: The workload of the nightly sessions: the demo's (``tolaria academy demo``).
NIGHTLY_TASK = "rings/mlp[32,32]"
#: The design's target for one adapter training (§7), seconds.
ADAPTER_TARGET_S = 1800.0


class GraftCounter(Callback):
    def __init__(self) -> None:
        self.grafts: Counter[tuple[str, str]] = Counter()
        self.culled = 0

    def on_adaptation(self, trainer, record) -> None:
        if record.to_state is SeedState.GERMINATED:
            where = "input" if record.seed_id.startswith("flatten") else "hidden"
            self.grafts[(record.blueprint, where)] += 1
        elif record.to_state is SeedState.CULLED:
            self.culled += 1


def run_one(task: str, policy: list[str], seed: int, epochs: int, root: str) -> dict[str, Any]:
    config = load_config(overrides=[
        *GROWTH_SETTINGS, *HELD_OUT[task], *policy,
        f"run.epochs={epochs}", f"run.seed={seed}", "run.device=cpu", "run.progress=false",
        "run.tensorboard=false", f"run.runs_root={root}", f"data.cache_dir={root}/cache",
    ])
    counter = GraftCounter()
    trainer = build_trainer(config, callbacks=[counter])
    summary = trainer.train()
    return {
        "test_accuracy": summary["test_accuracy"],
        "params_added": count_parameters(trainer.model) - trainer.params_initial,
        "grafts": sum(counter.grafts.values()),
        "culled": counter.culled,
        "where": {f"{b}@{w}": n for (b, w), n in sorted(counter.grafts.items())},
    }


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def run(args: argparse.Namespace) -> dict[str, Any]:
    seen = {t.name for t in CAMPAIGN_TASKS}
    assert not seen & set(HELD_OUT), "a held-out task is in the campaign"
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for task in HELD_OUT:
            for policy in POLICIES:
                runs = [run_one(task, POLICIES[policy], s, args.epochs, root)
                        for s in range(args.seeds)]
                rows.append(_row(task, policy, runs))
        nightly = run_nightly(args, Path(root))
        champion = nightly["champion"]
        settings = ["tamiyo.policy=learned", f"tamiyo.policy_version={champion}",
                    "tamiyo.temperature=0", f"academy.dir={nightly.pop('academy')}",
                    "academy.replay=false"]
        runs = [run_one(NIGHTLY_TASK, settings, s, args.epochs, root) for s in range(args.seeds)]
        rows.append(_row(NIGHTLY_TASK, f"nightly {champion}", runs))
    by = {(r["task"], r["policy"]): r for r in rows}
    ours = by[(NIGHTLY_TASK, f"nightly {champion}")]["test_accuracy"]["mean"]
    nightly.update({
        f"accuracy_delta_vs_{policy}": ours - by[(NIGHTLY_TASK, policy)]["test_accuracy"]["mean"]
        for policy in POLICIES
    })
    verdicts = {
        task: {
            "accuracy_delta": by[(task, "v0")]["test_accuracy"]["mean"]
            - by[(task, "heuristic")]["test_accuracy"]["mean"],
            "culled_delta": by[(task, "v0")]["culled"]["mean"]
            - by[(task, "heuristic")]["culled"]["mean"],
        }
        for task in HELD_OUT
    }
    return {"epochs": args.epochs, "seeds": args.seeds, "rows": rows, "verdicts": verdicts,
            "nightly": nightly}


def _row(task: str, policy: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    where: Counter[str] = Counter()
    for r in runs:
        where.update(r["where"])
    return {
        "task": task,
        "policy": policy,
        **{k: _mean_std([r[k] for r in runs])
           for k in ("test_accuracy", "params_added", "grafts", "culled")},
        "where": dict(sorted(where.items())),
        "runs": runs,
    }


def run_nightly(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """``args.sessions`` rounds of daytime runs then a nightly session, in one academy."""
    academy = root / "nightly-academy"
    sessions = []
    for round_ in range(args.sessions):
        for k in range(args.nightly_runs):
            seed = 100 + round_ * args.nightly_runs + k
            config = demo_config(academy, seed)
            config.run.epochs = args.epochs
            build_trainer(config, run_dir=academy / "runs" / f"day-{seed}").train()
        record = run_session(academy, demo_config(academy))
        sessions.append({
            **{key: record[key] for key in ("session", "status", "champion", "candidate",
                                            "cause", "failed_gate", "adapter_training_s",
                                            "session_training_s", "validation_divergence")},
            "gates": {name: gate["value"] for name, gate in record["gates"].items()},
            "recent_points": record["replay"].get("recent_points"),
        })
    return {"academy": str(academy), "runs_per_session": args.nightly_runs,
            "sessions": sessions, "champion": PolicyRegistry(academy).champion().name,
            "adapter_target_s": ADAPTER_TARGET_S}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=3,
                        help="nightly sessions on the rings workload, each after its runs")
    parser.add_argument("--nightly-runs", type=int, default=6,
                        help="daytime runs before each nightly session")


def report(result: dict[str, Any]) -> None:
    print(f"Learned v0 vs heuristic on held-out tasks ({result['epochs']} epochs, "
          f"{result['seeds']} seeds; {result['machine']['cpu']})")
    print(f"{'task':<20} {'policy':<10} {'test acc':>14} {'params +':>10} {'grafts':>7} "
          f"{'culled':>7}  where")
    for r in result["rows"]:
        acc = r["test_accuracy"]
        print(f"{r['task']:<20} {r['policy']:<10} {acc['mean']:>8.3f} ± {acc['std']:.3f} "
              f"{r['params_added']['mean']:>10.0f} {r['grafts']['mean']:>7.1f} "
              f"{r['culled']['mean']:>7.1f}  {r['where']}")
    nightly = result["nightly"]
    for s in nightly["sessions"]:
        adapter = s["adapter_training_s"]
        print(f"nightly session {s['session']}: {s['status']} {s['candidate'] or ''} "
              f"(from {s['champion']}), gates {s['gates']}, adapter training "
              f"{'-' if adapter is None else f'{adapter:.1f} s'} (target "
              f"{nightly['adapter_target_s']:.0f} s)")
    print(f"champion {nightly['champion']} on {NIGHTLY_TASK}: "
          f"{nightly['accuracy_delta_vs_v0']:+.3f} test accuracy vs v0, "
          f"{nightly['accuracy_delta_vs_heuristic']:+.3f} vs the heuristic")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main("academy", __doc__.split("\n")[0], argv, configure, run, report)


if __name__ == "__main__":
    main()
