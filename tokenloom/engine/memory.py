"""How much memory the KV pool may take, and how much the process has used (L4)."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# The CPU default: a budget, not a fraction, since the system's memory is shared with everything else.
DEFAULT_CPU_KV_BYTES = 1 << 30
# An accelerator's default: the share of its free memory (after the weights) the pool may take.
DEFAULT_ACCELERATOR_KV_FRACTION = 0.9
# Whatever the budget says, leave this share of the free memory to activations and other processes.
_FREE_HEADROOM = 0.8


@dataclass(frozen=True)
class MemoryUsage:
    """What an engine holds and what its process has used, in bytes.

    weights: the model's parameters and buffers. kv_cache: the KV pool (num_kv_blocks blocks).
    peak: the process's peak resident set on the CPU (ru_maxrss), the device's peak allocated memory
    on an accelerator (torch.cuda.max_memory_allocated)."""

    weights: int
    kv_cache: int
    num_kv_blocks: int
    peak: int
    device: str

    def describe(self) -> str:
        where = "peak RSS" if self.device == "cpu" else f"peak {self.device} memory"
        return (f"weights {_mib(self.weights)}, KV cache {_mib(self.kv_cache)} ({self.num_kv_blocks} blocks), "
                f"{where} {_mib(self.peak)}")


def _mib(value: int) -> str:
    return f"{value / (1 << 20):.1f} MiB"


def available_bytes(device: torch.device) -> int | None:
    """Free memory of `device`: the accelerator's free memory, or the system's MemAvailable on the CPU
    (None when it cannot be read)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def kv_budget_bytes(memory: int | float | None, device: torch.device) -> int:
    """The KV pool's budget: `memory` bytes (int) or that fraction of the free memory (float), never
    more than 80% of what is free; None is the device's default (EngineConfig.kv_cache_memory)."""
    free = available_bytes(device)
    if memory is None:
        memory = DEFAULT_CPU_KV_BYTES if device.type == "cpu" else DEFAULT_ACCELERATOR_KV_FRACTION
    if isinstance(memory, float):
        if free is None:
            raise ValueError(
                f"kv_cache_memory={memory} is a fraction of free memory, which cannot be read on {device}; "
                "give a number of bytes instead"
            )
        return int(free * memory)
    return memory if free is None else min(memory, int(free * _FREE_HEADROOM))


def peak_bytes(device: torch.device) -> int:
    """The process's peak memory: resident set on the CPU, allocated device memory on CUDA."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each storage counted once: tied weights share)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type == "meta":
            continue
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.untyped_storage().nbytes()
    return total
