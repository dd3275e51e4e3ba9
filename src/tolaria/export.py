"""Export a grown model so that it runs without Tolaria: fold its grafts, write a portable file.

Folding replaces every ``KasminaLayer`` by what its forward computes in eval mode.  A seed
adds ``alpha * d(chunk)`` to its chunk of the host output, with ``alpha`` 1 once FOSSILIZED,
the blending ramp while BLENDING, 1 in PROBATIONARY and 0 before (a TRAINING seed's
value is the host's).  DORMANT and CULLED seeds hold no blueprint
and add nothing.  A layer whose seeds all add nothing becomes ``nn.Identity``; any other
becomes ``GraftedChunks``, the same split into chunks with the kept deltas added.  Seeds
still on trial are dropped (``trials="drop"``: the host as it stands without them) or kept
at their current alpha (``"keep"``: exactly what validation measured).

Formats (``export_model``), each loaded back from its bytes and run on the example input
before anything is written:

``exported-program``  ``torch.export`` of the folded model saved as one ``.pt2`` file: ATen
    ops and tensors, no Python code, loaded by ``torch.export.load(path).module()``.
``state-dict``        a folder of ``model.safetensors`` and a ``model.py`` of torch code only
    (``tolaria.export_state_dict``).

Either way the batch dimension is dynamic: the exported model takes any batch size.
"""

from __future__ import annotations

import copy
import io
import itertools
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from tolaria.atomic import write_atomic
from tolaria.contracts import SeedState
from tolaria.errors import ExportError
from tolaria.export_cli import FORMATS, TRIALS  # the command's vocabulary, kept torch-free
from tolaria.kasmina import KasminaLayer, KasminaSeed
from tolaria.kasmina.layer import keep_input_hook


