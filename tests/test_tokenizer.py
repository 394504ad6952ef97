"""Tokenizer parity with transformers (the oracle) on the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from tokenloom.compat.tokenizer import AutoTokenizer, BatchEncoding
from tokenloom.errors import ModelNotFoundError
from tokenloom.loading.checkpoint import ModelSource
from tokenloom.loading.hf_tokenizer import load_hf_tokenizer
from tokenloom.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！今天天气怎么样？",
    "日本語のテキストと한국어 텍스트",
    "😀🎉👍 emoji 🚀",
    "👨‍👩‍👧‍👦 family with zero-width joiners",
    "def add(a, b):\n    return a + b\n",
    'for (int i = 0; i < n; ++i) { printf("%d\\n", i); }',
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|><repo_name>x<file_sep>",
    "text<|im_end|>with special in the middle",
    "   leading spaces",
    "trailing spaces   ",
    "\t\ttabs\tand\nnewlines\n\n\n",
    "",
    " ",
    "Numbers 1234567890 and 3.14159 and -42",
    "Mixed: café naïve résumé Ünïcödé",
    "URL https://example.com/path?q=1&r=2#frag",
    "math ∑∫√∞ ≠ ≤ ≥ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]




@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(ours, ref, text):
    for add_special_tokens in (True, False):
        expected = ref(text, add_special_tokens=add_special_tokens)
        got = ours(text, add_special_tokens=add_special_tokens)
        assert got["input_ids"] == expected["input_ids"]
        assert got["attention_mask"] == expected["attention_mask"]
    assert ours.encode(text) == ref.encode(text)
    assert ours.tokenize(text) == ref.tokenize(text)
    assert ours.decode(ref.encode(text)) == ref.decode(ref.encode(text))


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding_matches_transformers(ours, ref, side):
    ours.padding_side = side
    ref.padding_side = side
    try:
        expected = ref(TEXTS, padding=True, return_tensors="pt")
        got = ours(TEXTS, padding=True, return_tensors="pt")
        assert isinstance(got, BatchEncoding)
        assert torch.equal(got.input_ids, expected["input_ids"])
        assert torch.equal(got.attention_mask, expected["attention_mask"])
        for kwargs in (
            {"padding": "longest"},
            {"padding": "max_length", "max_length": 24, "truncation": True},
            {"padding": True, "pad_to_multiple_of": 8},
            {"padding": False},
        ):
            assert dict(ours(TEXTS[:6], **kwargs)) == dict(ref(TEXTS[:6], **kwargs)), kwargs
    finally:
        ours.padding_side = ref.padding_side = "right"


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation_matches_transformers(ours, ref, side):
    ours.truncation_side = side
    ref.truncation_side = side
    try:
        assert dict(ours(TEXTS, truncation=True, max_length=5)) == dict(ref(TEXTS, truncation=True, max_length=5))
    finally:
        ours.truncation_side = ref.truncation_side = "right"


def test_decode_and_batch_decode_match(ours, ref):
    batch = ref(TEXTS, padding=True, return_tensors="pt")["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(batch, skip_special_tokens=skip) == ref.batch_decode(batch, skip_special_tokens=skip)
        for row in batch:
            assert ours.decode(row, skip_special_tokens=skip) == ref.decode(row, skip_special_tokens=skip)
            assert ours.decode(row.tolist(), skip_special_tokens=skip) == ref.decode(row, skip_special_tokens=skip)
    ids = ref.encode("<|im_start|>assistant\n答案<|im_end|><repo_name>")
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids[0]) == ref.decode(ids[0])


def test_special_tokens_and_vocab_match(ours, ref):
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(ref, name), name
        assert getattr(ours, f"{name}_id") == getattr(ref, f"{name}_id"), name
    assert ours.all_special_ids == ref.all_special_ids
    assert ours.all_special_tokens == ref.all_special_tokens
    assert ours.special_tokens_map == ref.special_tokens_map
    assert len(ours) == len(ref)
    assert ours.vocab_size == ref.vocab_size
    assert ours.get_vocab() == ref.get_vocab()
    assert ours.chat_template == ref.chat_template
    ids = ref.encode("<|im_start|>hi there<|im_end|>") + [999_999]
    for skip in (False, True):
        assert ours.convert_ids_to_tokens(ids, skip_special_tokens=skip) == ref.convert_ids_to_tokens(
            ids, skip_special_tokens=skip
        )
    tokens = ["<|im_start|>", "hi", "Ġthere", "no-such-token-here"]
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("hi") == ref.convert_tokens_to_ids("hi")
    assert ours.convert_ids_to_tokens(5) == ref.convert_ids_to_tokens(5)


def test_padding_without_pad_token_raises_like_transformers(ours):
    saved = ours.pad_token
    ours.pad_token = None
    try:
        assert ours.pad_token_id is None
        with pytest.raises(ValueError, match=r"tokenizer.pad_token = tokenizer.eos_token"):
            ours(["a", "a b c"], padding=True)
        ours(["a", "a b c"])  # no padding asked: fine
        ours.pad_token = ours.eos_token
        assert ours.pad_token_id == ours.eos_token_id
        ours.pad_token_id = 0
        assert ours.pad_token == "<|endoftext|>"
        with pytest.raises(ValueError, match="not in the vocabulary"):
            ours.pad_token = "<definitely-not-a-token>"
    finally:
        ours.pad_token = saved


def test_call_shapes_and_batch_encoding(ours):
    single = ours("hello there", return_tensors="pt")
    assert single.input_ids.shape == (1, 2) and single["attention_mask"].dtype == torch.long
    assert single.to("cpu") is single
    assert isinstance(ours.encode("hello there", return_tensors="pt"), torch.Tensor)
    assert ours("hello there").input_ids == ours.encode("hello there")
    with pytest.raises(ValueError, match="Unable to create tensor"):
        ours(["a", "a b c"], return_tensors="pt")
    with pytest.raises(AttributeError):
        _ = single.no_such_key
    with pytest.raises(ValueError, match="padding_side"):
        ours.padding_side = "middle"
    with pytest.raises(TypeError, match="unsupported"):
        ours("x", frobnicate=True)


def test_from_pretrained_options(hf_smollm2_dir):
    tok = AutoTokenizer.from_pretrained(
        str(hf_smollm2_dir), padding_side="left", pad_token="<|endoftext|>", trust_remote_code=True
    )
    assert tok.padding_side == "left" and tok.pad_token_id == 0
    assert isinstance(tok.engine_tokenizer, Tokenizer)
    with pytest.raises(TypeError, match="unsupported"):
        AutoTokenizer.from_pretrained(str(hf_smollm2_dir), add_bos_token=True)


def test_engine_tokenizer(hf_smollm2_dir, ref):
    tok = Tokenizer.from_source(ModelSource(kind="hf", path=hf_smollm2_dir))
    assert tok.encode_batch(TEXTS[:5]) == [ref.encode(t) for t in TEXTS[:5]]
    assert tok.eos_token_ids == {ref.eos_token_id}
    assert tok.end_of_turn_token_ids() == {ref.convert_tokens_to_ids("<|im_end|>")}
    assert tok.decode_batch([ref.encode(t) for t in TEXTS[:3]]) == TEXTS[:3]


def test_gguf_tokenizer_matches_transformers(smollm2_gguf, ref):
    pytest.importorskip("tokenloom.loading.gguf_tokenizer")
    tok = Tokenizer.from_source(ModelSource(kind="gguf", path=smollm2_gguf))
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
    assert tok.eos_token_id == ref.eos_token_id
    assert tok.chat_template == ref.chat_template


def test_hf_loader_reads_config_variants(hf_smollm2_dir, tmp_path):
    with pytest.raises(ModelNotFoundError, match=str(tmp_path)):
        load_hf_tokenizer(tmp_path)
    shutil.copy(hf_smollm2_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {
        "bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "special": True},
        "eos_token": "<|im_end|>",
        "add_bos_token": True,
        "model_max_length": 8192,
        "chat_template": "from config {{ messages[0]['content'] }}",
        "padding_side": "left",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"unk_token": {"content": "<|endoftext|>"}}))
    data = load_hf_tokenizer(tmp_path)
    assert (data.bos_token, data.eos_token, data.unk_token, data.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", None,
    )
    assert data.add_bos_token and data.model_max_length == 8192 and data.extra["padding_side"] == "left"
    assert data.chat_template == "from config {{ messages[0]['content'] }}"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert load_hf_tokenizer(tmp_path).chat_template == "from json"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("tools {{ tools|length }}")
    data = load_hf_tokenizer(tmp_path)
    assert data.chat_template == "from jinja"
    assert data.extra["chat_templates"] == {"default": "from jinja", "tool_use": "tools {{ tools|length }}"}
    tok = Tokenizer(data)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tools=[{"type": "function"}]) == "tools 1"


# ---------------------------------------------------------------- guards: double BOS, end of turn

# Gemma 3's chat template, abridged: like the original it writes the BOS token itself.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
DOUBLE_BOS = "two BOS tokens.*add_special_tokens=False"


@pytest.fixture(scope="module")
def gemma_tokenizer():
    """Gemma 3's tokenizer (it adds a BOS), with its chat template (the GGUF carries none)."""
    from tokenloom.loading.pull import pull

    tokenizer = AutoTokenizer.from_pretrained(str(pull("gemma3-270m", progress=False)))
    tokenizer.chat_template = GEMMA3_TEMPLATE
    return tokenizer


