"""When the quantized kernels run, and what the CPU offers them (L1t)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelPolicy:
    """Which path a quantized weight takes: calls of up to `max_kernel_rows` rows run the quantized
    kernel; wider calls use a dense copy in `dense_dtype` when one is kept (None: no copy, the kernel
    for every call)."""

    max_kernel_rows: int = 16
    dense_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.max_kernel_rows < 0:
            raise ValueError(f"max_kernel_rows must be >= 0, got {self.max_kernel_rows}")
        if self.dense_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dense_dtype must be None, float32, bfloat16 or float16, got {self.dense_dtype}")


def _cpu_flag(name: str) -> bool:
    check = getattr(torch.cpu, name, None)  # private probes; absent in some builds
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def cpu_has_amx() -> bool:
    """AMX tiles usable by this process (the CPU has them and the OS enabled them): oneDNN's bf16
    GEMMs are then several times faster than float32 ones."""
    return _cpu_flag("_is_amx_tile_supported")


def cpu_has_avx512_bf16() -> bool:
    """AVX512_BF16: bfloat16 dot products, which the int4/int8 kernels' fast paths use."""
    return _cpu_flag("_is_avx512_bf16_supported")


def cpu_has_fast_bf16() -> bool:
    """bfloat16 GEMMs in hardware (AVX512_BF16 or AMX): oneDNN then runs them faster than float32."""
    return cpu_has_amx() or cpu_has_avx512_bf16()
