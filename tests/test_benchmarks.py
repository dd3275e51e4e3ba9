"""Smoke tests for ``benchmarks/``: each module runs at tiny sizes and keeps its JSON promise.

No timing is asserted (timings belong to the benchmarks themselves); what is asserted is
the shape of each result, the invariants a benchmark reports (bitwise-identical weights,
no seed transitions where nothing may adapt, zero optimizer state copies) and that the
report renders every section.  Results go to a temporary folder, never to
``benchmarks/results``.
"""

from __future__ import annotations

import json
import sys

import pytest
from benchmarks import (
    bench_checkpoint,
    bench_dashboard,
    bench_distributed,
    bench_epoch_boundary,
    bench_growth,
    bench_kasmina_overhead,
    bench_optim_rebuild,
    bench_startup,
    bench_trainer_overhead,
    report,
    run_all,
)
from benchmarks.common import (
    RESULTS_ENV,
    interleave,
    quantile,
    read_result,
    rotated,
)

MACHINE_KEYS = {"cpu", "cores", "torch", "torch_threads", "load_average_1min"}


@pytest.fixture(autouse=True)
def results_dir(tmp_path, monkeypatch):
    folder = tmp_path / "results"
    monkeypatch.setenv(RESULTS_ENV, str(folder))
    return folder


