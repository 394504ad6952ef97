"""Tiny models for the architecture tests: synthetic GGUF files written with llama.cpp's own `gguf`
writer (random weights, every architecture's tensor names), and greedy decoding helpers for
comparing the engine with transformers."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from tokenloom import SamplingParams
from tokenloom.engine.engine import Engine

# ---------------------------------------------------------------- synthetic GGUF files


def write_gguf(path: Path, arch: str, kv: dict, tensors: dict[str, tuple[np.ndarray, Q]]) -> Path:
    """A GGUF written by llama.cpp's own writer; `{arch}` in keys becomes the architecture."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        key = key.replace("{arch}", arch)
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, (array, qtype) in tensors.items():
        array = array.astype(np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 96
# head widths transformers' config classes assume when the file does not state them (qwen3: 128)
HEAD_DIM = {"gemma3": 32, "qwen3": 128}


def _tokenizer_kv() -> dict:
    tokens = [f"<t{i}>" for i in range(VOCAB)]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * VOCAB,
        "tokenizer.ggml.merges": ["< t"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
    }


def _decoder_case(arch: str, rng: np.random.Generator) -> tuple[dict, dict]:
    head_dim = HEAD_DIM.get(arch, HIDDEN // HEADS)
    q_rows, kv_rows = HEADS * head_dim, KV_HEADS * head_dim
    kv = {
        "{arch}.block_count": LAYERS,
        "{arch}.context_length": 256,
        "{arch}.embedding_length": HIDDEN,
        "{arch}.feed_forward_length": FFN,
        "{arch}.attention.head_count": HEADS,
        "{arch}.attention.head_count_kv": KV_HEADS,
        "{arch}.rope.freq_base": 10000.0,
        "{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        **_tokenizer_kv(),
    }
    if arch == "llama":
        kv |= {"{arch}.rope.dimension_count": head_dim, "{arch}.vocab_size": VOCAB}
    if arch in ("qwen3", "gemma3"):
        kv |= {"{arch}.attention.key_length": head_dim, "{arch}.attention.value_length": head_dim}
    if arch == "gemma3":
        kv["{arch}.attention.sliding_window"] = 16

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape)

    tensors = {
        "token_embd.weight": (normal(VOCAB, HIDDEN), Q.Q8_0),
        "output_norm.weight": (normal(HIDDEN) + 1, Q.F32),
    }
    if arch != "gemma3":  # gemma3 ties its output projection to the embedding
        tensors["output.weight"] = (normal(VOCAB, HIDDEN), Q.Q4_0)
    for i in range(LAYERS):
        block = f"blk.{i}."
        if arch == "phi3":  # fused q/k/v and gate/up
            tensors[block + "attn_qkv.weight"] = (normal(q_rows + 2 * kv_rows, HIDDEN), Q.Q8_0)
            tensors[block + "ffn_up.weight"] = (normal(2 * FFN, HIDDEN), Q.Q5_1)
        else:
            tensors[block + "attn_q.weight"] = (normal(q_rows, HIDDEN), Q.Q8_0)
            tensors[block + "attn_k.weight"] = (normal(kv_rows, HIDDEN), Q.Q4_1)
            tensors[block + "attn_v.weight"] = (normal(kv_rows, HIDDEN), Q.Q8_0)
            tensors[block + "ffn_gate.weight"] = (normal(FFN, HIDDEN), Q.Q4_0)
            tensors[block + "ffn_up.weight"] = (normal(FFN, HIDDEN), Q.Q5_1)
        tensors[block + "attn_output.weight"] = (normal(HIDDEN, q_rows), Q.Q8_0)
        tensors[block + "ffn_down.weight"] = (normal(HIDDEN, FFN), Q.F16)
        tensors[block + "attn_norm.weight"] = (normal(HIDDEN), Q.F32)
        tensors[block + "ffn_norm.weight"] = (normal(HIDDEN), Q.F32)
        if arch == "qwen2":
            for name, rows in (("attn_q", q_rows), ("attn_k", kv_rows), ("attn_v", kv_rows)):
                tensors[block + name + ".bias"] = (normal(rows), Q.F32)
        if arch in ("qwen3", "gemma3"):
            tensors[block + "attn_q_norm.weight"] = (normal(head_dim), Q.F32)
            tensors[block + "attn_k_norm.weight"] = (normal(head_dim), Q.F32)
        if arch == "gemma3":
            tensors[block + "post_attention_norm.weight"] = (normal(HIDDEN), Q.F32)
            tensors[block + "post_ffw_norm.weight"] = (normal(HIDDEN), Q.F32)
    return kv, tensors


def _gpt2_case(rng: np.random.Generator) -> tuple[dict, dict]:
    # 1024 positions: transformers maps context_length to n_ctx only, so wpe keeps GPT2Config's 1024
    kv = {
        "{arch}.block_count": LAYERS,
        "{arch}.context_length": 1024,
        "{arch}.embedding_length": HIDDEN,
        "{arch}.feed_forward_length": 4 * HIDDEN,
        "{arch}.attention.head_count": HEADS,
        "{arch}.attention.layer_norm_epsilon": 1e-5,
        **_tokenizer_kv(),
    }
    tensors = {
        "token_embd.weight": (rng.standard_normal((VOCAB, HIDDEN)), Q.Q8_0),
        "position_embd.weight": (rng.standard_normal((1024, HIDDEN)), Q.F32),
        "output_norm.weight": (rng.standard_normal(HIDDEN), Q.F32),
        "output_norm.bias": (rng.standard_normal(HIDDEN), Q.F32),
        "output.weight": (rng.standard_normal((VOCAB, HIDDEN)), Q.Q8_0),
    }
    for i in range(LAYERS):
        block = f"blk.{i}."
        shapes = {
            "attn_qkv": (3 * HIDDEN, HIDDEN),
            "attn_output": (HIDDEN, HIDDEN),
            "ffn_up": (4 * HIDDEN, HIDDEN),
            "ffn_down": (HIDDEN, 4 * HIDDEN),
        }
        for name, shape in shapes.items():
            tensors[block + name + ".weight"] = (rng.standard_normal(shape), Q.Q8_0)
            tensors[block + name + ".bias"] = (rng.standard_normal(shape[0]), Q.F32)
        for name in ("attn_norm", "ffn_norm"):
            tensors[block + name + ".weight"] = (rng.standard_normal(HIDDEN), Q.F32)
            tensors[block + name + ".bias"] = (rng.standard_normal(HIDDEN), Q.F32)
    return kv, tensors


ARCHS = ["llama", "qwen2", "qwen3", "phi3", "gemma3", "gpt2"]


def write_tiny_gguf(root: Path, arch: str) -> Path:
    """`root/<arch>.gguf`: the tiny random model of that architecture (seeded by its place in ARCHS)."""
    rng = np.random.default_rng(ARCHS.index(arch))
    kv, tensors = _gpt2_case(rng) if arch == "gpt2" else _decoder_case(arch, rng)
    return write_gguf(root / f"{arch}.gguf", arch, kv, tensors)


# ---------------------------------------------------------------- greedy decoding


def reference_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt, exactly `num_tokens` long (EOS ignored)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_tokens, min_new_tokens=num_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def engine_greedy(engine: Engine, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    """The engine's greedy continuations of all prompts, batched together (EOS ignored)."""
    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    done = {o.request_id: o.token_ids for o in engine.run() if o.finished}
    return [done[i] for i in ids]


def hf_generate(model, *args, **kwargs) -> torch.Tensor:
    """transformers' generate() without autograd."""
    with torch.no_grad():
        return model.generate(*args, **kwargs)


def reference_logits(model, prompt: list[int]) -> torch.Tensor:
    """transformers' logits [len(prompt), vocab] for one prompt."""
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0]


def run_counting_preemptions(engine) -> int:
    """Step `engine` until idle by hand (schedule, run, update), counting the preemptions."""
    preempted = 0
    while engine.has_unfinished():
        out = engine.scheduler.schedule()
        preempted += len(out.preempted)
        result = engine.runner.step(out)
        for seq in engine.scheduler.update(out, result.sampled_token_ids):
            if seq.is_finished:
                engine._release(seq)
    return preempted
