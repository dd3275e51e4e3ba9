"""Export: folded grafts compute what the grown model computes, and the exported files run,
at any batch size, in a Python that cannot import Tolaria."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from drills import CLI_SETTINGS, train_args
from tolaria.build import build_trainer
from tolaria.cli import main
from tolaria.contracts import SeedState
from tolaria.errors import ExportError
from tolaria.export import export_model, fold_grafts
from tolaria.kasmina import KasminaLayer, KasminaSeed, ablated, find_seeds

#: Seed index -> the state it is driven to (the rest stay DORMANT).  Four chunks a layer,
#: two layers: the fossil and three trial states on the first, a cull on the second.
LIFECYCLE = {
    0: SeedState.FOSSILIZED,
    1: SeedState.BLENDING,
    2: SeedState.PROBATIONARY,
    3: SeedState.TRAINING,
    4: SeedState.CULLED,
    6: SeedState.FOSSILIZED,
}
PATH = {
    SeedState.TRAINING: [SeedState.TRAINING],
    SeedState.BLENDING: [SeedState.TRAINING, SeedState.BLENDING],
    SeedState.PROBATIONARY: [SeedState.TRAINING, SeedState.BLENDING, SeedState.PROBATIONARY],
    SeedState.FOSSILIZED: [
        SeedState.TRAINING,
        SeedState.BLENDING,
        SeedState.PROBATIONARY,
        SeedState.FOSSILIZED,
    ],
    SeedState.CULLED: [SeedState.TRAINING, SeedState.CULLED],
}
BLUEPRINTS = {"mlp": ["residual_mlp", "low_rank"], "cnn1d": ["conv1d_residual", "se_gate"]}


@pytest.fixture(params=["mlp", "cnn1d"])
def grown(request, tiny_config, tiny_data) -> tuple[nn.Module, torch.Tensor]:
    """A host trained two epochs by the trainer, then grown by commanding its seeds:
    ``(model in eval mode, a validation batch)``."""
    host = request.param
    tiny_config.model.host = host
    if host == "cnn1d":
        tiny_config.model.kwargs = {"channels": [8, 8]}
        # On the convolutions themselves, which run their layer by a forward hook (on the
        # mlp's blocks, nn.Sequential runs it as its last child).
        tiny_config.kasmina.layers = ["hidden.*.0"]
    tiny_config.tamiyo.min_epochs_before_growth = 100  # the test commands the seeds itself
    tiny_config.kasmina.blend_epochs = 3
    trainer = build_trainer(tiny_config, data=tiny_data)
    for epoch in range(2):
        trainer.run_epoch(epoch)
    model = trainer.model
    seeds = find_seeds(model)
    assert len(seeds) == 8
    for i, state in LIFECYCLE.items():
        seeds[i].germinate(BLUEPRINTS[host][i % 2], epoch=2, reason="test")
        for to in PATH[state]:
            seeds[i].transition(to, epoch=2, reason="test")
    with torch.no_grad():  # trained-looking deltas: zero-initialised ones would fold to anything
        for seed in seeds:
            for p in seed.parameters():
                p.add_(0.3 * torch.randn_like(p))
    assert 0 < seeds[1].alpha < 1
    x = torch.stack([tiny_data.val[i][0] for i in range(16)])
    return model.eval(), x


def on_trial(model: nn.Module) -> list[str]:
    return [seed.seed_id for seed in find_seeds(model) if seed.state.is_active]


@pytest.mark.parametrize("trials", ["drop", "keep"])
def test_folded_model_computes_the_grown_function(grown, trials):
    model, x = grown
    states = [seed.state for seed in find_seeds(model)]
    with torch.no_grad():
        kept = model(x)
        with ablated(model, on_trial(model)):  # Tolaria's own "as if they were culled"
            dropped = model(x)
        folded = fold_grafts(model, trials=trials)
        out = folded(x)
    assert (kept - dropped).abs().max() > 1e-3, "the seeds on trial must change the output"
    expected = kept if trials == "keep" else dropped
    assert (out - expected).abs().max() <= 1e-6
    assert not any(isinstance(m, KasminaLayer | KasminaSeed) for m in folded.modules())
    assert [seed.state for seed in find_seeds(model)] == states  # the grown model is untouched


def test_fold_keeps_host_names_and_only_the_grafts_that_add_something(grown):
    model, _ = grown
    seeds = find_seeds(model)
    folded = fold_grafts(model, trials="drop")
    names = set(dict(folded.named_parameters()))
    host = {n for n in dict(model.named_parameters()) if ".kasmina." not in n}
    assert host <= names
    grafts = {(n.split(".kasmina.")[0], n.split(".deltas.")[1][0]) for n in names - host}
    first, second = (seeds[0].layer.module_fqn, seeds[-1].layer.module_fqn)
    assert grafts == {(first, "0"), (second, "2")}  # the two fossils, by layer and chunk
    kept = set(dict(fold_grafts(model, trials="keep").named_parameters())) - host
    assert len(kept) > len(names - host)  # BLENDING and PROBATIONARY deltas too


@pytest.mark.parametrize("format", ["exported-program", "state-dict"])
def test_export_reproduces_the_model_at_batch_sizes_1_and_7(grown, format, tmp_path):
    model, x = grown
    out = export_model(model, x[:3], target(tmp_path, format), format, trials="keep")
    loaded = load_in_process(format, out)
    with torch.no_grad():
        for n in (1, 7):
            assert (loaded(x[:n]) - model(x[:n])).abs().max() <= 1e-6


def target(folder, format: str):
    return folder / ("model.pt2" if format == "exported-program" else "model")


def load_in_process(format: str, out) -> nn.Module:
    if format == "exported-program":
        return torch.export.load(out).module()
    spec = importlib.util.spec_from_file_location("model", out / "model.py")  # `import model`
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load()


#: Loads each export given as FORMAT PATH with `import tolaria` made impossible, runs it on the
#: saved inputs and prints the largest difference from what the grown model gave in-process.
WITHOUT_TOLARIA = textwrap.dedent(
    """
    import sys

    class NoTolaria:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tolaria":
                raise ImportError("tolaria is not installed here")

    sys.meta_path.insert(0, NoTolaria())
    import torch

    def load(format, out):
        if format == "exported-program":
            return torch.export.load(out).module()
        sys.path.insert(0, out)
        import model

        return model.load()

    cases, *exports = sys.argv[1:]
    models = [load(format, out) for format, out in zip(exports[::2], exports[1::2])]
    try:
        import tolaria  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("tolaria was importable")
    worst = 0.0
    with torch.no_grad():
        for x, expected in torch.load(cases, weights_only=True):
            for model in models:
                worst = max(worst, (model(x) - expected).abs().max().item())
    assert not any(m.split(".")[0] == "tolaria" for m in sys.modules)
    print(len(models), worst)
    """
)


@pytest.mark.slow
def test_the_exports_run_where_tolaria_cannot_be_imported(grown, tmp_path):
    model, x = grown
    exports = []
    for format in ("exported-program", "state-dict"):
        out = export_model(model, x[:2], target(tmp_path, format), format, trials="drop")
        exports += [format, str(out)]
    with torch.no_grad(), ablated(model, on_trial(model)):
        cases = [(x[:n], model(x[:n])) for n in (1, 7)]
    torch.save(cases, tmp_path / "cases.pt")
    result = subprocess.run(
        [sys.executable, "-I", "-c", WITHOUT_TOLARIA, str(tmp_path / "cases.pt"), *exports],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    count, worst = result.stdout.split()
    assert int(count) == 2 and float(worst) <= 1e-6


class PinnedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).reshape(3, 2)  # only ever a batch of 3


def test_a_forward_that_fixes_the_batch_size_is_refused(tmp_path):
    with pytest.raises(ExportError, match="fixes the batch size at 3"):
        export_model(PinnedBatch(), torch.randn(3, 4), tmp_path / "m.pt2", "exported-program")
    assert not (tmp_path / "m.pt2").exists()


def test_the_state_dict_model_trains(grown, tmp_path):
    model, x = grown
    out = export_model(model, x, target(tmp_path, "state-dict"), "state-dict", trials="keep")
    loaded = load_in_process("state-dict", out)
    loaded(x).logsumexp(1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loaded.parameters())
    assert sum(p.numel() for p in loaded.parameters()) == sum(
        p.numel() for p in fold_grafts(model, trials="keep").parameters()
    )


@torch.library.custom_op("tolaria_tests::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


twice.register_fake(lambda x: torch.empty_like(x))


class CustomOp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return twice(x)


def test_a_custom_op_goes_in_an_exported_program_but_not_in_a_state_dict(tmp_path):
    x = torch.randn(2, 3)
    export_model(CustomOp(), x, tmp_path / "m.pt2", "exported-program")
    with pytest.raises(ExportError, match=r"calls tolaria_tests\.twice\.default, which is not a"):
        export_model(CustomOp(), x, tmp_path / "m", "state-dict")
    assert not (tmp_path / "m").exists()


def test_bad_choices_and_paths_are_one_clear_error(tmp_path):
    model, x = nn.Linear(4, 2), torch.randn(2, 4)
    with pytest.raises(ExportError, match="trials='maybe' is not one of drop, keep"):
        fold_grafts(model, trials="maybe")
    with pytest.raises(ExportError, match="format='onnx' is not one of"):
        export_model(model, x, tmp_path / "m", "onnx")
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match="is a file, but the state-dict format writes a folder"):
        export_model(model, x, tmp_path / "file", "state-dict")
    with pytest.raises(ExportError, match=r"name ends in \.pt2"):
        export_model(model, x, tmp_path / "model.pt", "exported-program")
    (tmp_path / "folder.pt2").mkdir()
    with pytest.raises(ExportError, match="is a folder, but the exported-program format"):
        export_model(model, x, tmp_path / "folder.pt2", "exported-program")


def test_export_of_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a run directory" in err and len(err.splitlines()) == 1


#: A short digits run that grows (tests/drills.py), with a durable checkpoint every epoch.
GROWING_RUN = [*CLI_SETTINGS, "run.epochs=4", "checkpoint.every_epochs=1"]


def test_tolaria_export_writes_what_load_model_loads(tmp_path):
    inference = pytest.importorskip("tolaria.inference", reason="needs load_model")
    run = tmp_path / "run"
    assert main(train_args(run, tmp_path / "cache", GROWING_RUN)) == 0
    for format in ("exported-program", "state-dict"):
        args = ["export", str(run), "--format", format, "--checkpoint", "last", "--trials", "keep"]
        assert main(args) == 0
    exports = [
        torch.export.load(run / "export" / "last.pt2").module(),
        load_in_process("state-dict", run / "export" / "last"),
    ]
    model = inference.load_model(run, which="last", trials="keep")
    x = torch.rand(7, 1, 8, 8)  # digits: 8x8 images
    with torch.no_grad():
        for exported in exports:
            assert (exported(x) - model(x)).abs().max() <= 1e-6
