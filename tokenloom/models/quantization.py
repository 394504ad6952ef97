"""Weight-only quantization of dense weights (L2), straight into the format its kernel runs
(`models/linear.py`): `load_in_4bit` and `load_in_8bit` take 4 or 8 bits per weight in groups of 32
input columns with a scale and a minimum per group (8 bits as two 4-bit pieces on the int4 kernel);
`int8_rows` (one scale per output row, the int8 kernel) is the one-byte-per-weight alternative.

All quantize against the bfloat16 scales the kernels use, so the rounding bound holds for the
weights the kernel really computes with: per row |w - q*s| <= s/2; in groups <= s/2 plus the
bfloat16 rounding of the group's zero (about |zero| / 256) at the two ends of the group's range.

Groups of 32 with 8 bits hold 4-bit data exactly (255 = 15 * 17 levels over the same range): on a
model that was already 4-bit (a Q4 GGUF), load_in_8bit keeps its weights; per-row int8 cannot.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenloom.models.linear import Int4Linear, Int8Linear, KernelPolicy, Linear, piece_plan

INT4_GROUP_SIZE = 32


def _bf16_round_up(values: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 >= each (positive) value, as float32."""
    rounded = values.to(torch.bfloat16)
    below = rounded.float() < values
    bumped = (rounded.view(torch.int16) + 1).view(torch.bfloat16)
    return torch.where(below, bumped, rounded).float()


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: weight float [N, K] -> (codes int8 [N, K], scales float32 [N]),
    scales on the bfloat16 grid (rounded up, so no code leaves [-127, 127])."""
    weight = weight.float()
    scales = _bf16_round_up(weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0)
    codes = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def affine_groups(
    weight: torch.Tensor, bits: int = 4, group_size: int = INT4_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric `bits`-bit codes in groups of `group_size` input columns: weight float [N, K] ->
    (codes uint8 [N, K] in [0, 2**bits), scales and offsets float32 [N, ceil(K / group_size)]) with
    w ~ code * scale + offset. A last partial group takes its range from its real columns only."""
    weight = weight.float()
    out_features, in_features = weight.shape
    num_groups = -(-in_features // group_size)
    padded = num_groups * group_size
    if padded != in_features:  # repeat the last column: the group's range does not widen
        weight = torch.cat([weight, weight[:, -1:].expand(-1, padded - in_features)], dim=1)
    groups = weight.view(out_features, num_groups, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    levels = 2**bits - 1
    _, _, centre = piece_plan(bits)
    scales = ((high - low) / levels).clamp(min=1e-12).to(torch.bfloat16).float()
    # the kernel's zero (the weight of the centre code), rounded as the kernel stores it; codes are
    # chosen against the rounded scale and zero
    zeros = (low + centre * scales).to(torch.bfloat16).float()
    codes = torch.round((groups - zeros[..., None]) / scales[..., None] + centre).clamp(0, levels).to(torch.uint8)
    codes = codes.view(out_features, padded)[:, :in_features]
    return codes, scales, zeros - centre * scales


def int4_groups(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`affine_groups` with 4 bits (load_in_4bit)."""
    return affine_groups(weight, 4, group_size)


def quantize_weight(
    weight: torch.Tensor,
    bits: int,
    device: torch.device,
    *,
    bias: torch.Tensor | None = None,
    output_sizes: list[int] | None = None,
    policy: KernelPolicy = KernelPolicy(),
    dense: torch.Tensor | None = None,
    per_row: bool = False,
) -> Int8Linear | Int4Linear:
    """A dense weight [out_features, in_features] (read once, in float32) in `bits` bits: groups of 32
    on the int4 kernel, or with `per_row` (8 bits only) one scale per row on the int8 kernel."""
    options = {"output_sizes": output_sizes, "bias": bias, "policy": policy, "dense": dense}
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if per_row:
        if bits != 8:
            raise ValueError("per_row quantization is int8 only (bits=8)")
        codes, scales = int8_rows(weight)
        return Int8Linear.from_codes(codes, scales, device, **options)
    codes, scales, offsets = affine_groups(weight, bits)
    return Int4Linear.from_affine(codes, scales, offsets, bits, INT4_GROUP_SIZE, device, **options)


def quantize_linears(model: nn.Module, bits: int, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every dense `Linear` of a built model (except those named in `skip`) in place; returns
    how many. Loading does the same per weight as it reads them (`load_in_8bit` / `load_in_4bit`)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, Linear) and name.rsplit(".", 1)[-1] not in skip
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bias = None if module.bias is None else module.bias.detach()
        quantized = quantize_weight(
            module.weight.detach(), bits, module.weight.device, bias=bias, output_sizes=module.output_sizes
        )
        setattr(parent, child, quantized)
    return len(targets)
