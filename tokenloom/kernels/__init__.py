"""Quantized and fused ops (L1t): one small interface per op, a CPU and a CUDA implementation behind it.

- `int4`: weight-only 4-bit matmul in groups (torch's `_weight_int4pack_mm_for_cpu` / tinygemm on CUDA)
- `int8`: weight-only 8-bit matmul, one scale per output row (`_weight_int8pack_mm` on the CPU)
- `ggml`: llama.cpp's block formats dequantized with torch ops (loading, and embedding rows at run time)

The model layer (`models/linear.py`) holds the tensors as buffers and decides which op a call uses.
"""
