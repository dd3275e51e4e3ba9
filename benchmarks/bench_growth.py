"""Growth study: does one grown run match what a width sweep of static hosts finds?

On every task of ``TASKS`` and every run seed (>= 3), these contenders train for the same
number of epochs, with the task's data, optimizer and learning rate:

- (a) ``small_static``: the task's host with no seeds;
- the width sweep ``static_x<m>``: static hosts ``m`` times wider (``--widths``), along the
  task's width axis;
- (b) ``best_static``: the sweep width chosen fairly -- among the widths whose mean final
  parameter count is at most ``SIZE_TOLERANCE`` x that of (c), the one with the best mean
  *validation* accuracy (the narrowest width when none is that small); its test accuracy
  is reported, never used to choose;
- (c) ``grown``: the task as configured, grown by Tamiyo;
- (d) ``grown_retrained``: the architecture (c) ended with, trained from scratch as a
  static model: its ``export_structure`` is replayed on a fresh host (same ``run.seed``, so
  the host starts from (c)'s initial weights; blueprints are built anew) with every seed
  that held a blueprint FOSSILIZED and nothing for a controller to adapt.

Every contender goes through ``TolariaTrainer``.  Tamiyo sees the validation split only
(carved from the training split by the run seed); the test split is evaluated once, on
the final model.  The claim growth must earn (issue 17): (c) beats (a) by more than (c)'s
seed-to-seed std, matches (b), and costs less than the sweep (the sum of one seed's wall
times over all widths); a grown run may take at most ``WALL_LIMIT`` x the wall time of
(d).  The study reads what the grown runs did from their seeds' histories (grafts by
blueprint@layer, culls, culls for the delta's size), and plots test accuracy against
parameters, one panel per task, to ``benchmarks/results/growth.png``.

It drives whatever the ``load_config()`` defaults are, as a user's ``--set`` would.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.common import bench_main, results_dir, rotated
from tolaria.build import build_trainer, seed_everything
from tolaria.config import TolariaConfig, load_config
from tolaria.contracts import SeedState
from tolaria.data import DataBundle, load_data
from tolaria.hosts import build_host, count_parameters
from tolaria.kasmina import export_structure, inject_seeds, replay_structure

PLOT_NAME = "growth.png"
#: (b) may be this much larger than (c) and still count as "the same final size".
SIZE_TOLERANCE = 1.05
#: The issue's limit on a grown run's wall time over its architecture retrained.
WALL_LIMIT = 1.3
#: What a cull's reason says when the delta grew too large in TRAINING (tamiyo's policy).
SIZE_CULL_MARK = "max_delta_ratio"
#: The default sweep: 1.1 brackets a run that grew by a few percent, 3 is above 5x the
#: small host's parameters on every task (more than a full parameter budget grows).
DEFAULT_WIDTHS = (1.1, 1.25, 1.5, 2.0, 2.5, 3.0)
#: Test accuracies on MNIST-1D from the dataset's paper (Greydanus, 2020), for scale.
REFERENCE_ACCURACY = {"logistic regression": 0.32, "MLP": 0.68, "CNN": 0.94}
STATIC = ("kasmina.layers=[]",)
METRICS = ("test_accuracy", "final_val_accuracy", "params", "wall_time_s")


@dataclass(frozen=True)
class Task:
    label: str
    #: ``--set`` overrides on the default job that make this task's grown run (c).
    overrides: tuple[str, ...]
    #: ``width(m)``: the overrides that make the task's host ``m`` times wider.
    width: Callable[[float], list[str]]


def widened(key: str, base: Sequence[int]) -> Callable[[float], list[str]]:
    """The width axis ``key=[round(b * m), ...]`` (half up, at least 1) over ``base``."""
    def width(m: float) -> list[str]:
        return [f"{key}=[{', '.join(str(max(1, math.floor(b * m + 0.5))) for b in base)}]"]
    return width


MLP_WIDTH = widened("model.kwargs.hidden", (32, 32))
TASKS: dict[str, Task] = {
    "mnist1d-hidden": Task(
        "MNIST-1D, mlp [32, 32], seeds on the hidden layers",
        ('kasmina.layers=["hidden.*"]',),
        MLP_WIDTH,
    ),
    "mnist1d-default": Task("MNIST-1D, the default job", (), MLP_WIDTH),
    "digits-cnn": Task(
        "digits 8x8, cnn2d [4, 8], seeds on the conv blocks",
        ("data.dataset=digits", "model.host=cnn2d", "model.kwargs={channels: [4, 8]}",
         'kasmina.layers=["hidden.*"]'),
        widened("model.kwargs.channels", (4, 8)),
    ),
}


def sweep_name(width: float) -> str:
    return f"static_x{width:g}"


def study_config(overrides: Sequence[str], epochs: int, seed: int) -> TolariaConfig:
    return load_config(overrides=[
        f"run.epochs={epochs}",
        f"run.seed={seed}",
        "run.device=cpu",
        "run.progress=false",
        "run.tensorboard=false",
        *overrides,
    ])


def fossilized(structure: dict[str, Any]) -> dict[str, Any]:
    """The structure with every blueprint-holding seed FOSSILIZED and the rest DORMANT,
    all counters and histories cleared: a static architecture with nothing on trial."""
    result = copy.deepcopy(structure)
    for record in result["seeds"]:
        grown = SeedState(record["state"]).holds_blueprint
        record.update(
            state=(SeedState.FOSSILIZED if grown else SeedState.DORMANT).value,
            alpha=1.0 if grown else 0.0,
            epochs_in_state=0,
            clock=0,
            history=[],
        )
        if not grown:
            record.update(blueprint=None, blueprint_kwargs={})
    return result


def grafts(structure: dict[str, Any]) -> dict[str, str]:
    """``seed_id -> "blueprint (state)"`` for every seed holding a blueprint."""
    return {
        record["seed_id"]: f"{record['blueprint']} ({record['state']})"
        for record in structure["seeds"]
        if SeedState(record["state"]).holds_blueprint
    }


def activity(structure: dict[str, Any]) -> dict[str, Any]:
    """What a grown run did, from its seeds' histories: germinations by blueprint@layer,
    culls, and the culls whose reason was the delta's size (``SIZE_CULL_MARK``)."""
    placed: Counter[str] = Counter()
    culls = size_culls = 0
    for record in structure["seeds"]:
        layer = record["seed_id"].rsplit(".", 1)[0]  # seed ids are "<layer>.<chunk>"
        for move in record["history"]:
            if move["to_state"] == SeedState.GERMINATED:
                placed[f"{move['blueprint']}@{layer}"] += 1
            elif move["to_state"] == SeedState.CULLED:
                culls += 1
                size_culls += SIZE_CULL_MARK in move["reason"]
    return {"grafts_by_place": dict(sorted(placed.items())), "culls": culls,
            "size_culls": size_culls}


