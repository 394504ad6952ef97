"""The one place that knows about devices and dtypes (L1t)."""

from __future__ import annotations

from typing import Any

import torch

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device_map: Any = None) -> torch.device:
    """Map transformers-style `device_map` / `device` values to one torch.device.

    None or "auto" picks CUDA when present, else the CPU. A dict must place the whole model on one
    device ({"": device}); splitting a model over devices is not supported.
    """
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(
                f"device_map={device_map!r} places the model on several devices; "
                "tokenloom runs a model on one device (use device_map='auto' or a single device)"
            )
        device_map = devices.pop()
    if device_map is None or device_map == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device_map={device_map!r} is not a device (use 'auto', 'cpu' or 'cuda')") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device_map={device_map!r} asks for CUDA, but no CUDA device is available")
    return device


def resolve_dtype(dtype: Any, device: torch.device, config_dtype: str | None = None) -> torch.dtype:
    """None/"auto": the checkpoint's dtype on an accelerator (bf16/fp16), float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype={dtype} is not supported (use float32, float16 or bfloat16)")
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        named = _DTYPE_NAMES.get(str(config_dtype or "").replace("torch.", ""))
        if named is not None and named != torch.float32:
            return named
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, str) and dtype.replace("torch.", "") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.replace("torch.", "")]
    raise ValueError(f"dtype={dtype!r} is not supported (use 'auto', 'float32', 'float16' or 'bfloat16')")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bytes_available(device: torch.device) -> int | None:
    """Free accelerator memory, or None on the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None