class GraftedChunks(nn.Module):
    """A folded ``KasminaLayer``: ``h`` split along dim 1 at ``split_points``; chunk ``i``
    becomes ``c + alpha_i * d_i(c)`` where a graft is kept and stays ``c`` elsewhere
    (``d_i(x)`` for a graft that reads the module's input ``x``, left by the same pre-hook
    as the layer's)."""

    def __init__(
        self,
        split_points: tuple[int, ...],
        grafts: dict[int, tuple[nn.Module, float]],
        reads_input: set[int],
    ) -> None:
        super().__init__()
        self.split_points = split_points
        self.deltas = nn.ModuleDict({str(i): delta for i, (delta, _) in grafts.items()})
        self.alphas = {i: alpha for i, (_, alpha) in grafts.items()}
        self.reads_input = reads_input
        self.block_input: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x, self.block_input = self.block_input, None  # left by the pre-hook, never held
        chunks = torch.tensor_split(h, self.split_points, dim=1)
        return torch.cat([self._graft(i, chunk, x) for i, chunk in enumerate(chunks)], dim=1)

    def _graft(self, i: int, chunk: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        alpha = self.alphas.get(i)
        if alpha is None:
            return chunk
        d = self.deltas[str(i)](x if i in self.reads_input else chunk)
        # The seed's own arithmetic, so the fold is exact: h + d(h) at alpha 1.
        return chunk + d if alpha == 1.0 else chunk + alpha * d

    def extra_repr(self) -> str:
        return f"split_points={self.split_points}, alphas={self.alphas}"


def fold_grafts(model: nn.Module, *, trials: str = "drop") -> nn.Module:
    """A copy of ``model`` in eval mode with every Kasmina layer folded (module docstring).

    The copy computes what ``model`` computes in eval mode (with ``trials="drop"``: as if
    every seed on trial were culled); ``model`` itself is not changed.  Host parameters keep
    their names; a kept delta's are ``<host module>.kasmina.deltas.<chunk>.<name>``.
    """
    _check_choice("trials", trials, TRIALS)
    folded = copy.deepcopy(model).eval()
    for module in list(folded.modules()):
        layer = getattr(module, "kasmina", None)
        if isinstance(layer, KasminaLayer):
            # The same slot, so what ran the layer (the forward hook that inject_seeds
            # registered, or nn.Sequential's loop) now runs the fold.
            module.kasmina = _fold_layer(layer, trials)
            # The input pre-hook stays only where a kept graft reads the module's input.
            keep_input_hook(module, bool(getattr(module.kasmina, "reads_input", ())))
    return folded


def _fold_layer(layer: KasminaLayer, trials: str) -> nn.Module:
    grafts = {}
    for i, seed in enumerate(layer.seeds):
        alpha = _kept_alpha(seed, trials)
        if alpha != 0.0:
            grafts[i] = (seed.blueprint, alpha)
    if not grafts:
        return nn.Identity()
    widths = [seed.chunk_shape[0] for seed in layer.seeds]
    reads_input = {i for i in grafts if layer.seeds[i].reads_input}
    return GraftedChunks(tuple(itertools.accumulate(widths[:-1])), grafts, reads_input)


def _kept_alpha(seed: KasminaSeed, trials: str) -> float:
    """The weight of ``seed``'s delta in its eval forward after folding; 0 adds nothing."""
    if seed.blueprint is None or seed.ablated:
        return 0.0
    if seed.state is SeedState.FOSSILIZED:
        return 1.0
    # On trial: GERMINATED and TRAINING seeds have alpha 0, their output is the host's.
    return seed.alpha if trials == "keep" else 0.0


def export_model(
    model: nn.Module,
    example_input: torch.Tensor,
    out: Path,
    format: str,
    *,
    trials: str = "drop",
) -> Path:
    """Fold ``model`` (``fold_grafts(model, trials=trials)``) and write it at ``out``.

    ``exported-program`` writes the file ``out`` (named ``*.pt2``), ``state-dict``
    the folder ``out``; an earlier export there is replaced.  ``example_input`` is a batch
    the model accepts; its first dimension is exported as dynamic, and a model whose
    forward fixes the batch size is refused.  What was written is loaded back and run on
    ``example_input``: an export that does not reproduce the model raises ``ExportError``.
    """
    _check_choice("format", format, FORMATS)
    out = Path(out)
    if format == "exported-program" and out.suffix != ".pt2":
        raise ExportError(
            f"{out}: an exported program's name ends in .pt2 (torch.export.load reads no other)"
        )
    kind = "file" if format == "exported-program" else "folder"
    if out.exists() and out.is_dir() != (kind == "folder"):
        other = "folder" if out.is_dir() else "file"
        raise ExportError(f"{out}: is a {other}, but the {format} format writes a {kind}")
    folded = fold_grafts(model, trials=trials)
    program = _trace(folded, example_input)
    if format == "exported-program":
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        files = {out: buffer.getvalue()}
        loaded = torch.export.load(io.BytesIO(files[out])).module()
    else:
        from tolaria.export_state_dict import build_state_dict_export, render_state_dict_export

        rendered = render_state_dict_export(program)
        files = {out / name: data for name, data in rendered.items()}
        loaded = build_state_dict_export(rendered)
    _check_reproduces(loaded, folded, example_input, out)
    for path, data in files.items():  # only now: an export that is wrong is never written
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
    return out


def _trace(folded: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    if not isinstance(example, torch.Tensor) or example.dim() == 0:
        raise ExportError("export: the example input must be a batch tensor [batch, ...]")
    if example.shape[0] < 2:
        # torch.export takes a dimension of size 1 for a constant: trace on two samples.
        example = torch.cat([example, example])
    batch = torch.export.Dim.AUTO(min=1)
    try:
        program = torch.export.export(folded, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # a user's host may hold code that torch.export cannot trace
        raise ExportError(
            f"torch.export cannot trace {type(folded).__name__}: {_first_line(exc)}"
        ) from exc
    (user_input,) = program.graph_signature.user_inputs
    traced = next(n for n in program.graph.nodes if n.name == user_input).meta["val"]
    if is_concrete_int(traced.shape[0]):  # Dim.AUTO made it a constant rather than fail
        raise ExportError(
            f"{type(folded).__name__}'s forward fixes the batch size at {int(traced.shape[0])}; "
            "an exported model must take any batch size"
        )
    return program


@torch.no_grad()
def _check_reproduces(
    loaded: nn.Module, folded: nn.Module, example: torch.Tensor, out: Path
) -> None:
    try:
        torch.testing.assert_close(loaded(example), folded(example))
    except AssertionError as exc:  # a few lines: not close, how many, by how much
        differences = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise ExportError(
            f"{out}: the exported model does not reproduce the model: {differences}"
        ) from None


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ExportError(f"export: {what}={value!r} is not one of {', '.join(choices)}")


def _first_line(exc: BaseException) -> str:
    """torch.export's errors run to pages of advice; their first line names the cause."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), repr(exc))
