"""Tolaria: the training academy of the Esper morphogenetic platform.

The design's names are the public API; they are imported lazily so that ``tolaria config``
and config errors answer without loading PyTorch.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "TolariaTrainer": "tolaria.trainer",
    "build_trainer": "tolaria.build",
    "TolariaConfig": "tolaria.config",
    "TamiyoConfig": "tolaria.config",
    "KasminaConfig": "tolaria.config",
    "load_config": "tolaria.config",
    "SystemStatePacket": "tolaria.contracts",
    "AdaptationSignal": "tolaria.contracts",
    "HardwareContext": "tolaria.contracts",
    "SeedState": "tolaria.contracts",
    "DataBundle": "tolaria.data",
    "DynamicOptimizerManager": "tolaria.optim",
    "HardwareMonitor": "tolaria.hardware",
    "KasminaSeed": "tolaria.kasmina",
    "KasminaLayer": "tolaria.kasmina",
    "inject_seeds": "tolaria.kasmina",
    "register_blueprint": "tolaria.kasmina",
    "TamiyoController": "tolaria.tamiyo",
    "load_model": "tolaria.inference",
    "fold_grafts": "tolaria.export",
    "export_model": "tolaria.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tolaria' has no attribute {name!r}")
