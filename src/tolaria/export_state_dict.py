"""The ``state-dict`` export: a folder of ``model.safetensors`` and a ``model.py`` of torch code.

``model.py`` is written from the ``ExportedProgram`` of the folded model.  Its forward is the
program's ATen graph printed as Python by ``torch.fx`` (``torch.ops.aten.*`` calls, the
batch size read from the input), and its module tree holds every tensor that graph reads
under the folded model's own names, so ``model.safetensors`` -- those tensors by name, a
format any tool reads without running code -- loads with a strict ``load_state_dict``.  It
needs torch, and safetensors to read the weights; its parameters train like any module's.
A graph that needs more than torch (a library's custom op, a mutated buffer, several
outputs) is refused here, not found by whoever loads it.
"""

from __future__ import annotations

import torch
from safetensors.torch import load, save
from torch import nn
from torch.export.graph_signature import InputKind, OutputKind

from tolaria import __version__
from tolaria.errors import ExportError

CODE_FILE, WEIGHTS_FILE = "model.py", "model.safetensors"

_MODEL_PY = '''\
"""A model grown by Tolaria {version}, folded and exported (`tolaria export --format state-dict`).

Plain torch: the forward is torch.export's ATen graph of the folded model; the weights are
{weights} beside this file, by name.  Needs torch, and safetensors to read them:

    import model                  # with this folder on sys.path
    net = model.load()            # GrownModel in eval mode; net(x) for any batch size
"""

from math import inf, nan  # these three: names the code printed by torch.fx may use
from pathlib import Path

import torch
from torch import device, nn

NoneType = type(None)

#: Every tensor the graph reads, in its argument order: name -> (kind, shape, dtype).
TENSORS = {{
{tensors}}}


def _tensor(module, name):
    path, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(path), leaf)


class GrownModel(nn.Module):
    """The architecture with uninitialised tensors; `load()` reads the weights into it."""

    def __init__(self):
        super().__init__()
        for name, (kind, shape, dtype) in TENSORS.items():
            *path, leaf = name.split(".")
            owner = self
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]
            empty = torch.empty(shape, dtype=dtype)
            if kind == "parameter":
                owner.register_parameter(leaf, nn.Parameter(empty))
            else:
                owner.register_buffer(leaf, empty)

    def forward(self, x):
        (out,) = self._graph(*(_tensor(self, name) for name in TENSORS), x)
        return out

{graph}


def load(path=None):
    """GrownModel with the weights of `path` (default: {weights} beside this file)."""
    from safetensors.torch import load_file

    model = GrownModel()
    model.load_state_dict(load_file(path or Path(__file__).with_name("{weights}")))
    return model.eval()
'''


def render_state_dict_export(program: torch.export.ExportedProgram) -> dict[str, str | bytes]:
    """The folder's files for ``program``: ``{"model.py": code, "model.safetensors": weights}``."""
    tensors = _graph_tensors(program)
    code = program.graph_module.graph.python_code(root_module="self")
    # What an empty graph's code needs (torch, inf, device, ...) is what model.py imports;
    # an op outside aten (a library's custom op) exists only where that library is loaded.
    foreign = code.globals.keys() - torch.fx.Graph().python_code("self").globals.keys()
    foreign |= {
        str(node.target)
        for node in program.graph.nodes
        if node.op == "call_function" and getattr(node.target, "namespace", "aten") != "aten"
    }
    if foreign:
        raise ExportError(
            f"the model's graph calls {', '.join(sorted(foreign))}, which is not a torch "
            "operation: the state-dict format runs on torch alone"
        )
    graph = code.src.replace("def forward(self,", "def _graph(self,", 1)
    rows = "".join(
        f"    {name!r}: ({kind!r}, {tuple(t.shape)}, {t.dtype}),\n"
        for name, (kind, t) in tensors.items()
    )
    source = _MODEL_PY.format(
        version=__version__,
        weights=WEIGHTS_FILE,
        tensors=rows,
        graph="\n".join(f"    {line}".rstrip() for line in graph.strip("\n").splitlines()),
    )
    # Copies: safetensors refuses tensors that share storage, or are not contiguous.
    weights = {name: t.detach().cpu().contiguous().clone() for name, (_, t) in tensors.items()}
    return {WEIGHTS_FILE: save(weights), CODE_FILE: source}


def build_state_dict_export(files: dict[str, str | bytes]) -> nn.Module:
    """The model that ``files`` describe, as ``model.load()`` makes it from the folder."""
    namespace: dict = {"__name__": "model"}
    exec(compile(files[CODE_FILE], CODE_FILE, "exec"), namespace)
    model = namespace["GrownModel"]()
    model.load_state_dict(load(files[WEIGHTS_FILE]))
    return model.eval()


def _graph_tensors(program: torch.export.ExportedProgram) -> dict[str, tuple[str, torch.Tensor]]:
    """``name -> (kind, tensor)`` for every lifted input of ``program``, in argument order."""
    signature = program.graph_signature
    outputs = [spec.kind for spec in signature.output_specs]
    if outputs != [OutputKind.USER_OUTPUT]:
        raise ExportError(
            f"the model's forward gives {[kind.name for kind in outputs]}, not one tensor "
            "(buffer mutations: export in eval mode); use --format exported-program"
        )
    *lifted, user = signature.input_specs
    tensors = {}
    for spec in lifted:
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            raise ExportError(
                f"the model's graph reads {spec.kind.name} {spec.target!r}, which a "
                "state dict cannot hold: use --format exported-program"
            )
        stored = program.state_dict if spec.target in program.state_dict else program.constants
        kind = "parameter" if spec.kind is InputKind.PARAMETER else "buffer"
        tensors[spec.target] = (kind, stored[spec.target])
    if user.kind is not InputKind.USER_INPUT:
        raise ExportError("the model's graph takes no input tensor last: cannot export it")
    return tensors