def outcome(summary: dict[str, Any], trainer) -> dict[str, Any]:
    return {
        "test_accuracy": summary["test_accuracy"],
        "final_val_accuracy": summary["final_val_accuracy"],
        "best_val_accuracy": summary["best_val_accuracy"],
        "params": count_parameters(trainer.model),
        "wall_time_s": summary["wall_time_s"],
        "rollbacks": summary["rollbacks"],
        "status": summary["status"],
    }


def train_static(config: TolariaConfig, data: DataBundle) -> dict[str, Any]:
    trainer = build_trainer(config, data=data)
    return outcome(trainer.train(), trainer)


def train_grown(config: TolariaConfig, data: DataBundle) -> tuple[dict[str, Any], dict]:
    trainer = build_trainer(config, data=data)
    summary = trainer.train()
    structure = export_structure(trainer.model)
    result = outcome(summary, trainer) | {
        "params_initial": summary["params_initial"],
        "seed_transitions": sum(len(seed["history"]) for seed in structure["seeds"]),
        "final_seed_states": summary["seeds"],
        "grafts": grafts(structure),
        **activity(structure),
    }
    return result, structure


def train_retrained(config: TolariaConfig, data: DataBundle, structure: dict) -> dict[str, Any]:
    """Contender (d): the grown structure on a fresh host, trained with nothing adapting."""
    seed_everything(config.run.seed)  # the host init of the grown run
    model = build_host(config.model, data.input_shape, data.num_classes)
    # Nobody reads telemetry of a static model; its seeds are only the grown blueprints.
    inject_seeds(model, config.kasmina.model_copy(update={"telemetry": False}))
    replay_structure(model, fossilized(structure))
    static = config.model_copy(deep=True)
    static.kasmina.layers = []  # already injected
    # The controller is handed the seeds but may never grow: nothing adapts in (d).
    static.tamiyo.min_epochs_before_growth = config.run.epochs + 1
    trainer = build_trainer(static, model=model, data=data)
    result = outcome(trainer.train(), trainer)
    structure = export_structure(model)
    return result | {
        "grafts": grafts(structure),
        # Must be 0: a static retrain; any transition means the controller adapted.
        "seed_transitions": sum(len(seed["history"]) for seed in structure["seeds"]),
    }


