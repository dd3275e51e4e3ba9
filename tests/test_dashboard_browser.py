"""``tolaria dashboard`` in a real browser: Debian's Chromium, driven by Playwright.

Real runs (``tolaria train`` in processes: one that grows and rolls back, one plain) and one
still training (a callback sleeps after each epoch) under one runs root; the dashboard runs
as its command does (``tolaria dashboard --port 0``).  The pages must show what the files
hold, and the live run's page must advance without a reload.  Screenshots go to
``test-artifacts/`` (``docs/dashboard.png`` is one of them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from drills import CLI_SETTINGS
from test_monitor_academy import gates, nightly
from tolaria.academy.registry import PolicyRegistry
from tolaria.academy.replay import ReplayBuffer
from tolaria.monitor.academy import TrainingMonitor

CHROMIUM = Path(os.environ.get("TOLARIA_CHROMIUM", "/usr/bin/chromium"))
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"

# One line in `make test`'s summary (pytest -rs) when the browser tests cannot run.
if not CHROMIUM.exists():
    pytest.skip(f"dashboard browser tests: no Chromium at {CHROMIUM} (apt-get install "
                "chromium, or set TOLARIA_CHROMIUM)", allow_module_level=True)
sync_playwright = pytest.importorskip(
    "playwright.sync_api", reason="dashboard browser tests: playwright is missing "
    "(pip install -e '.[dev]')").sync_playwright
pytestmark = pytest.mark.slow

RUN_SETTINGS = [*CLI_SETTINGS, "run.epochs=5", "academy.replay=false"]
#: The grown run is poisoned once (NaN logits at its third epoch start): one rollback.
POISONED = ["model.host=plugins_for_drills:poisoned_mlp", "model.kwargs.poison=nan",
            "model.kwargs.start=2", "model.kwargs.stop=3"]
PLAIN = ["kasmina.layers=[]"]  # no seeds: a static host


def child_env() -> dict[str, str]:
    """This checkout's tolaria and the tests' plugins, first on the path."""
    path = os.pathsep.join([str(REPO / "src"), str(REPO / "tests"),
                            os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def train(run_dir: Path, cache: Path, settings: list[str], config: Path | None = None):
    argv = [sys.executable, "-m", "tolaria.cli", "train", "--run-dir", str(run_dir), "--quiet",
            *(["--config", str(config)] if config else []),
            *(f"--set={s}" for s in [*RUN_SETTINGS, *settings, f"data.cache_dir={cache}"])]
    return subprocess.Popen(argv, env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def jsonl(path: Path) -> list[dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def kept_epochs(run_dir: Path) -> list[dict]:
    """The metrics record of the latest attempt of each epoch, not undone."""
    latest: dict[int, dict] = {}
    for record in jsonl(run_dir / "metrics.jsonl"):
        latest[record["epoch"]] = record
    return [r for _, r in sorted(latest.items()) if not r["rollback"]]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard") / "runs"
    cache = root.parent / "cache"
    started = [train(root / "grown", cache, POISONED), train(root / "plain", cache, PLAIN)]
    for process in started:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    return root


@pytest.fixture(scope="module")
def academy(runs_root):
    """An academy with v1 promoted over v0, one nightly session deployed, one rejected."""
    folder = runs_root.parent / "academy"
    PolicyRegistry(folder).register({"w": torch.zeros(2)}, {
        "parent": "v0", "trained_on": "by hand", "training_s": 1.0, "scorer": {}})
    PolicyRegistry(folder).promote("v1", reason="by hand")
    now = time.time()
    with ReplayBuffer.in_academy(folder) as replay:
        nightly(replay, "deployed", finished=now - 100, version="v1")
        nightly(replay, "rejected", finished=now, gates=gates(history=0.9),
                failed_gate="history_score", cause="history_score 0.9 is not above 0.95")
    return folder


@pytest.fixture(scope="module")
def dashboard(runs_root, academy):
    """``tolaria dashboard`` on a free port; its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tolaria.cli", "dashboard", "--runs", str(runs_root),
         "--academy", str(academy), "--port", "0"],
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith("tolaria dashboard: http://127.0.0.1:"), process.stderr.read()
    yield line.split()[2].rstrip("/")
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    page.close()
    assert errors == [], errors


def field(page, selector: str) -> str:
    return page.locator(selector).inner_text().strip()


def test_the_index_shows_every_run_as_its_files_say(page, dashboard, runs_root):
    page.goto(dashboard + "/")
    for name in ("grown", "plain"):
        summary = json.loads((runs_root / name / "summary.json").read_text())
        epochs = kept_epochs(runs_root / name)
        row = f'tr[data-run="{name}"]'
        assert field(page, f"{row} [data-field=status]") == summary["status"] == "completed"
        assert field(page, f"{row} [data-field=epoch]") == f"{len(epochs)} / 5"
        assert field(page, f"{row} [data-field=best]") == f"{summary['best_val_accuracy']:.4f}"
        assert field(page, f"{row} [data-field=params]") == (
            f"{summary['params_initial']:,} → {summary['params_final']:,}")
        assert field(page, f"{row} [data-field=rollbacks]") == str(summary["rollbacks"])
    page.screenshot(path=ARTIFACTS / "dashboard-index.png")


