"""`tolaria plot RUN_DIR`: a run's story in one picture.

Validation accuracy and the training/validation losses per epoch, the parameter count
as the model grows, and a marker at every seed transition and rollback from the event
log -- the view a researcher wants when asking "what did growth do, and when?".
"""

from __future__ import annotations

from pathlib import Path

from tolaria.errors import ConfigError
from tolaria.rundir import RunDirectory

#: Transition colours: the moments that change the model.
_MARKS = {"germinated": "tab:blue", "fossilized": "tab:green", "culled": "tab:red"}


def plot_run(run: RunDirectory, out: Path | None = None) -> Path:
    """Draw ``run``'s curves to ``out`` (default ``<run_dir>/curves.png``); return the path."""
    metrics = run.metrics()
    if not metrics:
        raise ConfigError(f"{run.path}: no epochs recorded yet (metrics.jsonl is empty)")
    import matplotlib  # slow import: only when asked to plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out) if out is not None else run.path / "curves.png"
    _check_writable(out)

    # A rollback re-runs epochs: keep the record that survived (the last for each epoch).
    by_epoch = {m["epoch"]: m for m in metrics}
    epochs = sorted(by_epoch)
    rows = [by_epoch[e] for e in epochs]

    def curve(key: str) -> list[float]:
        return [float(r[key]) for r in rows]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    top.plot(epochs, curve("val_accuracy"), color="black", label="validation accuracy")
    top.set_ylabel("validation accuracy")
    params = top.twinx()
    params.step(epochs, curve("params"), where="post", color="tab:purple", alpha=0.6)
    params.set_ylabel("trainable parameters", color="tab:purple")
    bottom.plot(epochs, curve("train_loss"), label="training loss")
    bottom.plot(epochs, curve("val_loss"), label="validation loss")
    bottom.set_ylabel("loss")
    bottom.set_xlabel("epoch")
    bottom.legend(loc="upper right")

    labelled: set[str] = set()
    for event in run.events():
        kind = event["event"]
        if kind == "adaptation" and event["to_state"] in _MARKS:
            label = event["to_state"]
            style = {"color": _MARKS[label], "linestyle": ":"}
        elif kind == "rollback":
            label, style = "rollback", {"color": "tab:orange", "linestyle": "--"}
        else:
            continue
        for axis in (top, bottom):
            axis.axvline(
                event["epoch"], alpha=0.7, label=None if label in labelled else label, **style
            )
        labelled.add(label)
    if labelled:
        top.legend(loc="lower right", fontsize="small")
    top.set_title(f"{run.path.name}: growth and learning curves")
    top.grid(alpha=0.3)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=110)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write it ({exc.strerror})") from None
    finally:
        plt.close(fig)
    return out


def _check_writable(out: Path) -> None:
    """Refuse, before drawing, a file matplotlib could not write: no folder is made for it,
    and its extension is what chooses the format."""
    from matplotlib.backend_bases import FigureCanvasBase

    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: no folder {out.parent}")
    supported = FigureCanvasBase.get_supported_filetypes()
    if out.suffix[1:].lower() not in supported:
        raise ConfigError(
            f"--out {out}: cannot write {out.suffix or 'a file without an extension'} "
            f"(supported: {', '.join('.' + ext for ext in supported)})"
        )