@pytest.fixture
def mnist1d_cache(tmp_path_factory, monkeypatch):
    """Benchmarks load MNIST-1D through the default config; keep its cache out of $HOME."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.getbasetemp() / "home"))


def run_quick(module, name: str, capsys) -> dict:
    """``main([--json, quick sizes])``: the printed object must equal the written file."""
    result = module.main(["--json", *run_all.QUICK_ARGS[name]])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(json.dumps(result))
    assert read_result(name) == printed
    assert printed["benchmark"] == name
    assert printed["machine"].keys() >= MACHINE_KEYS
    assert printed["machine"]["torch_threads"] == 1
    return printed


def test_rotation_gives_every_contender_every_position():
    names = ["a", "b", "c"]
    firsts = {rotated(names, r)[0] for r in range(3)}
    assert firsts == set(names)
    calls = []
    times = interleave({n: (lambda r, n=n: calls.append((r, n))) for n in names},
                       rounds=2, warmup=1)
    assert {n: len(t) for n, t in times.items()} == {"a": 2, "b": 2, "c": 2}
    assert [c for c in calls if c[0] == 1] == [(1, "b"), (1, "c"), (1, "a")]
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5


def test_trainer_overhead_weights_match_the_hand_written_loop(mnist1d_cache, capsys):
    result = run_quick(bench_trainer_overhead, "trainer_overhead", capsys)
    (workload,) = result["workloads"]
    # The Lightning contender runs only where Lightning is installed (`make bench` does).
    lightning = {"lightning"} if result["lightning_version"] else set()
    assert set(workload["median_epoch_ms"]) == {
        "tolaria", "tolaria_no_seeds", "hand_written", *lightning}
    assert set(workload["ratio_vs_hand_written"]) == {"tolaria", "tolaria_no_seeds", *lightning}
    # Dormant seeds and a controller that never adapts leave the computation untouched;
    # Lightning, fed one epoch per `fit`, must take the same steps on the same batches.
    assert workload["seed_transitions"] == 0
    assert workload["bitwise_identical_weights"] == dict.fromkeys(
        ["tolaria", "tolaria_no_seeds", *lightning], True)
    accuracies = workload["final_val_accuracy"]
    # The same correct count: Tolaria divides it in float64, the hand-written loop in float32.
    assert accuracies["tolaria"] == pytest.approx(accuracies["hand_written"], rel=1e-6)
    assert ("lightning_fit_call_ms" in workload) == bool(lightning)


def test_trainer_overhead_skips_lightning_where_it_is_not_installed(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lightning", None)  # `import lightning` raises ImportError
    assert bench_trainer_overhead.import_lightning() is None
    assert "skipping the `lightning` contender" in capsys.readouterr().err


def test_epoch_boundary_reports_every_part(mnist1d_cache, capsys):
    result = run_quick(bench_epoch_boundary, "epoch_boundary", capsys)
    heuristic, learned = result["workloads"]  # the same job under each policy
    assert learned["host"] == heuristic["host"] + ", learned"
    for workload in (heuristic, learned):
        for part in ("boundary", "boundary_without_snapshot", "packet", "tamiyo_step",
                     "snapshot", "telemetry_flush"):
            stats = workload["ms"][part]
            assert stats["n"] == workload["epochs_recorded"] == 2
            assert 0 <= stats["median"] <= stats["max"]
        ms = workload["ms"]
        assert ms["boundary_without_snapshot"]["max"] <= ms["boundary"]["max"]
    assert result["design_budget_ms"] == 18.0


def test_growth_study_runs_every_contender_on_each_task_and_plots(mnist1d_cache, capsys,
                                                                   results_dir):
    result = run_quick(bench_growth, "growth", capsys)
    assert set(result["tasks"]) == {"mnist1d-hidden", "digits-cnn"}
    assert result["seeds"] == [0, 1] and result["widths"] == [1.5]
    for task in result["tasks"].values():
        assert set(task["summary"]) == {"small_static", "best_static", "grown",
                                        "grown_retrained"}
        for row in task["summary"].values():
            assert 0.0 <= row["test_accuracy_mean"] <= 1.0
        (point,) = task["sweep"]
        assert task["best_static"]["width"] == point["width"] == 1.5
        verdict = task["verdict"]
        assert verdict["sweep_compute_s"] == pytest.approx(point["wall_time_s_mean"])
        assert verdict["c_beats_a"] == (verdict["c_minus_a"] > verdict["c_std"])
        for runs in task["runs"].values():
            assert set(runs) == {"small_static", "static_x1.5", "grown", "grown_retrained"}
            assert runs["grown_retrained"]["seed_transitions"] == 0
            assert runs["grown_retrained"]["params"] == runs["grown"]["params"]
            assert runs["static_x1.5"]["params"] > runs["small_static"]["params"]
    section = "\n".join(report.section_growth(result))
    assert "### digits-cnn" in section and "static ×1.5 = (b)" in section
    assert (results_dir / result["plot"]).stat().st_size > 0


def sweep_point(width: float, params: float, val: float) -> dict:
    return {"width": width, "name": bench_growth.sweep_name(width), "params_mean": params,
            "val_accuracy_mean": val, "test_accuracy_mean": 0.5, "test_accuracy_std": 0.0,
            "wall_time_s_mean": 1.0}


def test_best_static_is_the_best_validation_among_hosts_no_larger_than_the_grown_one():
    sweep = [sweep_point(1.25, 3_000, 0.60), sweep_point(1.5, 4_000, 0.70),
             sweep_point(2.0, 5_000, 0.65), sweep_point(3.0, 9_000, 0.90)]
    # 5,200 x 1.05 admits the first three; the widest is better but too large.
    assert bench_growth.best_static(sweep, 5_200)["width"] == 1.5
    assert bench_growth.best_static(sweep, 20_000)["width"] == 3.0
    fallback = bench_growth.best_static(sweep, 1_000)
    assert fallback["width"] == 1.25 and fallback["rule"].startswith("narrowest")


def test_width_axis_rounds_half_up_and_never_below_one():
    assert bench_growth.widened("model.kwargs.channels", (4, 8))(1.125) == [
        "model.kwargs.channels=[5, 9]"]
    assert bench_growth.TASKS["mnist1d-hidden"].width(0.01) == ["model.kwargs.hidden=[1, 1]"]


def test_growth_activity_counts_grafts_by_place_and_culls_for_size():
    def move(to: str, reason: str, blueprint: str = "residual_mlp") -> dict:
        return {"epoch": 1, "from_state": "dormant", "to_state": to, "reason": reason,
                "blueprint": blueprint}

    structure = {"version": 1, "seeds": [
        {"seed_id": "hidden.0.0", "history": [
            move("germinated", "plateau"), move("training", "grafted"),
            move("culled", "delta grew to 3.1x (tamiyo.max_delta_ratio=2.0)"),
            move("germinated", "plateau", "low_rank"), move("culled", "gain -0.01 acc")]},
        {"seed_id": "flatten.0", "history": [move("germinated", "plateau")]},
    ]}
    assert bench_growth.activity(structure) == {
        "grafts_by_place": {"low_rank@hidden.0": 1, "residual_mlp@flatten": 1,
                            "residual_mlp@hidden.0": 1},
        "culls": 2, "size_culls": 1}


def test_growth_verdict_names_the_part_that_misses():
    met = {"c_beats_a": True, "c_minus_b": 0.4}
    assert report.growth_verdict(met) == "meets goal"
    assert report.growth_verdict(met | {"c_minus_b": -1.0}) == "**misses goal**: c < b"
    assert report.growth_verdict({"c_beats_a": False, "c_minus_b": -1.0}) == (
        "**misses goal**: c − a within the std; c < b")


def test_report_of_an_old_growth_result_asks_for_a_rerun_instead_of_failing():
    old = {"epochs": 100, "seeds": [0], "summary": {}, "reference_accuracy": {}}
    text = report.render({"growth": old}, None)
    assert "_`results/growth.json` lacks 'widths'" in text
    assert "Growth on" not in text  # no headline row from a result without tasks


def test_growth_study_refuses_a_non_positive_size_in_one_usage_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_growth.main(["--epochs", "0"])
    assert exit_.value.code == 2
    assert "--epochs: expected a positive int, got '0'" in capsys.readouterr().err


def test_retrained_structure_keeps_exactly_the_grown_blueprints():
    structure = {"version": 1, "seeds": [
        {"seed_id": "h.0", "state": "blending", "alpha": 0.5, "blueprint": "low_rank",
         "blueprint_kwargs": {"rank": 2}, "chunk_shape": [8], "epochs_in_state": 1,
         "clock": 7, "history": [{"epoch": 3}]},
        {"seed_id": "h.1", "state": "culled", "alpha": 0.0, "blueprint": None,
         "blueprint_kwargs": {}, "chunk_shape": [8], "epochs_in_state": 2, "clock": 9,
         "history": [{"epoch": 4}]},
    ]}
    result = bench_growth.fossilized(structure)
    kept, dropped = result["seeds"]
    assert (kept["state"], kept["alpha"], kept["blueprint"]) == ("fossilized", 1.0, "low_rank")
    assert kept["blueprint_kwargs"] == {"rank": 2}
    assert (dropped["state"], dropped["blueprint"]) == ("dormant", None)
    assert kept["history"] == dropped["history"] == []
    assert structure["seeds"][0]["state"] == "blending"  # the grown record is not mutated
    assert bench_growth.grafts(structure) == {"h.0": "low_rank (blending)"}


def test_optim_rebuild_copies_no_state(capsys):
    result = run_quick(bench_optim_rebuild, "optim_rebuild", capsys)
    assert result["state_copies"] == 0 and result["state_tensors_checked"] > 0
    assert {"no_change", "add", "remove", "torch_reload"} <= result["median_ms"].keys()


@pytest.mark.slow
def test_startup_times_whole_processes_that_never_import_mnist1d_warm(mnist1d_cache, capsys):
    result = run_quick(bench_startup, "startup", capsys)
    median = result["median_s"]
    assert result["runs"] == 1 and set(median) == {
        "first_batch_s", "first_batch_cpu_s", "process_s", "config_error_s", "floor_s",
        "floor_cpu_s"}
    assert 0 < median["first_batch_s"] < median["process_s"]  # the batch came before the exit
    # The warm-up run filled the cache: the timed one found its arrays without mnist1d.
    assert "mnist1d" not in result["imported_at_first_batch"]
    assert "torch.utils.tensorboard" not in result["imported_at_first_batch"]
    section = "\n".join(report.section_startup(result))
    assert "command → first training batch" in section


def test_checkpoint_and_kasmina_overhead_results(capsys):
    checkpoint = run_quick(bench_checkpoint, "checkpoint", capsys)
    assert set(checkpoint["sizes"]) == {"1M", "10M"}
    for size in checkpoint["sizes"].values():
        assert {"capture_fresh", "rollback", "disk_save", "disk_restore"} <= size[
            "median_ms"].keys()
    kasmina = run_quick(bench_kasmina_overhead, "kasmina_overhead", capsys)
    assert {"plain", "dormant"} <= kasmina["median_epoch_s"].keys()


def test_dashboard_times_the_index_and_a_long_run_and_measures_the_server(capsys):
    result = run_quick(bench_dashboard, "dashboard", capsys)
    assert result["runs"] == 4 and result["long_run_events"] == 200
    assert result["median_ms"].keys() == {"index", "run_page", "poll_unchanged",
                                          "poll_after_append", "cold_run_page"}
    assert 10 < result["server_rss_mb"] < 10_000  # a real process's resident set
    assert "| `GET /`: the runs index |" in "\n".join(report.section_dashboard(result))


@pytest.mark.slow
def test_distributed_times_one_and_two_processes_and_a_rewrap(capsys):
    result = run_quick(bench_distributed, "distributed", capsys)
    assert result["epoch_s"].keys() == {"1 process", "2 processes"}
    # The same global batch: each of 2 ranks takes as many (half) batches as 1 process.
    assert len(set(result["setup"]["batches_per_rank"].values())) == 1
    assert result["scaling_efficiency"] == pytest.approx(result["speedup"] / 2)
    assert result["rewrap_ms"]["params"] > 9_000_000 and result["rewrap_ms"]["graft"] > 0
    lines = report.section_distributed(result)
    assert any("after a graft" in line for line in lines)


def test_report_renders_every_section_and_marks_missing_ones(tmp_path, mnist1d_cache,
                                                             capsys):
    run_quick(bench_epoch_boundary, "epoch_boundary", capsys)
    path = report.write_report(tmp_path / "BENCHMARKS.md")
    text = path.read_text()
    for title, _ in report.SECTIONS.values():
        assert f"## {title}" in text
    assert "End-of-epoch hook, default job" in text
    assert "design 18 ms" in text
    assert text.count("_Not run yet._") == len(report.SECTIONS) - 1


def test_report_renders_trainer_overhead_with_and_without_lightning():
    workload = {
        "host": "mlp hidden [8]", "params": 100, "seeds": 1, "seed_transitions": 0,
        "batches_per_epoch": 5, "val_batches_per_epoch": 2, "epochs_timed": 2,
        "median_epoch_ms": {"tolaria": 11.0, "tolaria_no_seeds": 10.5, "hand_written": 10.0},
        "ratio_vs_hand_written": {"tolaria": 1.1, "tolaria_no_seeds": 1.05},
        "median_paired_ratio_vs_hand_written": {"tolaria": 1.1, "tolaria_no_seeds": 1.05},
        "bitwise_identical_weights": {"tolaria": True, "tolaria_no_seeds": True},
    }
    before = {"goal_ratio": 1.02, "workloads": [workload]}
    with_lightning = {"goal_ratio": 1.02, "lightning_version": "2.6.6", "workloads": [{
        **workload,
        "median_epoch_ms": workload["median_epoch_ms"] | {"lightning": 17.5},
        "ratio_vs_hand_written": workload["ratio_vs_hand_written"] | {"lightning": 1.75},
        "median_paired_ratio_vs_hand_written":
            workload["median_paired_ratio_vs_hand_written"] | {"lightning": 1.7},
        "bitwise_identical_weights": workload["bitwise_identical_weights"] | {"lightning": True},
        "lightning_fit_call_ms": 1.2,
    }]}
    old_text = report.render({"trainer_overhead": before}, None)
    assert "| tolaria | 11.0 | 1.100 |" in old_text
    assert "ightning" not in old_text
    new_text = report.render({"trainer_overhead": with_lightning}, None)
    assert "| lightning | 17.5 | 1.750 | 1.700 | yes |" in new_text
    assert "PyTorch Lightning 1.750 (paired 1.700)" in new_text
    assert "Lightning 2.6.6" in new_text and "1.2 ms (mlp hidden [8])" in new_text


def test_run_all_runs_a_benchmark_in_a_child_process(tmp_path, mnist1d_cache, results_dir):
    code = run_all.main(["--quick", "--only", "epoch_boundary",
                         "--report", str(tmp_path / "BENCHMARKS.md")])
    assert code == 0
    record = read_result("run_all")
    assert record["benchmarks"]["epoch_boundary"]["status"] == "ok"
    assert read_result("epoch_boundary")["machine"]["torch_threads"] == 1
    assert "make bench` wall time" in (tmp_path / "BENCHMARKS.md").read_text()