def run_seed(task: Task, seed: int, epochs: int, widths: Sequence[float],
             progress: bool) -> dict[str, Any]:
    """Every contender of ``task`` for one run seed, on the same data."""
    def config(*overrides: str) -> TolariaConfig:
        return study_config([*task.overrides, *overrides], epochs, seed)

    data = load_data(config().data, seed)  # each seed carves its own validation split
    statics = {"small_static": STATIC,
               **{sweep_name(m): (*task.width(m), *STATIC) for m in widths}}
    results: dict[str, Any] = {}
    # Each seed starts at another contender, so a drift in machine speed hits all alike.
    for name in rotated([*statics, "grown"], seed):
        if name == "grown":  # (d) needs (c)'s structure: it runs right after
            results["grown"], structure = train_grown(config(), data)
            results["grown_retrained"] = train_retrained(config(), data, structure)
        else:
            results[name] = train_static(config(*statics[name]), data)
        if progress:
            for done in (name, "grown_retrained") if name == "grown" else (name,):
                r = results[done]
                print(f"  seed {seed} {done:<16} test {r['test_accuracy']:.3f} "
                      f"params {r['params']:>7,} {r['wall_time_s']:6.1f} s", flush=True)
    return results


def aggregate(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and sample std over seeds of one contender's headline numbers."""
    row: dict[str, float] = {}
    for key in METRICS:
        values = [r[key] for r in runs]
        row[f"{key}_mean"] = statistics.fmean(values)
        row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return row


def sweep_row(width: float, row: dict[str, float]) -> dict[str, Any]:
    return {"width": width, "name": sweep_name(width), "params_mean": row["params_mean"],
            "val_accuracy_mean": row["final_val_accuracy_mean"],
            "test_accuracy_mean": row["test_accuracy_mean"],
            "test_accuracy_std": row["test_accuracy_std"],
            "wall_time_s_mean": row["wall_time_s_mean"]}


def best_static(sweep: list[dict[str, Any]], grown_params: float) -> dict[str, Any]:
    """(b): the best mean validation accuracy among widths at most ``SIZE_TOLERANCE`` x the
    grown runs' mean final size; the narrowest width when none is that small."""
    fits = [row for row in sweep if row["params_mean"] <= grown_params * SIZE_TOLERANCE]
    if fits:
        best = max(fits, key=lambda row: row["val_accuracy_mean"])
        return best | {"rule": "best validation at (c)'s size"}
    narrowest = min(sweep, key=lambda row: row["width"])
    return narrowest | {"rule": "narrowest: no width is as small as (c)"}


def summarize(per_seed: dict[int, dict[str, Any]], widths: Sequence[float]) -> dict[str, Any]:
    """One task's summary, sweep, (b), verdict and growth activity from its runs."""
    def runs(name: str) -> list[dict[str, Any]]:
        return [results[name] for results in per_seed.values()]

    summary = {name: aggregate(runs(name))
               for name in ("small_static", "grown", "grown_retrained")}
    sweep = [sweep_row(m, aggregate(runs(sweep_name(m)))) for m in widths]
    chosen = best_static(sweep, summary["grown"]["params_mean"])
    summary["best_static"] = aggregate(runs(chosen["name"]))
    a, b, c, d = (summary[name] for name in
                  ("small_static", "best_static", "grown", "grown_retrained"))
    sweep_compute = sum(row["wall_time_s_mean"] for row in sweep)
    points = 100.0  # accuracy differences are reported in percentage points
    c_minus_a = (c["test_accuracy_mean"] - a["test_accuracy_mean"]) * points
    c_std = c["test_accuracy_std"] * points
    grown = runs("grown")
    return {
        "summary": summary,
        "sweep": sweep,
        "best_static": chosen,
        "sweep_best_overall": max(sweep, key=lambda row: row["val_accuracy_mean"]),
        "verdict": {
            "c_minus_a": c_minus_a,
            "c_minus_b": (c["test_accuracy_mean"] - b["test_accuracy_mean"]) * points,
            "c_std": c_std,
            "c_beats_a": c_minus_a > c_std,
            "sweep_compute_s": sweep_compute,
            "grown_wall_s": c["wall_time_s_mean"],
            "sweep_over_grown": sweep_compute / c["wall_time_s_mean"],
            "wall_ratio_c_over_d": c["wall_time_s_mean"] / d["wall_time_s_mean"],
            "wall_limit": WALL_LIMIT,
            "size_culls": sum(r["size_culls"] for r in grown),
        },
        "growth": {
            "grafts_by_place": dict(sorted(sum(
                (Counter(r["grafts_by_place"]) for r in grown), Counter()).items())),
            "culls": sum(r["culls"] for r in grown),
            "rollbacks": sum(r["rollbacks"] for r in grown),
            "fossilized": sum(r["final_seed_states"].get(SeedState.FOSSILIZED, 0)
                              for r in grown),
        },
    }


def plot(tasks: dict[str, dict[str, Any]], epochs: int, seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.3), squeeze=False)
    # (a) is a square: where nothing grew it sits under (c).
    points = {"small_static": ("(a) small static", "C0", "s"), "grown": ("(c) grown", "C3", "o"),
              "grown_retrained": ("(d) grown, retrained (drawn shifted right)", "C2", "o")}
    for ax, (name, result) in zip(axes[0], tasks.items(), strict=True):
        sweep = result["sweep"]
        ax.errorbar([r["params_mean"] for r in sweep], [r["test_accuracy_mean"] for r in sweep],
                    yerr=[r["test_accuracy_std"] for r in sweep], color="C7", marker=".",
                    capsize=3, label="static width sweep")
        chosen = result["best_static"]
        ax.scatter(chosen["params_mean"], chosen["test_accuracy_mean"], s=140,
                   facecolors="none", edgecolors="C1", linewidths=2,
                   label=f"(b) best static (×{chosen['width']:g})")
        for contender, (label, color, marker) in points.items():
            row = result["summary"][contender]
            # (d) has (c)'s parameter count by construction: draw it 4% to the right.
            shift = 1.04 if contender == "grown_retrained" else 1.0
            runs = result["runs"].values()
            ax.scatter([r[contender]["params"] * shift for r in runs],
                       [r[contender]["test_accuracy"] for r in runs],
                       color=color, alpha=0.35, s=14)
            ax.errorbar(row["params_mean"] * shift, row["test_accuracy_mean"],
                        yerr=row["test_accuracy_std"], fmt=marker, color=color, capsize=4,
                        label=label)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("final trainable parameters (log scale)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{name}: {result['label']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"Growth study: {epochs} epochs, {seeds} seeds (mean ± std)")
    fig.tight_layout()
    path = results_dir() / PLOT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def positive(kind: type) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind(text)`` if it is above 0, else a one-line usage error."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=positive(int), default=load_config().run.epochs,
                        help="epoch budget of every run (default: the default job's, %(default)s)")
    parser.add_argument("--seeds", type=positive(int), default=3,
                        help="run seeds 0..N-1 (default 3)")
    parser.add_argument("--widths", type=positive(float), nargs="+", default=list(DEFAULT_WIDTHS),
                        help="width multipliers of the static sweep (default: %(default)s)")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS),
                        help="tasks to study (default: all)")
    parser.add_argument("--no-plot", action="store_true", help="skip growth.png")