def test_double_bos_warns_in_both_tokenizers(gemma_tokenizer):
    tok = gemma_tokenizer
    bos = tok.bos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.startswith(tok.bos_token)
    with pytest.warns(UserWarning, match=DOUBLE_BOS):
        ids = tok(text)["input_ids"]
    assert ids[:2] == [bos, bos]  # what the warning is about
    with pytest.warns(UserWarning, match=DOUBLE_BOS):
        tok.engine_tokenizer.encode(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        single = tok(text, add_special_tokens=False)["input_ids"]
        assert single[0] == bos and single[1] != bos
        assert tok.engine_tokenizer.encode(text, add_special_tokens=False) == single
        assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                       return_dict=False) == single
        assert tok("Hi")["input_ids"][0] == bos  # plain text: the one BOS the tokenizer adds


def test_no_double_bos_warning_when_the_tokenizer_adds_none(ours):
    """SmolLM2's tokenizer adds no BOS: its rendered template tokenizes the same either way."""
    text = ours.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ours(text)["input_ids"] == ours(text, add_special_tokens=False)["input_ids"]


def test_end_of_turn_token_from_the_template(gemma_tokenizer, ours):
    assert gemma_tokenizer.engine_tokenizer.end_of_turn_token_ids() == {
        gemma_tokenizer.convert_tokens_to_ids("<end_of_turn>")
    }
    assert ours.engine_tokenizer.end_of_turn_token_ids() == {ours.convert_tokens_to_ids("<|im_end|>")}
