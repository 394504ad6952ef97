"""Engine limits (L0: no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenloom.speculative_config import SpeculativeConfig

# The model `tokenloom generate`, `chat` and `bench` use when none is named (a `tokenloom pull` name).
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class EngineConfig:
    """Sizes that bound one engine instance.

    block_size: tokens per KV-cache block.
    num_kv_blocks: blocks in the KV pool; None sizes the pool from kv_cache_memory.
    kv_cache_memory: the KV pool's memory budget when num_kv_blocks is None: an int is bytes, a
        float in (0, 1] a fraction of the device's free memory once the model is loaded (on the CPU,
        the system's available memory). None: 1 GiB on the CPU, 0.9 of the free memory on an
        accelerator. The pool never exceeds what max_num_seqs sequences of max_model_len could use.
    max_num_seqs: most requests computed in one step.
    max_num_batched_tokens: most tokens (prefill chunks + decode tokens) computed in one step.
    max_model_len: longest sequence (prompt + generated); None takes the model's context length.
    compile: decode-only steps through torch.compile'd graphs (one per batch-size bucket, CUDA
        graphs on a GPU): True compiles each bucket on first use, None once compile_after
        decode-only steps have run eagerly (a long-running server gains, a one-off generate pays
        nothing), False (the default) never. Needs a C++ compiler on the CPU; eager otherwise.
    compile_after: see compile=None.
    enable_prefix_caching: keep the KV blocks of computed prefixes (keyed by a chained hash of their
        tokens) and start each new request from the longest cached prefix of its tokens; freed blocks
        keep their contents until the pool needs them (LRU). Same tokens as a cold run. The server
        and `tokenloom chat` turn it on; the library leaves it off unless asked.
    speculative: speculative decoding for every request that does not set its own
        (`SamplingParams.speculative`); None (the default) decodes one token per step.
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | float | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    compile: bool | None = False
    compile_after: int = 256
    enable_prefix_caching: bool = False
    speculative: SpeculativeConfig | None = None  # spec decoding (issue 12)

    def __post_init__(self) -> None:
        _require_positive("block_size", self.block_size)
        _require_positive("max_num_seqs", self.max_num_seqs)
        _require_positive("max_num_batched_tokens", self.max_num_batched_tokens)
        memory = self.kv_cache_memory
        if memory is not None and not (
            (isinstance(memory, int) and not isinstance(memory, bool) and memory >= 1)
            or (isinstance(memory, float) and 0.0 < memory <= 1.0)
        ):
            raise ValueError(
                f"kv_cache_memory must be a number of bytes (an int >= 1) or a fraction of free memory "
                f"(a float in (0, 1]), got {memory!r}"
            )
        if self.num_kv_blocks is not None:
            _require_positive("num_kv_blocks", self.num_kv_blocks)
        if self.max_model_len is not None:
            _require_positive("max_model_len", self.max_model_len)
        if self.compile not in (True, False, None):
            raise ValueError(f"compile must be True, False or None, got {self.compile!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be True or False, got {self.enable_prefix_caching!r}")
        if not isinstance(self.compile_after, int) or isinstance(self.compile_after, bool) or self.compile_after < 0:
            raise ValueError(f"compile_after must be an integer >= 0, got {self.compile_after!r}")
        if self.speculative is not None and not isinstance(self.speculative, SpeculativeConfig):
            raise ValueError(f"speculative must be a SpeculativeConfig or None, got {self.speculative!r}")


def _require_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
