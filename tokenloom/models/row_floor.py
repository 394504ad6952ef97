"""The row floor of dense matmuls in prompt steps (L2).

MKL's float32 matmul on the CPU rounds a call of 2-15 rows differently from a wider one (it picks
its kernel by rows, and one row is a third kernel). While the runner computes prompt tokens it sets
a floor (`dense_row_floor`) and `Linear` pads narrower calls with zero rows up to it, so a prompt
token's hidden state does not depend on how many tokens its chunk had: in the exact mode a
prefix-cache hit's short tail, another chunking and a cold prompt agree bit for bit. Decode steps
keep their width (padding a 2-row step would double its matmuls). Quantized layers are left as they
are: their kernel for few rows is the point of them (a short prompt on the dense copy instead took
80-90 ms against 32-48 ms), so in the default mode a short tail rounds as a decode step does.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F

DENSE_ROW_FLOOR = 16


class _RowFloor(threading.local):
    rows = 0


_ROW_FLOOR = _RowFloor()


def row_floor() -> int:
    """The floor `dense_row_floor` set in this thread (0: none)."""
    return 0 if torch.compiler.is_compiling() else _ROW_FLOOR.rows  # compiled graphs are decode steps


def floored_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear over x [rows, in_features], at least `row_floor()` rows wide."""
    rows, floor = x.shape[0], row_floor()
    if 1 < rows < floor and x.dim() == 2:
        padded = torch.cat([x, x.new_zeros(floor - rows, x.shape[1])])
        return F.linear(padded, weight, bias)[:rows]
    return F.linear(x, weight, bias)


@contextlib.contextmanager
def dense_row_floor(rows: int = DENSE_ROW_FLOOR) -> Iterator[None]:
    """Within the block (in this thread), `Linear` calls of 2 to rows - 1 rows run `rows` wide."""
    before, _ROW_FLOOR.rows = _ROW_FLOOR.rows, rows
    try:
        yield
    finally:
        _ROW_FLOOR.rows = before
