"""Tiny random GGUF models whose tokenizer loads (tiny_models' own vocabulary is not a valid
byte-level BPE one): printable byte-level characters and one merge. For tests that need a whole
model directory (save_pretrained) or the command line on a model that loads in a blink."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests import tiny_models


def write_tiny_gguf_with_tokenizer(root: Path, arch: str, chat_template: str | None = None) -> Path:
    """`root/<arch>.gguf`: tiny_models' random `arch` model with a working tokenizer."""
    rng = np.random.default_rng(tiny_models.ARCHS.index(arch))
    kv, tensors = tiny_models._gpt2_case(rng) if arch == "gpt2" else tiny_models._decoder_case(arch, rng)
    tokens = [chr(c) for c in [*range(33, 127), *range(161, 173)]][: tiny_models.VOCAB]
    tokens[-1] = tokens[3] + tokens[4]
    kv["tokenizer.ggml.tokens"] = tokens
    kv["tokenizer.ggml.merges"] = [f"{tokens[3]} {tokens[4]}"]
    if chat_template is not None:
        kv["tokenizer.chat_template"] = chat_template
    root.mkdir(parents=True, exist_ok=True)
    return tiny_models.write_gguf(root / f"{arch}.gguf", arch, kv, tensors)