def run(args: argparse.Namespace) -> dict[str, Any]:
    widths = sorted(set(args.widths))
    tasks: dict[str, dict[str, Any]] = {}
    for name in args.tasks:
        task = TASKS[name]
        if not args.json:
            print(f"{name}: {task.label}", flush=True)
        per_seed = {seed: run_seed(task, seed, args.epochs, widths, progress=not args.json)
                    for seed in range(args.seeds)}
        tasks[name] = {"label": task.label, **summarize(per_seed, widths),
                       "runs": {str(seed): results for seed, results in per_seed.items()}}
    if not args.no_plot:
        plot(tasks, args.epochs, args.seeds)
    return {
        "epochs": args.epochs,
        "seeds": list(range(args.seeds)),
        "widths": widths,
        "size_tolerance": SIZE_TOLERANCE,
        "reference_accuracy": REFERENCE_ACCURACY,
        "tasks": tasks,
        "plot": None if args.no_plot else PLOT_NAME,
    }


def report(result: dict[str, Any]) -> None:
    print(f"Growth study: {result['epochs']} epochs, seeds {result['seeds']}; test accuracy "
          "of the final model (decisions saw the validation split only)")
    for name, task in result["tasks"].items():
        print(f"\n{name}: {task['label']}")
        rows = [(contender, task["summary"][contender]) for contender in
                ("small_static", "best_static", "grown", "grown_retrained")]
        print(f"  {'contender':<22} {'test acc':>15} {'params':>16} {'wall s':>12}")
        for contender, row in rows:
            label = (f"best_static (x{task['best_static']['width']:g})"
                     if contender == "best_static" else contender)
            print(f"  {label:<22} "
                  f"{row['test_accuracy_mean']:>7.3f} ± {row['test_accuracy_std']:.3f} "
                  f"{row['params_mean']:>8,.0f} ± {row['params_std']:<5,.0f} "
                  f"{row['wall_time_s_mean']:>6.1f} ± {row['wall_time_s_std']:.1f}")
        v = task["verdict"]
        print(f"  c - a {v['c_minus_a']:+.1f} pts, c - b {v['c_minus_b']:+.1f} pts, std of c "
              f"{v['c_std']:.1f}; sweep {v['sweep_compute_s']:.0f} s = "
              f"{v['sweep_over_grown']:.1f}x a grown run; wall c/d "
              f"{v['wall_ratio_c_over_d']:.2f} (limit {WALL_LIMIT}); size culls "
              f"{v['size_culls']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main("growth", __doc__.split("\n")[0], argv, configure, run, report)


if __name__ == "__main__":
    main()
