"""Zero-copy tensors of a safetensors file (L3): views of one copy-on-write memory map.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the data. `safetensors.safe_open` validates the file; this maps it once
(`np.memmap`, mode "c": pages are read on first touch and never written back) and hands out views, so
a tensor costs no memory until it is read, and none at all if the model keeps it as it is stored.
"""

from __future__ import annotations

import json
import struct
from math import prod
from pathlib import Path

import numpy as np
import torch

from tokenloom.errors import ModelLoadError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class SafetensorsMap:
    """The tensors of one safetensors file as views of its memory map."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.data = np.memmap(self.path, dtype=np.uint8, mode="c")
            (header_len,) = struct.unpack("<Q", self.data[:8].tobytes())
            self.header = json.loads(self.data[8 : 8 + header_len].tobytes())
        except (OSError, ValueError, struct.error) as exc:
            raise ModelLoadError(f"could not map safetensors file {self.path}: {exc}") from exc
        self.start = 8 + header_len

    def tensor(self, name: str) -> torch.Tensor | None:
        """A view of tensor `name`, or None when it is stored in a dtype this map does not view."""
        info = self.header.get(name)
        if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
            return None
        dtype = _DTYPES[info["dtype"]]
        shape = [int(d) for d in info["shape"]]
        begin, end = (int(x) for x in info["data_offsets"])
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != prod(shape) * itemsize or self.start + end > self.data.shape[0] or begin < 0:
            raise ModelLoadError(
                f"tensor {name!r} in {self.path} has byte range {begin}..{end} that does not hold "
                f"{info['dtype']} of shape {shape} inside the file"
            )
        raw = torch.from_numpy(self.data[self.start + begin : self.start + end])
        if (self.start + begin) % itemsize:  # an unaligned view cannot be reinterpreted in place
            raw = raw.clone()
        return raw.view(dtype).view(shape) if shape else raw.view(dtype).reshape(())
