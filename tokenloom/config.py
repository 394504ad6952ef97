"""Engine limits (L0: no torch)."""

from __future__ import annotations

from dataclasses import dataclass

# The model `tokenloom generate`, `chat` and `bench` use when none is named (a `tokenloom pull` name).
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class EngineConfig:
    """Sizes that bound one engine instance.

    block_size: tokens per KV-cache block.
    num_kv_blocks: blocks in the KV pool; None sizes the pool from kv_cache_memory_bytes.
    kv_cache_memory_bytes: memory budget for the KV pool when num_kv_blocks is None.
    max_num_seqs: most requests computed in one step.
    max_num_batched_tokens: most tokens (prefill chunks + decode tokens) computed in one step.
    max_model_len: longest sequence (prompt + generated); None takes the model's context length.
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        _require_positive("block_size", self.block_size)
        _require_positive("max_num_seqs", self.max_num_seqs)
        _require_positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _require_positive("kv_cache_memory_bytes", self.kv_cache_memory_bytes)
        if self.num_kv_blocks is not None:
            _require_positive("num_kv_blocks", self.num_kv_blocks)
        if self.max_model_len is not None:
            _require_positive("max_model_len", self.max_model_len)


def _require_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