def test_a_run_page_shows_the_curves_seeds_and_decisions_of_its_files(
    page, dashboard, runs_root
):
    run = runs_root / "grown"
    summary = json.loads((run / "summary.json").read_text())
    epochs = kept_epochs(run)
    events = jsonl(run / "events.jsonl")
    page.goto(f"{dashboard}/runs/grown")
    page.wait_for_selector("#chart-score .main-svg")
    assert summary["rollbacks"] >= 1  # the poisoned epoch was rolled back
    assert field(page, "[data-field=rollbacks]") == str(summary["rollbacks"])
    assert field(page, "[data-field=epoch]") == f"{len(epochs)} / 5"
    assert field(page, "[data-field=best]") == f"{max(e['val_accuracy'] for e in epochs):.4f}"
    # The charts hold the files' numbers exactly, and mark the rollback.
    drawn = page.evaluate("""() => ({
        score: document.getElementById('chart-score').data[0].y,
        params: document.getElementById('chart-params').data[0].y,
        marks: document.getElementById('chart-score').layout.shapes.map(s => s.x0)})""")
    assert drawn["score"] == [e["val_accuracy"] for e in epochs]
    assert drawn["params"] == [e["params"] for e in epochs]
    rollback_epochs = [e["epoch"] for e in events if e["event"] == "rollback"]
    assert set(rollback_epochs) <= set(drawn["marks"])
    # One timeline row per seed; its last segment is the seed's state after the last epoch.
    for seed, state in epochs[-1]["seed_states"].items():
        last = page.locator(f'[data-seed="{seed}"] .segment').last
        assert last.get_attribute("data-state") == state
        assert int(last.get_attribute("data-end")) == epochs[-1]["epoch"]
    grafted = {e["blueprint"] for e in events if e["event"] == "adaptation"
               and e["to_state"] == "germinated"}
    assert grafted and grafted <= set(page.locator(".segment").all_inner_texts())
    decisions = [e for e in events if e["event"] == "decision"]
    assert page.locator("tr[data-decision]").count() == len(decisions)
    assert page.locator('table[data-table="alerts"] tr[data-metric="rollbacks"]').count() == 1
    assert page.locator('table[data-table="events"] tr[data-kind="rollback"]').count() == len(
        rollback_epochs)
    page.screenshot(path=ARTIFACTS / "dashboard-run.png", full_page=True)


def test_a_running_run_advances_on_its_page_without_a_reload(
    page, dashboard, runs_root, tmp_path
):
    config = tmp_path / "slow.yaml"
    config.write_text(yaml.safe_dump({"run": {"callbacks": [
        {"name": "plugins_for_dashboard:SlowEpochs", "kwargs": {"seconds": 2.0}}]}}))
    run = runs_root / "live"
    process = train(run, runs_root.parent / "cache", ["run.epochs=8"], config)
    try:
        deadline = time.monotonic() + 120
        while not kept_epochs(run) and time.monotonic() < deadline:
            time.sleep(0.2)
        page.goto(f"{dashboard}/runs/live")
        page.wait_for_selector("#chart-score .main-svg")
        page.evaluate("() => { window.stillThisPage = true; }")
        assert field(page, "[data-field=status]").startswith("running")
        shown = int(field(page, "[data-field=epoch]").split(" / ")[0])
        assert 1 <= shown <= len(kept_epochs(run))
        # A few seconds later, without a reload, the page shows a later epoch.
        page.wait_for_function(
            f"() => parseInt(document.querySelector('[data-field=epoch]').innerText) > {shown}",
            timeout=60_000)
        assert page.evaluate("() => window.stillThisPage") is True
        assert int(page.locator("main").get_attribute("data-updates")) >= 1
        now_shown = int(field(page, "[data-field=epoch]").split(" / ")[0])
        drawn = page.evaluate("() => document.getElementById('chart-score').data[0].y")
        files = [e["val_accuracy"] for e in kept_epochs(run)]
        assert len(drawn) == now_shown and drawn == files[:now_shown]
        page.screenshot(path=ARTIFACTS / "dashboard-live.png")
    finally:
        process.kill()
        process.wait(timeout=60)
    # Killed mid-run: its status says training, but its writer is gone.
    page.wait_for_function(
        "() => document.querySelector('[data-field=status]').innerText.startsWith('interrupted')",
        timeout=30_000)


def test_the_academy_page_shows_versions_sessions_gates_and_metrics(page, dashboard, academy):
    monitor = TrainingMonitor(academy)
    page.goto(dashboard + "/academy")
    champion = page.locator("tr.champion")
    assert champion.count() == 1 and champion.get_attribute("data-version") == "v1"
    assert [v.name for v in monitor.versions()] == page.locator(
        "tr[data-version]").evaluate_all("rows => rows.map(r => r.dataset.version)")
    for session in monitor.sessions():
        row = f'tr[data-session="{session.session}"]'
        assert page.locator(f"{row} .status").inner_text() == session.outcome
        for name, gate in session.gates.items():
            shown = field(page, f'{row} [data-gate="{name}"]')
            assert shown.startswith(f"{name}: {gate['value']:.4f} vs {gate['threshold']:.4f}")
            assert shown.endswith("✓" if gate["passed"] else "✗")
    for metric in monitor.metrics_table():
        row = f'table[data-table="metrics"] tr[data-metric="{metric.name}"]'
        assert field(page, f"{row} [data-field=value]") == metric.shown
        assert field(page, f"{row} .status") == metric.state
    assert field(page, '[data-metric="policy_success_rate"] [data-field=value]') == "50%"
    assert page.locator('table[data-table="alerts"] tr[data-metric="policy_success_rate"]'
                        ).count() == 1
    page.screenshot(path=ARTIFACTS / "dashboard-academy.png", full_page=True)
