"""Where the run executes and how much memory it uses: ``HardwareMonitor.current()``.

Called once per epoch to fill ``SystemStatePacket.hardware_context``; everything it reads
is a host-side counter (psutil, the CUDA caching allocator's statistics), so it never
synchronises the device.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil
import torch

from tolaria.contracts import HardwareContext
from tolaria.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"``/``"cuda:N"`` without CUDA, or
    without an N-th GPU, is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type != "cuda":
        raise ConfigError(f"run.device={name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"run.device={name!r}: CUDA is not available (this torch build "
            f"{torch.__version__} sees no GPU); use 'auto' or 'cpu'"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(
            f"run.device={name!r}: this machine has {count} CUDA device(s), "
            f"cuda:0 to cuda:{count - 1}"
        )
    return device


def cpu_model_name() -> str:
    """The CPU's marketing name; ``platform.processor()`` is often just the ISA on Linux."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


class HardwareMonitor:
    """Snapshots of device identity and memory use for one ``torch.device``."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            index = self.device.index
            self._cuda_index = torch.cuda.current_device() if index is None else index
            props = torch.cuda.get_device_properties(self._cuda_index)
            self._name, self._cuda_total = props.name, props.total_memory
        else:
            self._name, self._cuda_total = cpu_model_name(), None
        self._process = psutil.Process()

    def current(self) -> HardwareContext:
        memory = psutil.virtual_memory()
        cuda_allocated = cuda_reserved = None
        if self._cuda_total is not None:
            cuda_allocated = torch.cuda.memory_allocated(self._cuda_index)
            cuda_reserved = torch.cuda.memory_reserved(self._cuda_index)
        return HardwareContext(
            device_type=self.device.type,
            device_name=self._name,
            cpu_count=os.cpu_count() or 1,
            process_rss_bytes=self._process.memory_info().rss,
            system_memory_total_bytes=memory.total,
            system_memory_available_bytes=memory.available,
            cuda_memory_allocated_bytes=cuda_allocated,
            cuda_memory_reserved_bytes=cuda_reserved,
            cuda_memory_total_bytes=self._cuda_total,
        )
