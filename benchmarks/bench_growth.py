"""Growth study on MNIST-1D: does a host grown by Tamiyo beat static models of its size?

Five contenders train for the same number of epochs, once per run seed (>= 3 seeds):

- ``small_static``: the default job's host (MLP hidden [32, 32]) with no seeds;
- ``large_mlp``: a static MLP, hidden [256, 256];
- ``cnn1d``: the static 1-D CNN host (channels [16, 32], kernel 5);
- ``grown``: the default job -- the small host with a seed on its flattened input, grown
  by Tamiyo's heuristic policy;
- ``grown_retrained``: the architecture ``grown`` ended with, trained from scratch as a
  static model: its ``export_structure`` is replayed on a fresh host (same ``run.seed``, so
  the host starts from the grown run's initial weights; blueprints are built anew) with
  every seed that held a blueprint FOSSILIZED (alpha 1, no isolation) and nothing for a
  controller to adapt.

Every contender goes through ``TolariaTrainer`` with the same data, batch size, Adam and
learning rate.  Tamiyo sees the validation split only (it is carved from the training
split); the test split is evaluated once, on the final model, and never used to decide
anything.  We report test accuracy mean +- std over seeds, final parameter count and wall
time, and plot accuracy against parameters to ``benchmarks/results/growth.png``
(``plot`` in the result names the file, beside the JSON).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Any

from benchmarks.common import bench_main, results_dir
from tolaria.build import build_trainer, seed_everything
from tolaria.config import TolariaConfig, load_config
from tolaria.contracts import SeedState
from tolaria.data import DataBundle, load_data
from tolaria.hosts import build_host, count_parameters
from tolaria.kasmina import export_structure, inject_seeds, replay_structure

PLOT_NAME = "growth.png"
#: Test accuracies on MNIST-1D from the dataset's paper (Greydanus, 2020), for scale.
REFERENCE_ACCURACY = {"logistic regression": 0.32, "MLP": 0.68, "CNN": 0.94}
STATIC = ["kasmina.layers=[]"]
CONTENDERS: dict[str, list[str]] = {
    "small_static": STATIC,
    "large_mlp": [*STATIC, "model.kwargs.hidden=[256,256]"],
    "cnn1d": [*STATIC, "model.host=cnn1d", "model.kwargs={channels: [16, 32], kernel_size: 5}"],
    "grown": [],
}
LABELS = {
    "small_static": "(a) small host, no seeds",
    "large_mlp": "(b) large static MLP",
    "cnn1d": "(c) static 1-D CNN",
    "grown": "(d) small host grown by Tamiyo",
    "grown_retrained": "(e) grown architecture, retrained",
}


def study_config(overrides: list[str], epochs: int, seed: int) -> TolariaConfig:
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


def train_grown(config: TolariaConfig, data: DataBundle) -> tuple[dict[str, Any], dict]:
    trainer = build_trainer(config, data=data)
    summary = trainer.train()
    structure = export_structure(trainer.model)
    adaptations = sum(len(seed["history"]) for seed in structure["seeds"])
    result = outcome(summary, trainer) | {
        "params_initial": summary["params_initial"],
        "seed_transitions": adaptations,
        "final_seed_states": summary["seeds"],
        "grafts": grafts(structure),
    }
    return result, structure


def train_retrained(config: TolariaConfig, data: DataBundle, structure: dict) -> dict[str, Any]:
    """Contender (e): the grown structure on a fresh host, trained with nothing adapting."""
    seed_everything(config.run.seed)  # the host init of the grown run
    model = build_host(config.model, data.input_shape, data.num_classes)
    # Nobody reads telemetry of a static model; its seeds are only the grown blueprints.
    inject_seeds(model, config.kasmina.model_copy(update={"telemetry": False}))
    replay_structure(model, fossilized(structure))
    static = config.model_copy(deep=True)
    static.kasmina.layers = []  # already injected
    # The controller is handed the seeds but may never grow: nothing adapts in (e).
    static.tamiyo.min_epochs_before_growth = config.run.epochs + 1
    trainer = build_trainer(static, model=model, data=data)
    result = outcome(trainer.train(), trainer)
    structure = export_structure(model)
    return result | {
        "grafts": grafts(structure),
        # Must be 0: a static retrain; any transition means the controller adapted.
        "seed_transitions": sum(len(seed["history"]) for seed in structure["seeds"]),
    }


def run_seed(seed: int, epochs: int, data: DataBundle, progress: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, overrides in CONTENDERS.items():
        config = study_config(overrides, epochs, seed)
        if name == "grown":
            results[name], structure = train_grown(config, data)
            results["grown_retrained"] = train_retrained(config, data, structure)
        else:
            trainer = build_trainer(config, data=data)
            results[name] = outcome(trainer.train(), trainer)
        if progress:
            done = [n for n in results if n in (name, "grown_retrained")]
            for n in done:
                r = results[n]
                print(f"  seed {seed} {n:<16} test {r['test_accuracy']:.3f} "
                      f"params {r['params']:>7,} {r['wall_time_s']:6.1f} s", flush=True)
    return results


def aggregate(per_seed: dict[int, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and sample std over seeds of each contender's headline numbers."""
    names = next(iter(per_seed.values())).keys()
    table = {}
    for name in names:
        runs = [per_seed[seed][name] for seed in per_seed]
        row: dict[str, float] = {}
        for key in ("test_accuracy", "final_val_accuracy", "params", "wall_time_s"):
            values = [r[key] for r in runs]
            row[f"{key}_mean"] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table[name] = row
    return table


