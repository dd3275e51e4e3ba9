"""``BENCHMARKS.md`` from the result files: every figure next to its anchor.

Nothing here measures; it only reads ``benchmarks/results/*.json`` (or
``$TOLARIA_BENCH_RESULTS``) and writes markdown, so every number in the report is one a
benchmark run printed.  ``python -m benchmarks.report`` regenerates the file;
``python -m benchmarks.run_all`` calls it after running the benchmarks.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import read_result

REPORT_PATH = Path(__file__).parent.parent / "BENCHMARKS.md"
Result = dict[str, Any]


def verdict(value: float, goal: float) -> str:
    return "meets goal" if value <= goal else "**misses goal**"


def mean_std(row: dict[str, Any], key: str, fmt: str) -> str:
    if isinstance(row.get(key), dict):  # {"mean", "std"}
        return f"{row[key]['mean']:{fmt}} ± {row[key]['std']:{fmt}}"
    return f"{row[f'{key}_mean']:{fmt}} ± {row[f'{key}_std']:{fmt}}"


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


# ---------------------------------------------------------------- headline rows
def headline_rows(results: dict[str, Result]) -> list[list[str]]:
    """One row per claim: what, measured, anchor, verdict."""
    rows = []
    if boundary := results.get("epoch_boundary"):
        # The first workload under each policy: the default job, heuristic then learned.
        for w in [w for w in boundary["workloads"] if "[32, 32]" in w["host"]] or \
                boundary["workloads"][:1]:
            b = w["ms"]["boundary"]
            rows.append([f"End-of-epoch hook, default job ({w['host']}), median / max",
                         f"{b['median']:.2f} / {b['max']:.2f} ms",
                         f"design {boundary['design_budget_ms']:.0f} ms; goal ≤ "
                         f"{boundary['goal_ms']:.0f} ms",
                         verdict(b["median"], boundary["goal_ms"])])
    if checkpoint := results.get("checkpoint"):
        size = checkpoint["sizes"]["10M"]
        budgets = checkpoint["budgets_ms"]
        for op, label in (("rollback", "Fast (in-memory) rollback"),
                          ("disk_restore", "Full (disk) rollback: read + verify + restore")):
            rows.append([f"{label}, {size['params'] / 1e6:.1f}M params",
                         f"{size['median_ms'][op]:.1f} ms",
                         f"design {budgets[op]['design']:,.0f} ms; goal ≤ "
                         f"{budgets[op]['goal']:,.0f} ms",
                         verdict(size["median_ms"][op], budgets[op]["goal"])])
    if optim := results.get("optim_rebuild"):
        budgets = optim["budgets_ms"]
        for op, label in (("no_change", "Optimizer rebuild, state preserved"),
                          ("add", "Optimizer rebuild after a graft")):
            rows.append([f"{label}, {optim['params'] / 1e6:.1f}M params",
                         f"{optim['median_ms'][op]:.3f} ms; {optim['state_copies']} state "
                         "tensor copies",
                         f"design {budgets[op]['design']:.0f} ms; goal ≤ "
                         f"{budgets[op]['goal']:.0f} ms, no copies",
                         verdict(optim["median_ms"][op], budgets[op]["goal"])])
    if overhead := results.get("trainer_overhead"):
        w = overhead["workloads"][0]
        ratio = w["ratio_vs_hand_written"]["tolaria"]
        paired = w["median_paired_ratio_vs_hand_written"]["tolaria"]
        same = w["bitwise_identical_weights"]["tolaria"]
        anchor = f"hand-written loop = 1; goal ≤ {overhead['goal_ratio']}"
        if "lightning" in w["ratio_vs_hand_written"]:
            anchor += (f"; PyTorch Lightning {w['ratio_vs_hand_written']['lightning']:.3f} "
                       f"(paired {w['median_paired_ratio_vs_hand_written']['lightning']:.3f})")
        rows.append([f"TolariaTrainer vs hand-written loop, epoch time ({w['host']})",
                     f"{ratio:.3f} (paired {paired:.3f}); weights "
                     f"{'bitwise identical' if same else '**differ**'}",
                     anchor, verdict(max(ratio, paired), overhead["goal_ratio"])])
    if kasmina := results.get("kasmina_overhead"):
        ratio = kasmina["ratio_vs_plain"]["dormant"]
        paired = kasmina["median_paired_ratio_vs_plain"]["dormant"]
        rows.append([f"Dormant seeds vs plain host, epoch time ({kasmina['setup']['host']})",
                     f"{ratio:.3f} (paired {paired:.3f})",
                     f"plain host = 1; goal ≤ {kasmina['target_ratio_dormant']}",
                     verdict(max(ratio, paired), kasmina["target_ratio_dormant"])])
    if startup := results.get("startup"):
        m = startup["median_s"]
        rows.append([f"Start-up: command → first training batch of the default job, median "
                     f"of {startup['runs']} processes",
                     f"{m['first_batch_s']:.2f} s ({m['first_batch_cpu_s']:.2f} s CPU); a config "
                     f"typo answered in {m['config_error_s']:.2f} s",
                     f"goal ≤ {startup['goal_s']:.0f} s; importing torch and torch._dynamo "
                     f"alone {m['floor_s']:.2f} s ({m['floor_cpu_s']:.2f} s CPU)",
                     verdict(m["first_batch_s"], startup["goal_s"])])
    if growth := results.get("growth"):
        # A result of the MNIST-1D-only study (no "tasks") has no row; its section says so.
        for name, task in growth.get("tasks", {}).items():
            a, b, c = (task["summary"][k] for k in ("small_static", "best_static", "grown"))
            v = task["verdict"]
            rows.append([f"Growth on {name}: grown (c) vs small static (a) vs best static of "
                         f"its size (b), {growth['epochs']} epochs, {len(growth['seeds'])} seeds",
                         f"(c) {mean_std(c, 'test_accuracy', '.1%')} at "
                         f"{c['params_mean']:,.0f} params; (a) {a['test_accuracy_mean']:.1%}; "
                         f"(b) ×{task['best_static']['width']:g} {b['test_accuracy_mean']:.1%} "
                         f"at {b['params_mean']:,.0f}",
                         f"goal: c − a {v['c_minus_a']:+.1f} pts > std {v['c_std']:.1f}, "
                         f"c − b {v['c_minus_b']:+.1f} pts ≥ 0; sweep = "
                         f"{v['sweep_over_grown']:.1f}× a grown run; wall c/d "
                         f"{v['wall_ratio_c_over_d']:.2f} (limit {v['wall_limit']})",
                         growth_verdict(v)])
    if academy := results.get("academy"):
        deltas = academy["verdicts"].values()
        accuracy = sum(v["accuracy_delta"] for v in deltas) / len(deltas)
        culled = sum(v["culled_delta"] for v in deltas) / len(deltas)
        met = all(v["accuracy_delta"] >= 0 and v["culled_delta"] <= 0 for v in deltas)
        rows.append([f"Learned v0 vs heuristic on {len(deltas)} held-out tasks "
                     f"({academy['epochs']} epochs, {academy['seeds']} seeds)",
                     f"test accuracy {accuracy:+.1%}, culled grafts {culled:+.1f} per run "
                     "(mean over tasks)",
                     "goal: accuracy ≥ heuristic's with fewer culled, on every task",
                     "meets goal" if met else "**misses goal**"])
    if dashboard := results.get("dashboard"):
        m = dashboard["median_ms"]
        rows.append([f"Dashboard, {dashboard['runs']} runs (one of "
                     f"{dashboard['long_run_events']:,} events): index / run page, server side",
                     f"{m['index']:.0f} / {m['run_page']:.0f} ms; server RSS "
                     f"{dashboard['server_rss_mb']:.0f} MB",
                     f"goal < {dashboard['goal_ms']:.0f} ms, < {dashboard['goal_mb']:.0f} MB",
                     "meets goal" if dashboard["meets_goal"] else "**misses goal**"])
    return rows


def growth_verdict(v: dict[str, Any]) -> str:
    """Issue 17's claim on one task: (c) beats (a) by more than its own seed-to-seed std
    and matches (b); otherwise which part misses."""
    misses = [part for part, met in (("c − a within the std", v["c_beats_a"]),
                                     ("c < b", v["c_minus_b"] >= 0)) if not met]
    return "meets goal" if not misses else "**misses goal**: " + "; ".join(misses)


# ---------------------------------------------------------------- detail sections
def section_trainer_overhead(r: Result) -> list[str]:
    rows = []
    for w in r["workloads"]:
        for name, ms in w["median_epoch_ms"].items():
            ratio = w["ratio_vs_hand_written"].get(name)
            paired = w["median_paired_ratio_vs_hand_written"].get(name)
            same = w["bitwise_identical_weights"].get(name)
            rows.append([w["host"], f"{w['params']:,}", name, f"{ms:.1f}",
                         "1 (anchor)" if ratio is None else f"{ratio:.3f}",
                         "" if paired is None else f"{paired:.3f}",
                         "anchor" if same is None else ("yes" if same else "**no**")])
    w0 = r["workloads"][0]
    return [
        f"Same host, initial weights, batches and Adam; {w0['epochs_timed']} interleaved epochs "
        f"timed (first one is warm-up), {w0['batches_per_epoch']} training + "
        f"{w0['val_batches_per_epoch']} validation batches each; `tolaria` has "
        f"{w0['seeds']} dormant seeds (telemetry on) and a real Tamiyo that never adapts "
        f"({w0['seed_transitions']} seed transitions), no run directory.  `paired` is the "
        "median of per-epoch ratios.  Goal: ≤ 1.02." + lightning_note(r),
        "",
        *table(["host", "params", "contender", "median epoch ms", "ratio", "paired",
                "bitwise-identical weights"], rows),
    ]


def lightning_note(r: Result) -> str:
    """What the `lightning` rows measure; empty for results from before it was a contender."""
    fixed = [f"{w['lightning_fit_call_ms']:.1f} ms ({w['host']})"
             for w in r["workloads"] if "lightning_fit_call_ms" in w]
    if not fixed:
        return ""
    return (f"  `lightning`: the same host, loss, Adam and validation sums in a "
            f"`LightningModule`, trained by PyTorch Lightning {r['lightning_version']}'s "
            "`Trainer` (logger, checkpointing, progress bar, model summary and sanity "
            "validation off; CPU, one device), one `fit` call per epoch on the same Trainer "
            "with `max_epochs` raised by one.  Its times include that call's fixed cost, of "
            f"which a `fit` with no epoch left takes {', '.join(fixed)}.  Context, not a goal.")


def section_epoch_boundary(r: Result) -> list[str]:
    rows = []
    for w in r["workloads"]:
        for part, s in w["ms"].items():
            rows.append([w["host"], part, f"{s['median']:.3f}", f"{s['p90']:.3f}",
                         f"{s['max']:.3f}", s["n"]])
    notes = [f"{w['host']}: {w['epochs_with_adaptations']} of {w['epochs_recorded']} timed "
             f"epochs adapted, params {w['params_initial']:,} → {w['params_final']:,}, "
             f"{w['rollbacks']} rollbacks" for w in r["workloads"]]
    return [
        "The real default job with Tamiyo deciding, timed inside `run_epoch` (first epoch "
        "dropped).  `boundary` = end of validation → end of the epoch: packet, "
        "`tamiyo.step`, record, optimizer rebuild when flagged, scheduler, in-memory "
        "snapshot.  No run directory, so no disk I/O.  `telemetry_flush` "
        "(`on_epoch_boundary`, before validation) is shown apart.  "
        f"Design budget {r['design_budget_ms']:.0f} ms; goal ≤ {r['goal_ms']:.0f} ms.",
        "",
        *table(["host", "part", "median ms", "p90 ms", "max ms", "epochs"], rows),
        "",
        *[f"- {note}" for note in notes],
    ]


def growth_row(label: str, s: dict[str, float]) -> list[str]:
    return [label, mean_std(s, "test_accuracy", ".1%"), f"{s['final_val_accuracy_mean']:.1%}",
            f"{s['params_mean']:,.0f}", f"{s['wall_time_s_mean']:.1f}"]


def section_growth(r: Result) -> list[str]:
    refs = ", ".join(f"{k} ≈{v:.0%}" for k, v in r["reference_accuracy"].items())
    lines = [
        f"{r['epochs']} epochs for every contender, seeds {r['seeds']} (mean ± sample std), "
        "each task's data, optimizer and learning rate.  (a) the task's host without seeds; "
        f"the sweep: static hosts widened by {', '.join(f'×{w:g}' for w in r['widths'])}; "
        "(b) the sweep width with the best mean *validation* accuracy among those whose mean "
        f"final size is ≤ {r['size_tolerance']}× (c)'s (the narrowest when none is); (c) "
        "the task grown by Tamiyo; (d) (c)'s final architecture retrained from scratch.  "
        "Tamiyo decides on the validation split only; test accuracy is of the final model, "
        "measured once.  Sweep compute: one seed's wall time summed over every width.  "
        f"MNIST-1D paper references (longer training, larger models): {refs}.",
    ]
    for name, task in r["tasks"].items():
        summary, chosen, v = task["summary"], task["best_static"], task["verdict"]
        sweep = [[f"static ×{p['width']:g}" + (" = (b)" if p["width"] == chosen["width"]
                                               else ""),
                  f"{p['test_accuracy_mean']:.1%} ± {p['test_accuracy_std']:.1%}",
                  f"{p['val_accuracy_mean']:.1%}", f"{p['params_mean']:,.0f}",
                  f"{p['wall_time_s_mean']:.1f}"] for p in task["sweep"]]
        overall, growth = task["sweep_best_overall"], task["growth"]
        within = v["wall_ratio_c_over_d"] <= v["wall_limit"]
        placed = ", ".join(f"{k} {n}" for k, n in growth["grafts_by_place"].items()) or "none"
        lines += [
            "", f"### {name}: {task['label']}", "",
            *table(["contender", "test accuracy", "val accuracy", "params", "wall s"], [
                growth_row("(a) small static", summary["small_static"]), *sweep,
                growth_row("(c) grown", summary["grown"]),
                growth_row("(d) grown, retrained", summary["grown_retrained"])]),
            "",
            f"- (c) − (a) = {v['c_minus_a']:+.1f} pts; seed-to-seed std of (c) "
            f"{v['c_std']:.1f} pts: (c) ≥ (a) by more than the std: "
            f"{'yes' if v['c_beats_a'] else '**no**'}.",
            f"- (c) − (b) = {v['c_minus_b']:+.1f} pts, (b) = static ×{chosen['width']:g} "
            f"({chosen['rule']}); the sweep's best by validation at any size: "
            f"×{overall['width']:g}, {overall['test_accuracy_mean']:.1%} test at "
            f"{overall['params_mean']:,.0f} params.",
            f"- Sweep compute {v['sweep_compute_s']:.1f} s ({len(task['sweep'])} widths, one "
            f"seed) = {v['sweep_over_grown']:.1f}× one grown run ({v['grown_wall_s']:.1f} s).",
            f"- Wall time (c) / (d) = {v['wall_ratio_c_over_d']:.2f} (limit "
            f"{v['wall_limit']}: {'within' if within else '**over**'}).",
            f"- The grown runs, all seeds: grafts {placed}; {growth['fossilized']} fossilized, "
            f"{growth['culls']} culls ({v['size_culls']} for the delta's size), "
            f"{growth['rollbacks']} rollbacks.",
        ]
    if r.get("plot"):
        lines += ["", f"![accuracy vs parameters per task](benchmarks/results/{r['plot']})"]
    return lines


def section_academy(r: Result) -> list[str]:
    rows = [[row["task"], row["policy"], mean_std(row, "test_accuracy", ".1%"),
             f"{row['params_added']['mean']:,.0f}", f"{row['grafts']['mean']:.1f}",
             f"{row['culled']['mean']:.1f}",
             ", ".join(f"{k} {v}" for k, v in row["where"].items()) or "none"]
            for row in r["rows"]]
    verdicts = [f"- {task}: v0 {v['accuracy_delta']:+.1%} test accuracy, "
                f"{v['culled_delta']:+.1f} grafts culled per run vs the heuristic"
                for task, v in r["verdicts"].items()]
    return [
        f"Tasks held out of the replay campaign, {r['epochs']} epochs, {r['seeds']} seeds "
        "(mean ± sample std); both policies grow the same host with the same seeds (input "
        "and every hidden layer) and blueprints.  `v0` is the shipped base policy, greedy.  "
        "Culled grafts are wasted trials.",
        "",
        *table(["task", "policy", "test accuracy", "params added", "grafts", "culled",
                "grafts by blueprint@layer (all seeds)"], rows),
        "",
        *verdicts,
        *nightly_lines(r.get("nightly")),
    ]


def nightly_lines(nightly: dict[str, Any] | None) -> list[str]:
    """The nightly sessions on the rings workload and the champion they left (`nightly vK`
    in the table above), when the result has them."""
    if not nightly:
        return []
    lines = ["", f"Nightly sessions on rings, each after {nightly['runs_per_session']} "
                 "daytime runs of the exploring champion (seeds from 100):"]
    for s in nightly["sessions"]:
        adapter = s["adapter_training_s"]
        gates = ", ".join(f"{name} {value:.3f}" for name, value in s["gates"].items())
        lines.append(
            f"- {s['session']}: {s['status']}"
            + (f" {s['candidate']}" if s["candidate"] else "") + f" (from {s['champion']})"
            + (f"; gates {gates}" if gates else f"; {s['cause']}")
            + ("" if adapter is None else f"; adapter training {adapter:.1f} s "
               f"(target < {nightly['adapter_target_s'] / 60:.0f} min)"))
    lines.append(f"- champion {nightly['champion']} vs v0 {nightly['accuracy_delta_vs_v0']:+.1%}, "
                 f"vs the heuristic {nightly['accuracy_delta_vs_heuristic']:+.1%} test accuracy")
    return lines


def section_checkpoint(r: Result) -> list[str]:
    rows = []
    for name, s in r["sizes"].items():
        m = s["median_ms"]
        rows.append([name, f"{s['params']:,}", f"{s['snapshot_mb']:.1f}",
                     *(f"{m[op]:.1f}" for op in ("capture_fresh", "capture_recycled",
                                                  "rollback", "disk_save", "disk_restore"))])
    budgets = "; ".join(f"{op}: design {b['design']:,.0f} ms, goal ≤ {b['goal']:,.0f} ms"
                        for op, b in r["budgets_ms"].items())
    return [
        f"{r['setup']['host']}; {r['setup']['optimizer']}; medians of {r['setup']['rounds']} "
        f"rounds; page cache {r['setup']['page_cache']}.  {budgets}.",
        "",
        *table(["size", "params", "snapshot MB", "capture fresh ms", "capture recycled ms",
                "rollback ms", "disk save ms", "disk restore ms"], rows),
    ]


def section_optim_rebuild(r: Result) -> list[str]:
    m, budgets = r["median_ms"], r["budgets_ms"]
    rows = [[op, f"{m[op]:.3f}",
             f"{budgets[op]['design']:.0f}" if op in budgets else "",
             f"{budgets[op]['goal']:.0f}" if op in budgets else ""]
            for op in m]
    return [
        f"{r['setup']['host']}: {r['params']:,} parameters, {r['state_tensors']} Adam state "
        f"tensors; medians of {r['setup']['rounds']} rounds.  `torch_reload` is the "
        "conventional rebuild (new optimizer + positional `load_state_dict`) for comparison: "
        f"manager / torch_reload = {r['manager_vs_torch_reload']:.2f}.  State tensors copied "
        f"by rebuilds: {r['state_copies']} of {r['state_tensors_checked']} checked.",
        "",
        *table(["operation", "median ms", "design ms", "goal ms"], rows),
    ]


def section_kasmina_overhead(r: Result) -> list[str]:
    s = r["setup"]
    rows = [[name, f"{sec * 1e3:.1f}", f"{r['ratio_vs_plain'][name]:.3f}",
             f"{r['median_paired_ratio_vs_plain'][name]:.3f}"]
            for name, sec in r["median_epoch_s"].items()]
    return [
        f"{s['host']}, {s['samples']} samples, batch {s['batch']}, {s['dormant_seeds']} "
        f"dormant seeds, {s['rounds']} interleaved rounds; telemetry samples every "
        f"{s['default_telemetry_interval']}th batch by default.  Goal for `dormant`: ≤ "
        f"{r['target_ratio_dormant']}.",
        "",
        *table(["variant", "median epoch ms", "ratio", "paired"], rows),
    ]


def section_startup(r: Result) -> list[str]:
    labels = {"first_batch_s": "command → first training batch",
              "first_batch_cpu_s": "CPU time used by then",
              "process_s": "whole process",
              "config_error_s": "`tolaria train --set optimizer.lrr=0.1` (a typo)",
              "floor_s": "anchor: `python -c \"import torch, torch._dynamo\"`",
              "floor_cpu_s": "its CPU time"}
    rows = [[label, f"{r['median_s'][key]:.2f}", f"{min(r['samples_s'][key]):.2f}",
             f"{max(r['samples_s'][key]):.2f}"] for key, label in labels.items()]
    imported = ", ".join(f"`{name}`" for name in r["imported_at_first_batch"])
    return [
        f"`{r['command']}`, each run a fresh process; {r['runs']} runs after a warm-up run "
        "(MNIST-1D and bytecode caches warm), alternating with the typo.  Wall times from "
        "just before the spawn; the CPU time is the child's own.  Of the heavy optional "
        f"modules, the first batch had imported: {imported or 'none'}.  The anchor is what "
        "any PyTorch training process pays before its first optimizer step: torch, and "
        "`torch._dynamo`, which `torch.optim` imports at its first call even in eager mode.  "
        f"Goal: first batch ≤ {r['goal_s']:.0f} s.",
        "",
        *table(["measure", "median s", "min s", "max s"], rows),
    ]


def section_dashboard(r: Result) -> list[str]:
    labels = {"index": "`GET /`: the runs index",
              "run_page": "`GET /runs/long`: the long run's page",
              "poll_unchanged": "a live page's poll, nothing new",
              "poll_after_append": "a live page's poll after one more epoch",
              "cold_run_page": "the long run's first page (every event parsed once)"}
    rows = [[label, f"{r['median_ms'][key]:.1f}"] for key, label in labels.items()]
    return [
        f"{r['runs']} run directories under one root ({r['root_mb']:.1f} MB), one of them "
        f"{r['long_run_events']:,} events over {r['long_run_epochs']} epochs; {r['timing']}, "
        f"median of {r['rounds']} (the cold page: one).  Memory: the resident set of a "
        f"`tolaria dashboard` process after serving those pages over HTTP: "
        f"**{r['server_rss_mb']:.0f} MB**.  Goals: < {r['goal_ms']:.0f} ms, "
        f"< {r['goal_mb']:.0f} MB.",
        "",
        *table(["request", "median ms"], rows),
    ]


def section_distributed(r: Result) -> list[str]:
    setup, rewrap = r["setup"], r["rewrap_ms"]
    rows = [[name, f"{seconds * 1e3:.1f}", str(setup["batches_per_rank"][name])]
            for name, seconds in r["epoch_s"].items()]
    return [
        f"{setup['host']}, global batch {setup['global_batch']}, {setup['backend']}; medians "
        f"of {setup['epochs_timed']} epochs x {setup['rounds']} launches per contender, "
        "launches alternating.  Speed-up "
        f"{r['speedup']:.2f}, scaling efficiency {r['scaling_efficiency']:.0%} (1.0: twice "
        "as fast); on 2 shared cores two ranks and their gloo threads compete for the same "
        "cores, so little speed-up is expected here.",
        "",
        *table(["processes", "epoch ms", "batches per rank"], rows),
        "",
        f"Re-wrap in DDP of a {rewrap['params']:,}-parameter model (2 ranks): after a graft "
        f"{rewrap['graft']:.1f} ms, after a cull {rewrap['cull']:.1f} ms; the design's budget "
        f"for adding parameters is {rewrap['budget']:.0f} ms.",
    ]


SECTIONS: dict[str, tuple[str, Callable[[Result], list[str]]]] = {
    "trainer_overhead": ("Trainer overhead vs a hand-written loop", section_trainer_overhead),
    "epoch_boundary": ("End-of-epoch hook latency", section_epoch_boundary),
    "growth": ("Growth study: grown vs static hosts on three tasks", section_growth),
    "academy": ("Learned policy v0 vs the heuristic on unseen tasks", section_academy),
    "checkpoint": ("Snapshots, rollback and durable checkpoints", section_checkpoint),
    "optim_rebuild": ("Optimizer rebuild", section_optim_rebuild),
    "kasmina_overhead": ("Dormant-seed overhead", section_kasmina_overhead),
    "distributed": ("Two processes vs one (torch.distributed, gloo)", section_distributed),
    "startup": ("Start-up", section_startup),
    "dashboard": ("Dashboard", section_dashboard),
}


def render(results: dict[str, Result], run_record: Result | None) -> str:
    machine = next((r["machine"] for r in results.values() if "machine" in r), {})
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python -m benchmarks.run_all`) from "
        "`benchmarks/results/*.json`; do not edit by hand.  Every benchmark runs its "
        "contenders side by side in one process (A/B interleaved where times are compared) "
        "and reports medians; `python -m benchmarks.bench_<name> --json` prints one result "
        "as a JSON object.",
        "",
        f"**Machine:** {machine.get('cpu', '?')} (`lscpu` model name), "
        f"{machine.get('cores', '?')}-core CPU container, "
        f"{'GPU ' + machine['gpu'] if machine.get('gpu') else 'no GPU'}; "
        f"{machine.get('platform', '?')}, Python {machine.get('python', '?')}, "
        f"torch {machine.get('torch', '?')}.  Every benchmark sets "
        "`torch.set_num_threads(1)` (the models are tiny; one thread is fastest and least "
        "disturbed by other processes, like the trainer's `run.num_threads=1`).",
    ]
    if run_record:
        total = run_record["total_s"]
        per = ", ".join(f"{name} {rec['wall_time_s']:.0f} s"
                        for name, rec in run_record["benchmarks"].items())
        lines += ["", f"**`make bench` wall time:** {total / 60:.1f} min in total ({per}); "
                      f"finished {run_record['finished']}"
                      + (" (quick smoke sizes: numbers meaningless)" if run_record["quick"]
                         else "") + "."]
    loads = ", ".join(f"{name} {r['machine']['load_average_1min']}"
                      for name, r in results.items() if "machine" in r)
    lines += ["", f"1-minute load average when each started (the machine is shared; "
                  f"above 2 means other work competed for the cores): {loads}.", ""]
    lines += ["## Headline figures against their anchors", ""]
    lines += table(["figure", "measured", "anchor", "verdict"], headline_rows(results))
    for name, (title, render_section) in SECTIONS.items():
        lines += ["", f"## {title}", "", f"`python -m benchmarks.bench_{name}`", ""]
        if name not in results:
            lines.append("_Not run yet._")
            continue
        last_run = (run_record or {}).get("benchmarks", {}).get(name, {})
        if last_run.get("status", "ok") != "ok":
            lines += [f"**The last `make bench` run of this benchmark failed "
                      f"(exit code {last_run.get('returncode')}); the figures below are "
                      f"from an earlier run.**", ""]
        if "finished" in results[name]:
            lines += [f"Measured {results[name]['finished']}.", ""]
        try:
            lines += render_section(results[name])
        except KeyError as missing:
            lines.append(f"_`results/{name}.json` lacks {missing}: written by another "
                         "version of the benchmark; rerun it._")
    return "\n".join(lines).rstrip() + "\n"


def write_report(path: Path = REPORT_PATH) -> Path:
    results = {name: r for name in SECTIONS if (r := read_result(name)) is not None}
    path.write_text(render(results, read_result("run_all")))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=REPORT_PATH)
    print(write_report(parser.parse_args(argv).output))


if __name__ == "__main__":
    main()
