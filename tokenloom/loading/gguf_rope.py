"""Rope factors that llama.cpp stores as tensors (L3): turned back into config rope parameters where
they match a known scheme, refused otherwise (a model silently loaded without them would change its
outputs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tokenloom.errors import UnsupportedModelError
from tokenloom.loading.gguf_quants import dequantize
from tokenloom.loading.gguf_reader import GGUFFile

# Per-dimension rope factors llama.cpp stores as tensors; tokenloom's models take rope scaling from
# the config only, so such a file would silently lose them. A llama `rope_freqs` tensor is turned
# back into the llama3 rope parameters it was computed from (`llama3_rope_from_freqs`) when it
# matches them; anything else is refused.
_ROPE_FACTOR_TENSORS = {
    "rope_freqs.weight": "rope scaling factors (rope_freqs) that match no llama3 rope parameters",
    "rope_factors_long.weight": "Phi-3 longrope factors (rope_factors_long/short)",
    "rope_factors_short.weight": "Phi-3 longrope factors (rope_factors_long/short)",
}
ROPE_FREQS = "rope_freqs.weight"
# The llama3 parameters of every Llama 3.1 / 3.2 / 3.3 release; llama.cpp's converter also takes
# original_max_position_embeddings as 8192 (it reads it from the top-level config, where it is absent).
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def refuse_unmapped_rope_tensors(architecture: str, tensor_names: list[str], path: Path) -> None:
    for name in tensor_names:
        if name in _ROPE_FACTOR_TENSORS:
            raise UnsupportedModelError(
                f"{path}: the {architecture} GGUF stores {_ROPE_FACTOR_TENSORS[name]} as tensor {name!r}, "
                "which tokenloom cannot map to the model's rope settings yet; loading it without them "
                "would change the model's outputs",
                hint="load the Hugging Face checkpoint of this model instead (its config.json carries "
                "the rope scaling)",
            )


def llama3_rope_from_freqs(gguf: GGUFFile, config: dict[str, Any]) -> None:
    """Llama 3.x GGUFs carry their llama3 rope scaling as `rope_freqs` (per-dimension divisors of the
    inverse frequencies) and no rope scaling metadata: the llama3 parameters that give exactly these
    divisors go into the config, or the file is refused."""
    from tokenloom.models.layers import rope_inv_freq

    info = next((t for t in gguf.tensors if t.name == ROPE_FREQS), None)
    if info is None:
        return
    freqs = dequantize(torch.from_numpy(gguf.raw(info)), info.ggml_type, info.shape).float().flatten()
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    theta = float(config.get("rope_theta", 10000.0))
    scaling = {"rope_type": "llama3", "factor": float(freqs.max()), **_LLAMA3_ROPE}
    if freqs.numel() == head_dim // 2 and float(freqs.min()) > 0:
        expected, _ = rope_inv_freq(head_dim, theta, scaling)
        plain, _ = rope_inv_freq(head_dim, theta, None)
        if torch.allclose(plain / freqs, expected, rtol=1e-5, atol=0.0):
            config["rope_parameters"] = {**scaling, "rope_theta": theta}
            return
    refuse_unmapped_rope_tensors(str(config.get("model_type")), [ROPE_FREQS], gguf.path)