def plot(per_seed: dict[int, dict[str, Any]], table: dict[str, dict[str, float]],
         epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, (name, row) in enumerate(table.items()):
        color = f"C{index}"
        # (e) has (d)'s parameter count by construction: draw it 4% to the right.
        shift = 1.04 if name == "grown_retrained" else 1.0
        xs = [per_seed[seed][name]["params"] * shift for seed in per_seed]
        ys = [per_seed[seed][name]["test_accuracy"] for seed in per_seed]
        ax.scatter(xs, ys, color=color, alpha=0.35, s=14)
        ax.errorbar(row["params_mean"] * shift, row["test_accuracy_mean"],
                    yerr=row["test_accuracy_std"], fmt="o", color=color, capsize=4,
                    label=LABELS[name] + (" (drawn shifted right)" if shift != 1 else ""))
    for index, (model, accuracy) in enumerate(REFERENCE_ACCURACY.items()):
        ax.axhline(accuracy, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"paper: {model} {accuracy:.0%}", xy=(0.01, accuracy), fontsize=7,
                    xycoords=("axes fraction", "data"), va="bottom", color="grey",
                    xytext=(0, 1 + index), textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("final trainable parameters (log scale)")
    ax.set_ylabel("MNIST-1D test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Growth study: {epochs} epochs, {len(per_seed)} seeds (mean ± std)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = results_dir() / PLOT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=100, help="epoch budget of every run")
    parser.add_argument("--seeds", type=int, default=5, help="run seeds 0..N-1 (>= 3)")
    parser.add_argument("--no-plot", action="store_true", help="skip growth.png")


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = study_config([], args.epochs, 0)
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in range(args.seeds):
        # The dataset itself is fixed; each seed carves its own validation split.
        data = load_data(base.data, seed)
        per_seed[seed] = run_seed(seed, args.epochs, data, progress=not args.json)
    table = aggregate(per_seed)
    if not args.no_plot:
        plot(per_seed, table, args.epochs)
    return {
        "epochs": args.epochs,
        "seeds": list(per_seed),
        "labels": LABELS,
        "reference_accuracy": REFERENCE_ACCURACY,
        "summary": table,
        "runs": {str(seed): results for seed, results in per_seed.items()},
        "plot": None if args.no_plot else PLOT_NAME,
    }


def report(result: dict[str, Any]) -> None:
    print(f"MNIST-1D growth study: {result['epochs']} epochs, seeds {result['seeds']}; "
          "test accuracy of the final model (decisions saw the validation split only)")
    print(f"{'contender':<36} {'test acc':>15} {'params':>16} {'wall s':>12}")
    for name, row in result["summary"].items():
        print(f"{LABELS[name]:<36} "
              f"{row['test_accuracy_mean']:>7.3f} ± {row['test_accuracy_std']:.3f} "
              f"{row['params_mean']:>8,.0f} ± {row['params_std']:<5,.0f} "
              f"{row['wall_time_s_mean']:>6.1f} ± {row['wall_time_s_std']:.1f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main("growth", __doc__.split("\n")[0], argv, configure, run, report)


if __name__ == "__main__":
    main()
