"""Does the dashboard answer fast and stay small over many runs and a long one?

A runs root of ``--runs`` synthetic run directories (30 epochs and ~40 events each, the
records ``tolaria train`` writes) plus one run of ``--events`` events (a long run: decisions
with their features, adaptations, outcomes, checkpoints).  Server-side times are medians of
``--rounds`` requests through Starlette's in-process test client (the ASGI app called
directly: no sockets, so the figure is the server's own work):

- ``index``: ``GET /``, every run polled (``stat`` calls) and rendered;
- ``run_page``: ``GET /runs/long``, the run page of the long run;
- ``poll_unchanged``: the live page's poll when nothing changed;
- ``poll_after_append``: the poll after one more epoch's records were appended;
- ``cold_run_page``: the long run's first page in a fresh app (its 10,000 events parsed).

Memory: the resident set of a real ``tolaria dashboard`` process (a child) after it served
the index, the long run's page and its JSON ``--rounds`` times each over HTTP.
Goals (issue 14): < 200 ms server side, < 200 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import bench_main, median
from tolaria import records

GOAL_MS = 200.0
GOAL_MB = 200.0
REPO = Path(__file__).resolve().parent.parent


def _line(**fields: Any) -> str:
    return records.encode({"schema": 1, "attempt": 1, **fields}) + "\n"


def _epoch(epoch: int, rng: random.Random, params: int, state: str) -> str:
    acc = min(0.99, 0.5 + 0.01 * epoch + rng.random() * 0.02)
    return _line(event="epoch_end", epoch=epoch, global_step=50 * (epoch + 1),
                 train_loss=rng.random(), val_loss=rng.random(), val_accuracy=acc,
                 val_metrics={"accuracy": acc}, lr=0.01, params=params,
                 seed_states={"hidden.0": state, "hidden.1": "dormant"}, adaptations=1,
                 rollback=False)


def _events_of_epoch(epoch: int, rng: random.Random, t: float) -> list[str]:
    """Ten records like a growing run's epoch: a decision (with its features), its
    adaptation, an outcome of an older decision, a checkpoint and a few more of each."""
    features = {"training_loss": rng.random(), "param_budget_left": 10_000, "seeds_on_trial": 1,
                "from_state": "training", "epochs_in_state": 2,
                "telemetry": {k: rng.random() for k in (
                    "activation_mean", "activation_var", "dead_fraction", "saturated_fraction",
                    "grad_norm", "delta_ratio", "health")},
                "evidence": {"score": rng.random(), "epochs_since_improvement": 1}}
    out = []
    for i in range(3):
        d = f"d{epoch * 3 + i}"
        out.append(_line(event="decision", epoch=epoch, decision_id=d, seed_id="hidden.0",
                         action="blending", blueprint="residual_mlp", reason="trained 2 epochs",
                         validation_loss=rng.random(), validation_accuracy=rng.random(),
                         param_cost=120, features=features, time=t))
        out.append(_line(event="adaptation", epoch=epoch, seed_id="hidden.0",
                         from_state="training", to_state="blending", reason="trained",
                         blueprint="residual_mlp", time=t))
        if epoch:
            out.append(_line(event="outcome", epoch=epoch, decision_id=f"d{(epoch - 1) * 3 + i}",
                             seed_id="hidden.0", action="blending", blueprint="residual_mlp",
                             epochs_later=1, delta_validation_accuracy=0.01,
                             delta_validation_loss=-0.01, param_cost=120, incident=None, time=t))
    out.append(_line(event="checkpoint_saved", epoch=epoch, path=f"checkpoints/c{epoch}", time=t))
    return out


def write_run(folder: Path, epochs: int, events: int, rng: random.Random) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"run: {{epochs: {epochs}}}\ntamiyo: {{policy: "
                                        "heuristic}\n")
    t = time.time() - 3600
    metrics, logged = [], [_line(event="run_start", epoch=0, epochs=epochs, params=1000,
                                 device="cpu", time=t)]
    for epoch in range(epochs):
        metrics.append(_epoch(epoch, rng, 1000 + 120 * (epoch > 0), "blending" if epoch else
                              "dormant"))
        logged += _events_of_epoch(epoch, rng, t + epoch)
    logged = logged[:events]
    (folder / "metrics.jsonl").write_text("".join(metrics))
    (folder / "events.jsonl").write_text("".join(logged))
    (folder / "status.json").write_text(json.dumps({
        "schema": 1, "phase": "completed", "epoch": epochs, "epochs": epochs, "attempt": 1,
        "heartbeat": t + epochs, "started": t, "pid": 1, "host": "elsewhere"}))
    (folder / "summary.json").write_text(json.dumps({"status": "completed", "rollbacks": 0}))


def build_root(root: Path, runs: int, events: int) -> int:
    """``runs`` ordinary runs and one ``long`` run of ``events`` events; the long run's
    epoch count."""
    rng = random.Random(0)
    for i in range(runs):
        write_run(root / f"run-{i:03d}", 30, 40, rng)
    long_epochs = events // 10 + 1  # ten records an epoch (fewer in the first)
    write_run(root / "long", long_epochs, events, rng)
    return long_epochs


def timed_ms(client, path: str, params: dict | None = None) -> tuple[float, Any]:
    start = time.perf_counter()
    answer = client.get(path, params=params)
    elapsed = (time.perf_counter() - start) * 1000
    assert answer.status_code == 200, (path, answer.status_code, answer.text[:200])
    return elapsed, answer


def server_times(root: Path, rounds: int, epochs: int) -> dict[str, float]:
    from starlette.testclient import TestClient

    from tolaria.dashboard.app import create_app

    def fresh():
        return TestClient(create_app(root, root / "academy"), base_url="http://127.0.0.1")

    cold, _ = timed_ms(fresh(), "/runs/long")
    client = fresh()
    samples: dict[str, list[float]] = {"index": [], "run_page": [], "poll_unchanged": [],
                                       "poll_after_append": []}
    rng = random.Random(1)
    for round_ in range(rounds + 1):  # the first round warms the views up, unrecorded
        index_ms, _ = timed_ms(client, "/")
        page_ms, _ = timed_ms(client, "/runs/long")
        _, first = timed_ms(client, "/runs/long/sections")
        cursor = first.json()["cursor"]
        unchanged_ms, same = timed_ms(client, "/runs/long/sections", {"since": cursor})
        assert same.json()["changed"] is False
        epoch = epochs + round_
        with open(root / "long" / "metrics.jsonl", "a") as stream:
            stream.write(_epoch(epoch, rng, 1120, "blending"))
        with open(root / "long" / "events.jsonl", "a") as stream:
            stream.write("".join(_events_of_epoch(epoch, rng, time.time())))
        append_ms, changed = timed_ms(client, "/runs/long/sections", {"since": cursor})
        assert changed.json()["changed"] is True
        if round_:
            for key, value in (("index", index_ms), ("run_page", page_ms),
                               ("poll_unchanged", unchanged_ms),
                               ("poll_after_append", append_ms)):
                samples[key].append(value)
    return {"cold_run_page": cold, **{k: median(v) for k, v in samples.items()}}


def server_rss_mb(root: Path, rounds: int) -> float:
    """The resident set of a ``tolaria dashboard`` process after serving the pages."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "tolaria.cli", "dashboard", "--runs", str(root), "--academy",
         str(root / "academy"), "--port", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        if not line.startswith("tolaria dashboard: "):
            raise RuntimeError(f"the dashboard did not start: {process.stderr.read()}")
        url = line.split()[2].rstrip("/")
        for _ in range(rounds):
            for path in ("/", "/runs/long", "/api/runs/long", "/runs/long/sections"):
                with urllib.request.urlopen(url + path, timeout=60) as answer:
                    answer.read()
        return psutil.Process(process.pid).memory_info().rss / 2**20
    finally:
        process.terminate()
        process.wait(timeout=30)


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "runs"
        epochs = build_root(root, args.runs, args.events)
        events = len((root / "long" / "events.jsonl").read_text().splitlines())
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        times = server_times(root, args.rounds, epochs)
        rss = server_rss_mb(root, args.rounds)
    return {
        "runs": args.runs + 1, "long_run_events": events, "long_run_epochs": epochs,
        "root_mb": size / 2**20, "rounds": args.rounds,
        "timing": "median server-side ms per request: the ASGI app called in process "
                  "(Starlette TestClient), no network",
        "median_ms": times, "server_rss_mb": rss, "goal_ms": GOAL_MS, "goal_mb": GOAL_MB,
        "meets_goal": max(times["index"], times["run_page"]) < GOAL_MS and rss < GOAL_MB,
    }


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=100, help="ordinary run directories")
    parser.add_argument("--events", type=int, default=10_000, help="events of the long run")
    parser.add_argument("--rounds", type=int, default=15, help="requests per measure")


def report(result: dict[str, Any]) -> None:
    print(f"Dashboard over {result['runs']} runs (one of {result['long_run_events']:,} events, "
          f"{result['root_mb']:.1f} MB on disk); {result['timing']}")
    for key, value in result["median_ms"].items():
        print(f"  {key:<20} {value:8.1f} ms")
    print(f"  server RSS           {result['server_rss_mb']:8.1f} MB   goals: < "
          f"{result['goal_ms']:.0f} ms, < {result['goal_mb']:.0f} MB -> "
          f"{'met' if result['meets_goal'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main("dashboard", __doc__.split("\n")[0], argv, configure, run, report)


if __name__ == "__main__":
    main()
