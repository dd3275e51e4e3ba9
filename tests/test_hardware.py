"""HardwareMonitor on the CPU path, and device resolution."""

from __future__ import annotations

import mmap
import os

import pytest
import torch

from tolaria.contracts import HardwareContext
from tolaria.errors import ConfigError
from tolaria.hardware import HardwareMonitor, resolve_device


def test_cpu_context_fields():
    context = HardwareMonitor(torch.device("cpu")).current()
    assert context.device_type == "cpu"
    assert context.device_name and context.device_name != "cpu"
    assert context.cpu_count == os.cpu_count()
    assert context.process_rss_bytes > 0
    assert 0 < context.system_memory_available_bytes <= context.system_memory_total_bytes
    assert context.cuda_memory_allocated_bytes is None
    assert context.cuda_memory_reserved_bytes is None
    assert context.cuda_memory_total_bytes is None
    assert HardwareContext.from_json(context.to_json()) == context


def test_rss_is_read_fresh_each_call():
    monitor = HardwareMonitor("cpu")
    before = monitor.current().process_rss_bytes
    # A fresh anonymous mapping with every page written: new resident memory, whatever
    # the allocators have cached from earlier tests.
    size = 64 * 2**20
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    after = monitor.current().process_rss_bytes
    block.close()
    assert after - before >= 32 * 2**20


def test_resolve_device_cpu_paths(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="expected 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device("tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_context_fields():
    device = resolve_device("cuda")
    monitor = HardwareMonitor(device)
    block = torch.ones(2**20, device=device)
    context = monitor.current()
    assert context.device_type == "cuda"
    assert context.device_name == torch.cuda.get_device_name(device)
    assert context.cuda_memory_allocated_bytes >= block.numel() * 4
    assert context.cuda_memory_reserved_bytes >= context.cuda_memory_allocated_bytes
    assert context.cuda_memory_total_bytes >= context.cuda_memory_reserved_bytes
