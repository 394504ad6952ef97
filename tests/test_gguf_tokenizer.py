"""GGUF tokenizer: ids, added tokens and decoding identical to transformers' tokenizer for the same file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from tests.test_gguf_loader import write_gguf
from tokenloom.errors import ModelLoadError
from tokenloom.loading.gguf_tokenizer import bytes_to_unicode, load_gguf_tokenizer

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！这是一个测试。",
    "Emoji: 😀🎉👍🏽 and a flag 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n",
    "   leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nend\r\n",
    "multiple     spaces    inside",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "Numbers 1234567890 and 3.14159",
    "Ünïcödé àccents: café naïve",
    "مرحبا بالعالم",
    "Здравствуй, мир",
    "",
    " ",
    "I'm sure they'll say it's fine, won't they?",
    "https://example.com/path?q=1&r=2 <start_of_turn>user\nhi<end_of_turn>",
]


def _assert_same_tokenizer(ours, reference, texts: list[str]) -> None:
    """Same ids with and without special tokens, same decoding with and without skipping them."""
    for text in texts:
        for add_special in (True, False):
            ids = ours.tokenizer.encode(text, add_special_tokens=add_special).ids
            assert ids == reference(text, add_special_tokens=add_special)["input_ids"], (text, add_special)
        for skip in (False, True):
            assert ours.tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(
                ids, skip_special_tokens=skip
            ), (text, skip)


def _assert_same_fields(ours, reference) -> None:
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == (
        reference.bos_token,
        reference.eos_token,
        reference.unk_token,
        reference.pad_token,
    )
    assert (ours.add_bos_token, ours.add_eos_token) == (reference.add_bos_token, reference.add_eos_token)
    assert ours.chat_template == reference.chat_template


def _backend_json(tokenizer) -> dict:
    return json.loads(tokenizer.to_str())


# ---------------------------------------------------------------- SmolLM2 (byte-level BPE)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf: Path):
    return load_gguf_tokenizer(smollm2_gguf)


def test_smollm2_ids_and_decode_match_transformers(hf_smollm2, smollm2_tokenizer) -> None:
    _, reference = hf_smollm2
    _assert_same_tokenizer(smollm2_tokenizer, reference, TEXTS)


def test_smollm2_tokenizer_is_the_same_backend(hf_smollm2, smollm2_tokenizer) -> None:
    """The whole serialized tokenizer (vocab, merges, added tokens, pre/post-processing) is identical."""
    _, reference = hf_smollm2
    assert _backend_json(smollm2_tokenizer.tokenizer) == _backend_json(reference.backend_tokenizer)


def test_smollm2_fields(hf_smollm2, smollm2_tokenizer) -> None:
    _, reference = hf_smollm2
    _assert_same_fields(smollm2_tokenizer, reference)
    assert smollm2_tokenizer.eos_token == "<|im_end|>"
    assert smollm2_tokenizer.chat_template.startswith("{% for message in messages %}")
    special = smollm2_tokenizer.tokenizer.encode("<|im_start|>user\nhi<|im_end|>").tokens
    assert special[0] == "<|im_start|>" and special[-1] == "<|im_end|>"  # atomic


# ---------------------------------------------------------------- synthetic vocabularies


def _sentencepiece_kv() -> dict:
    tokens = ["<unk>", "<s>", "</s>", "<|user|>", "<think>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3, 3, 4] + [6] * 256
    pieces = "▁ e h l o w r d t s a i n , ! ▁t ▁th ▁the he ll llo ▁h ▁he ▁hel ▁hell ▁hello ▁w ▁wo ▁wor ▁worl"
    pieces += " ▁world in ing ▁s ▁a ▁i ▁in an ▁an ▁and nd ▁▁ ▁▁▁"
    tokens += pieces.split()
    types += [1] * (len(tokens) - len(types))
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 261 + [-float(i) for i in range(len(tokens) - 261)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def _gemma_kv() -> dict:
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "\n", "\n\n", "  ", "   "]
    types = [3, 3, 3, 3, 3, 4, 4, 4, 4, 4]
    tokens += ["<start_of_turn>", "<end_of_turn>"] + [f"<0x{b:02X}>" for b in range(256)]
    types += [3, 3] + [6] * 256
    tokens += "▁ h e l o w r d u s i he ll hell hello ▁h ▁hello ▁w wo wor world ▁world us ▁us user".split()
    types += [1] * (len(tokens) - len(types))
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [-1000.0] * 10 + [0.0] * 258 + [-float(i) for i in range(len(tokens) - 268)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }


def _byte_level_kv(pre: str) -> dict:
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "l l", "he ll", "hell o"]
    tokens = alphabet + ["".join(merge.split()) for merge in merges]
    tokens += ["你好", "<|endoftext|>", "<think>", "<｜begin▁of▁sentence｜>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 5) + [3, 4, 3, 3, 3]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": len(tokens) - 5,
        "tokenizer.ggml.eos_token_id": len(tokens) - 1,
    }


SYNTHETIC = {
    "llama-spm": ("llama", _sentencepiece_kv),
    "phi3-spm": ("phi3", _sentencepiece_kv),
    "gemma3-spm": ("gemma3", _gemma_kv),
    "qwen2-bpe": ("qwen2", lambda: _byte_level_kv("qwen2")),
    "llama3-bpe": ("llama", lambda: _byte_level_kv("llama-bpe")),
    "gpt2-default": ("qwen2", lambda: _byte_level_kv("default")),
}
SYNTHETIC_TEXTS = TEXTS + [
    "hello world",
    " hello  world",
    "the thing and the hill!",
    "<|user|>hello<think>world</s>",
    "<bos>hello<end_of_turn>\n\n  world   ",
    "hello 你好 world<|endoftext|>",
]


@pytest.mark.parametrize("case", list(SYNTHETIC))
def test_synthetic_vocabulary_matches_transformers(case: str, tmp_path: Path) -> None:
    import transformers

    arch, make_kv = SYNTHETIC[case]
    kv = make_kv()
    kv |= {"{arch}.block_count": 1, "{arch}.embedding_length": 8, "{arch}.attention.head_count": 1}
    path = write_gguf(tmp_path / f"{case}.gguf", arch, kv, {"token_embd.weight": (np.ones((4, 8)), Q.F32)})
    ours = load_gguf_tokenizer(path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert _backend_json(ours.tokenizer) == _backend_json(reference.backend_tokenizer)
    _assert_same_fields(ours, reference)
    _assert_same_tokenizer(ours, reference, SYNTHETIC_TEXTS)


def test_sentencepiece_defaults_to_adding_bos(tmp_path: Path) -> None:
    kv = _sentencepiece_kv() | {"llama.block_count": 1}
    path = write_gguf(tmp_path / "spm.gguf", "llama", kv, {"token_embd.weight": (np.ones((4, 8)), Q.F32)})
    data = load_gguf_tokenizer(path)
    assert data.add_bos_token is True and data.bos_token == "<s>"
    assert data.tokenizer.encode("hello").tokens == ["<s>", "▁hello"]
    ids = data.tokenizer.encode("hello  world").ids
    # the prefix space Metaspace adds is stripped again on decode
    assert data.tokenizer.decode(ids, skip_special_tokens=True) == "hello  world"


def test_byte_level_mislabelled_control_token_is_not_added(tmp_path: Path) -> None:
    kv = _byte_level_kv("qwen2") | {"qwen2.block_count": 1}
    path = write_gguf(tmp_path / "bpe.gguf", "qwen2", kv, {"token_embd.weight": (np.ones((4, 8)), Q.F32)})
    added = {
        token.content: token
        for token in load_gguf_tokenizer(path).tokenizer.get_added_tokens_decoder().values()
    }
    assert added["<|endoftext|>"].special and not added["<think>"].special
    assert "<｜begin▁of▁sentence｜>" not in added


# ---------------------------------------------------------------- errors


def test_file_without_vocabulary(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "novocab.gguf", "llama", {"llama.block_count": 1}, {"x.weight": (np.ones(4), Q.F32)}
    )
    with pytest.raises(ModelLoadError, match="no tokenizer vocabulary"):
        load_gguf_tokenizer(path)


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    kv = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["[CLS]", "a"]}
    path = write_gguf(tmp_path / "bert.gguf", "llama", kv, {"x.weight": (np.ones(4), Q.F32)})
    with pytest.raises(ModelLoadError, match="tokenizer of type 'bert'"):
        load_gguf_tokenizer(path)


# ---------------------------------------------------------------- Gemma 3 (SentencePiece vocabulary, 262k tokens)


@pytest.mark.slow
def test_gemma3_matches_transformers() -> None:
    """transformers needs ~15 s to rebuild this tokenizer's 515k merges, hence `slow`."""
    transformers = pytest.importorskip("transformers")
    try:
        from tokenloom.loading.pull import pull

        path = pull("gemma3-270m", progress=False)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not available here
        pytest.skip(f"gemma3-270m GGUF not available: {exc}")
    ours = load_gguf_tokenizer(path)
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert _backend_json(ours.tokenizer) == _backend_json(reference.backend_tokenizer)
    _assert_same_fields(ours, reference)
    _assert_same_tokenizer(
        ours, reference, TEXTS + ["<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"]
    )
