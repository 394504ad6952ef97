"""The one place that knows about devices and dtypes (L1t): which device, which activation dtype, and
how a checkpoint's weights are held (`WeightPlan`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tokenloom.kernels.policy import KernelPolicy, cpu_has_fast_bf16

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
    """None/"auto": the checkpoint's dtype on an accelerator (bf16/fp16); on the CPU bfloat16 for a
    half-precision checkpoint where the CPU has AVX512_BF16 or AMX (oneDNN's bf16 GEMMs then beat
    float32 ones for more than a few rows), else float32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype={dtype} is not supported (use float32, float16 or bfloat16)")
        return dtype
    if dtype is None or dtype == "auto":
        named = _DTYPE_NAMES.get(str(config_dtype or "").replace("torch.", ""))
        if device.type == "cpu":
            half = named in (torch.float16, torch.bfloat16)
            return torch.bfloat16 if half and cpu_has_fast_bf16() else torch.float32
        if named is not None and named != torch.float32:
            return named
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, str) and dtype.replace("torch.", "") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.replace("torch.", "")]
    raise ValueError(f"dtype={dtype!r} is not supported (use 'auto', 'float32', 'float16' or 'bfloat16')")


@dataclass(frozen=True)
class WeightPlan:
    """How a checkpoint's weights become the model's.

    dtype: activations, norms, the KV cache and every dense weight.
    keep_quantized: GGUF quantized matrices stay quantized on the int4/int8 kernels (and quantized
        embeddings stay blocks); False dequantizes them to `dtype` (the exact mode).
    quantize_bits: 8 or 4 to quantize dense linear weights (load_in_8bit / load_in_4bit; not lm_head).
    kernels: the rows per call below which a quantized weight runs its kernel, and the dense copy
        kept for wider calls.
    """

    dtype: torch.dtype
    keep_quantized: bool = False
    quantize_bits: int | None = None
    kernels: KernelPolicy = field(default_factory=KernelPolicy)

    @property
    def is_exact(self) -> bool:
        return not self.keep_quantized and self.quantize_bits is None


def resolve_weights(
    dtype: Any,
    device: torch.device,
    config_dtype: str | None = None,
    quantize_bits: int | None = None,
    kernels: KernelPolicy | None = None,
) -> WeightPlan:
    """The weight plan for a `dtype` argument.

    An explicit dtype (torch.float32, "float32", bfloat16, ...) dequantizes everything to it: float32 is
    the exact mode the parity tests use. None / "auto" keeps a GGUF's quantized matrices on the kernels
    for calls of up to 16 rows (decode steps), with float32 activations on the CPU, and an exact
    float32 copy for wider calls (prefill chunks, wide batches): there the int4 kernel, which decodes
    the weights again for every 4 rows, is the slowest path, and the copy makes prefill exactly the
    exact mode's. The copy costs 4 bytes per weight and the time to build it:
    `kernels=KernelPolicy(dense_dtype=None)` keeps only the quantized weights,
    `KernelPolicy(dense_dtype=torch.bfloat16)` half of it (tests/test_quantized_smollm2.py measures the accuracy of each).
    The output projection is always dense; in this mode on the CPU calls of up to 16 rows also run its
    stored blocks on the kernel, and recompute only each row's best logits with the dense weight
    (`tokenloom.models.head.ShortlistHead`). On CUDA: bfloat16, no copy (not measured: no GPU was at
    hand). `quantize_bits` quantizes dense linear weights instead, with no copy (memory is what it
    is asked for).
    """
    if quantize_bits not in (None, 4, 8):
        raise ValueError(f"quantize_bits must be None, 4 or 8, got {quantize_bits!r}")
    torch_dtype = resolve_dtype(dtype, device, config_dtype)
    is_auto = dtype is None or dtype == "auto"
    if quantize_bits is not None:
        return WeightPlan(torch_dtype, False, quantize_bits, kernels or KernelPolicy(dense_dtype=None))
    if not is_auto:
        return WeightPlan(torch_dtype)
    if device.type == "cpu":
        default = KernelPolicy(dense_dtype=torch.float32)
        return WeightPlan(torch_dtype, True, None, kernels or default)
    # tinygemm (the CUDA int4 kernel) takes bfloat16 activations only
    keep = device.type == "cuda" and torch_dtype == torch.bfloat16
    return WeightPlan(torch_dtype, keep, None, kernels or KernelPolicy(dense_dtype=None))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bytes_available(device: torch.device) -> int | None:
    """Free accelerator memory, or None on the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None
