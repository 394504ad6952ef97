"""Hostile model files, one test per class of issue 10: each malformed GGUF file or HF directory is a typed
tokenloom error naming the file, the field and the value, raised fast (the fuzz corpus runs the same
cases, and random variants, in subprocesses under a memory cap)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from tests.fuzz_corpus import gguf_cases, hf_cases
from tests.hostile_files import TINY_LLAMA_CONFIG
from tokenloom import AutoModelForCausalLM, AutoTokenizer
from tokenloom.errors import (
    ConfigError,
    GGUFFormatError,
    ModelLoadError,
    TokenizerError,
    TokenloomError,
    UnsupportedModelError,
)
from tokenloom.loading import load_model
from tokenloom.loading.gguf_reader import read_gguf
from tokenloom.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> dict[str, Path]:
    return {case.name: Path(case.path) for case in gguf_cases(tmp_path_factory.mktemp("hostile_gguf"))}


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict[str, tuple[Path, str | None]]:
    return {case.name: (Path(case.path), case.recipe.get("gguf_file"))
            for case in hf_cases(tmp_path_factory.mktemp("hostile_hf"))}


def _tokenizer(path: Path, gguf_file: str | None = None) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    if tokenizer.chat_template is not None:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def _model(path: Path, gguf_file: str | None = None) -> None:
    load_model(path, gguf_file, device_map="cpu")


def _raises(load, path: Path, error: type[TokenloomError], fragments: tuple[str, ...], gguf_file=None):
    with pytest.raises(error) as info:
        load(path, gguf_file)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert info.value.hint, "every load error carries a hint for the CLI's second line"
    return info.value


# name -> (the loader that refuses it, error, fragments of the message)
GGUF_CASES: dict[str, tuple[str, type[TokenloomError], tuple[str, ...]]] = {
    # 2. sizes trusted before they are checked
    "block_count_1e9": ("model", ConfigError, ("'llama.block_count'", "1000000000", "1024")),
    "block_count_beyond_tensors": ("model", ConfigError, ("'llama.block_count'", "is 3", "2 blocks")),
    "embedding_length_2e31": ("model", ConfigError, ("'llama.embedding_length'", "2147483648")),
    "context_length_u64_max": ("model", ConfigError, ("'llama.context_length'", "18446744073709551615")),
    "feed_forward_negative": ("model", ConfigError, ("'llama.feed_forward_length'", "-1")),
    "head_count_zero": ("model", ConfigError, ("'llama.attention.head_count'", "got 0")),
    "head_count_not_dividing": ("model", ConfigError, ("num_key_value_heads=2", "num_attention_heads=5")),
    "head_count_kv_not_dividing": ("model", ConfigError, ("num_key_value_heads=3", "num_attention_heads=4")),
    "rope_dimension_1e6": ("model", ConfigError, ("'llama.rope.dimension_count'", "1000000")),
    "vocab_size_1e9": ("model", ConfigError, ("'llama.vocab_size'", "1000000000")),
    "tensor_with_2e20_dimensions": ("model", GGUFFormatError, ("'token_embd.weight'", "1048576 dimensions")),
    "tensor_with_5_dimensions": ("model", GGUFFormatError, ("5 dimensions", "at most 4")),
    "tensor_rows_2e40": ("model", GGUFFormatError, ("'token_embd.weight'", "ends at byte")),
    "kv_count_2e60": ("model", GGUFFormatError, ("metadata count", "1152921504606846976")),
    "tensor_count_2e60": ("model", GGUFFormatError, ("tensor count", "1152921504606846976")),
    "key_length_2e62": ("model", GGUFFormatError, ("truncated", "metadata key")),
    "array_count_2e40": ("tokenizer", GGUFFormatError, ("'tokenizer.ggml.tokens'", "1099511627776")),
    # 3. tokenizer rebuilding amplifies memory
    "sentencepiece_rebuild_amplification": ("tokenizer", TokenizerError, ("2000 tokens", "MAX_MERGE_REBUILD_CHARS")),
    # 4. untyped exceptions from malformed metadata
    "head_count_string": ("model", ConfigError, ("'llama.attention.head_count'", "'4'")),
    "head_count_per_layer_array": ("model", ConfigError, ("'llama.attention.head_count'", "[4, 4, 2]")),
    "bos_token_id_string": ("tokenizer", TokenizerError, ("tokenizer.ggml.bos_token_id", "'1'")),
    "bos_token_id_float": ("tokenizer", TokenizerError, ("tokenizer.ggml.bos_token_id", "1.5")),
    "merges_as_ints": ("tokenizer", TokenizerError, ("tokenizer.ggml.merges", "[1, 2, 3]")),
    "merges_unparsable": ("tokenizer", TokenizerError, ("tokenizer.ggml.merges[0]", "'<t'")),
    "merges_unknown_tokens": ("tokenizer", TokenizerError, ("`zz` out of vocabulary",)),
    "byte_level_merges_without_byte_tokens": ("tokenizer", TokenizerError, ("`a` out of vocabulary",)),
    "tokens_as_ints": ("tokenizer", TokenizerError, ("tokenizer.ggml.tokens", "[0, 1, 2]")),
    "tokens_scalar": ("tokenizer", TokenizerError, ("tokenizer.ggml.tokens", "'<t0>'")),
    "token_type_strings": ("tokenizer", TokenizerError, ("tokenizer.ggml.token_type",)),
    "chat_template_int": ("tokenizer", TokenizerError, ("tokenizer.chat_template", "got 5")),
    "chat_template_array": ("tokenizer", TokenizerError, ("tokenizer.chat_template", "a list")),
    "tokenizer_model_int": ("tokenizer", TokenizerError, ("tokenizer.ggml.model", "got 5")),
    "add_bos_token_string": ("tokenizer", TokenizerError, ("tokenizer.ggml.add_bos_token", "'yes'")),
    "metadata_nested_100k_deep": ("model", GGUFFormatError, ("'general.nested'", "MAX_NESTING")),
    "metadata_key_duplicate": ("model", GGUFFormatError, ("'general.architecture'", "twice")),
    "alignment_zero": ("model", GGUFFormatError, ("general.alignment", "got 0")),
    "alignment_three": ("model", GGUFFormatError, ("general.alignment", "got 3")),
    "alignment_string": ("model", GGUFFormatError, ("general.alignment", "'32'")),
    "architecture_int": ("model", UnsupportedModelError, ("architecture 7",)),
    "architecture_unknown": ("model", UnsupportedModelError, ("'bert'",)),
    "version_1": ("model", GGUFFormatError, ("version 1",)),
    "version_big_endian": ("model", GGUFFormatError, ("big-endian",)),
    "empty_file": ("model", GGUFFormatError, ("not a GGUF file",)),
    "magic_only": ("model", GGUFFormatError, ("truncated",)),
    "three_bytes": ("model", GGUFFormatError, ("not a GGUF file",)),
    # 5. bad values accepted silently
    "rms_epsilon_nan": ("model", ConfigError, ("'llama.attention.layer_norm_rms_epsilon'", "nan")),
    "rms_epsilon_negative": ("model", ConfigError, ("'llama.attention.layer_norm_rms_epsilon'", "-1.0")),
    "freq_base_negative": ("model", ConfigError, ("'llama.rope.freq_base'", "-10000.0")),
    "freq_base_zero": ("model", ConfigError, ("'llama.rope.freq_base'", "0.0")),
    "freq_base_inf": ("model", ConfigError, ("'llama.rope.freq_base'", "inf")),
    "norm_tensor_nan": ("model", ModelLoadError, ("not finite", "model.layers.0.input_layernorm.weight")),
    "embedding_inf": ("model", ModelLoadError, ("not finite", "model.embed_tokens.weight")),
    "tensors_overlap": ("model", GGUFFormatError, ("'token_embd.weight'", "'output_norm.weight'", "overlap")),
    "tensor_offset_beyond_file": ("model", GGUFFormatError, ("'blk.1.ffn_norm.weight'", "ends at byte")),
    "tensor_offset_misaligned": ("model", GGUFFormatError, ("'output.weight'", "alignment")),
    "tensor_type_unknown": ("model", GGUFFormatError, ("unknown ggml type 250",)),
    "tensor_names_duplicate": ("model", GGUFFormatError, ("'token_embd.weight'", "twice")),
}


@pytest.mark.parametrize("name", sorted(GGUF_CASES))
def test_hostile_gguf_is_a_typed_error(gguf, name):
    stage, error, fragments = GGUF_CASES[name]
    path = gguf[name]
    load = _model if stage == "model" else _tokenizer
    exc = _raises(load, path, error, fragments)
    if name not in ("empty_file", "three_bytes"):
        assert path.name in str(exc), "the error names the file"


@pytest.mark.parametrize("name", [n for n, (stage, error, _) in GGUF_CASES.items() if error is TokenizerError])
def test_from_pretrained_fails_like_the_tokenizer(gguf, name):
    """A malformed tokenizer: AutoModelForCausalLM raises the very error AutoTokenizer raises."""
    with pytest.raises(TokenloomError) as by_tokenizer:
        _tokenizer(gguf[name])
    with pytest.raises(TokenloomError) as by_model:
        AutoModelForCausalLM.from_pretrained(str(gguf[name]), device_map="cpu")
    assert type(by_model.value) is type(by_tokenizer.value)
    assert str(by_model.value) == str(by_tokenizer.value)


def test_the_issue_sizes_are_refused_before_the_work(gguf, monkeypatch):
    """2^20 dimensions took minutes to parse (the product of a million dimensions), 2,000 'a'-tokens
    6 GB and 10 s to rebuild: both are refused before that work starts."""
    from tokenloom.loading import gguf_reader, gguf_tokenizer

    monkeypatch.setattr(gguf_reader, "prod", lambda *_: pytest.fail("the dimensions were multiplied"))
    with pytest.raises(GGUFFormatError, match="1048576 dimensions"):
        read_gguf(gguf["tensor_with_2e20_dimensions"])
    monkeypatch.undo()
    sliced = []
    monkeypatch.setattr(gguf_tokenizer, "BPE", lambda *a, **k: sliced.append(1))
    start = time.perf_counter()
    with pytest.raises(TokenizerError, match="would slice 2666666000 characters"):
        Tokenizer.from_pretrained(str(gguf["sentencepiece_rebuild_amplification"]))
    assert not sliced and time.perf_counter() - start < 10


def test_metadata_arrays_are_capped_in_all(gguf, tmp_path):
    """Each array element becomes a Python object: past MAX_METADATA_ELEMENTS (summed over all arrays, each
    array within the file's bytes) the header is refused before the elements are built."""
    import struct

    from tests.hostile_files import ARRAY, U8, encode_header, encode_kv, encode_string, parse_raw
    from tokenloom.loading.gguf_reader import MAX_METADATA_ELEMENTS

    base = parse_raw(gguf["block_count_1e9"].with_name("base-llama.gguf"))
    half = MAX_METADATA_ELEMENTS // 2 + 1
    big = b"".join(encode_string(f"general.big{i}") + struct.pack("<IIQ", ARRAY, U8, half) + bytes(half)
                   for i in range(2))
    path = tmp_path / "many_elements.gguf"
    path.write_bytes(encode_header(base.version, base.kvs, base.tensors, kv_count=len(base.kvs) + 2,
                                   raw_kvs=b"".join(encode_kv(kv) for kv in base.kvs) + big))
    with pytest.raises(GGUFFormatError, match="'general.big1'.*MAX_METADATA_ELEMENTS"):
        read_gguf(path)


def test_a_hostile_template_in_gguf_metadata_is_refused_when_rendered(gguf):
    tokenizer = AutoTokenizer.from_pretrained(str(gguf["gguf_chat_template_nested_range_loops"]))
    with pytest.raises(TokenloomError, match="max_loop_iterations"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_out_of_vocabulary_special_ids_are_left_out(gguf):
    """An eos id that names no token is ignored by the tokenizer and the config alike."""
    loaded = load_model(gguf["eos_token_id_out_of_vocab"], device_map="cpu")
    assert "eos_token_id" not in loaded.checkpoint.config
    assert AutoTokenizer.from_pretrained(str(gguf["eos_token_id_out_of_vocab"])).eos_token is None


# ---------------------------------------------------------------- HF directories

HF_CASES: dict[str, tuple[str, type[TokenloomError], tuple[str, ...]]] = {
    "config_not_utf8": ("model", ModelLoadError, ("config.json", "not UTF-8")),
    "config_latin1": ("model", ModelLoadError, ("config.json", "not UTF-8")),
    "config_not_json": ("model", ModelLoadError, ("config.json", "not valid JSON")),
    "config_json_array": ("model", ModelLoadError, ("config.json", "JSON object", "list")),
    "config_nested_100k": ("model", ModelLoadError, ("config.json", "too deeply")),
    "config_hidden_1e999": ("model", ConfigError, ("'hidden_size'", "inf")),
    "config_eps_nan_literal": ("model", ConfigError, ("'rms_norm_eps'", "nan")),
    "config_layers_1e9": ("model", ConfigError, ("num_hidden_layers is 1000000000", "2 layers")),
    "config_layers_beyond_tensors": ("model", ConfigError, ("num_hidden_layers is 5", "2 layers")),
    "config_missing_heads": ("model", ConfigError, ("lacks 'num_attention_heads'",)),
    "config_model_type_list": ("model", UnsupportedModelError, ("model_type ['llama']",)),
    "config_rope_scaling_garbage": ("model", ConfigError, ("'rope_scaling'", "llama3", "factor")),
    "config_torch_dtype_garbage": ("model", ConfigError, ("'torch_dtype'", "'int3'")),
    # 6. paths escape the model directory
    "shard_dotdot": ("model", ModelLoadError, ("'../outside.safetensors'", "inside")),
    "shard_absolute": ("model", ModelLoadError, ("'/etc/passwd'", "absolute path")),
    "shard_absolute_outside": ("model", ModelLoadError, ("outside.safetensors", "absolute path")),
    "shard_int": ("model", ModelLoadError, ("must be a file name", "got 5")),
    "shard_nul": ("model", ModelLoadError, ("must be a file name",)),
    "gguf_file_dotdot": ("model", ModelLoadError, ("gguf_file", "'../base-qwen2.gguf'")),
    "gguf_file_absolute": ("model", ModelLoadError, ("gguf_file", "absolute path")),
    "gguf_file_etc_passwd": ("tokenizer", ModelLoadError, ("gguf_file", "'/etc/passwd'")),
    "index_weight_map_list": ("model", ModelLoadError, ("weight_map",)),
    "safetensors_header_length_lie": ("model", ModelLoadError, ("safetensors header",)),
    "safetensors_truncated": ("model", ModelLoadError, ("safetensors header",)),
    # tokenizer files
    "tokenizer_json_garbage": ("tokenizer", TokenizerError, ("tokenizer.json",)),
    "tokenizer_json_not_utf8": ("tokenizer", TokenizerError, ("tokenizer.json",)),
    "tokenizer_config_chat_template_int": ("tokenizer", TokenizerError, ("tokenizer_config.json", "chat_template",
                                                                         "got 5")),
    "tokenizer_config_bos_int": ("tokenizer", TokenizerError, ("tokenizer_config.json", "bos_token", "got 5")),
    "tokenizer_config_added_tokens_garbage": ("tokenizer", TokenizerError, ("added_tokens_decoder['x']",)),
    "tokenizer_config_model_max_length_string": ("tokenizer", TokenizerError, ("model_max_length", "'big'")),
    "tokenizer_config_extra_special_garbage": ("tokenizer", TokenizerError, ("additional_special_tokens[0]",)),
    "tokenizer_config_not_utf8": ("tokenizer", TokenizerError, ("tokenizer_config.json", "not UTF-8")),
    "special_tokens_map_garbage": ("tokenizer", TokenizerError, ("special_tokens_map.json", "bos_token")),
    "chat_template_jinja_not_utf8": ("tokenizer", TokenizerError, ("chat_template.jinja", "not UTF-8")),
    "chat_template_jinja_output_flood": ("tokenizer", TokenloomError, ("max_output_chars",)),
    "generation_config_eos_string": ("model", ConfigError, ("generation_config.json", "eos_token_id", "'2'")),
    "generation_config_eos_2e64": ("model", ConfigError, ("generation_config.json", "18446744073709551616")),
    "generation_config_temperature_string": ("model", ConfigError, ("temperature", "'hot'")),
    "generation_config_max_length_negative": ("model", ConfigError, ("max_length", "-5")),
}


@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_hostile_hf_directory_is_a_typed_error(hf, name):
    stage, error, fragments = HF_CASES[name]
    path, gguf_file = hf[name]
    _raises(_model if stage == "model" else _tokenizer, path, error, fragments, gguf_file)


def test_shards_outside_the_directory_are_never_opened(hf, monkeypatch):
    """The containment check comes before any file is opened: no safetensors file is read at all."""
    import safetensors

    opened: list[str] = []
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    for name in ("shard_dotdot", "shard_absolute_outside"):
        with pytest.raises(ModelLoadError):
            load_model(hf[name][0], device_map="cpu")
    assert opened == []


def test_the_tiny_directory_itself_loads(hf):
    """The hostile directories are this one with one thing changed."""
    path, _ = hf["hf_tiny_llama_as_is"]
    model = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu")
    assert model.generate(AutoTokenizer.from_pretrained(str(path))("w3 w4", return_tensors="pt")["input_ids"],
                          max_new_tokens=3, do_sample=False).shape == (1, 5)


# ---------------------------------------------------------------- the config validator, per architecture

ARCH_CONFIGS = {
    "llama": TINY_LLAMA_CONFIG,
    "mistral": {**TINY_LLAMA_CONFIG, "model_type": "mistral", "sliding_window": 64},
    "qwen2": {**TINY_LLAMA_CONFIG, "model_type": "qwen2"},
    "qwen3": {**TINY_LLAMA_CONFIG, "model_type": "qwen3", "head_dim": 16},
    "phi3": {**TINY_LLAMA_CONFIG, "model_type": "phi3"},
    "gemma3_text": {**TINY_LLAMA_CONFIG, "model_type": "gemma3_text", "head_dim": 16, "sliding_window": 16},
    "gpt2": {"model_type": "gpt2", "vocab_size": 96, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64},
}


def _from_dict(raw: dict):
    from tokenloom.models.registry import model_class_for

    return model_class_for(raw).config_class.from_dict(raw)


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_every_architecture_checks_its_config(arch):
    raw = ARCH_CONFIGS[arch]
    config = _from_dict(raw)
    assert config.num_hidden_layers == 2
    hidden, layers, heads = ("n_embd", "n_layer", "n_head") if arch == "gpt2" else (
        "hidden_size", "num_hidden_layers", "num_attention_heads")
    act = "hidden_activation" if arch == "gemma3_text" else "hidden_act"
    cases = [
        ({hidden: "64"}, (repr(hidden), "'64'")),
        ({hidden: 64.5}, (repr(hidden), "64.5")),
        ({hidden: -64}, (repr(hidden), "-64")),
        ({layers: 10**9}, (repr(layers), "1000000000")),
        ({heads: True}, (repr(heads), "True")),
        ({"vocab_size": 0}, ("'vocab_size'", "got 0")),
        ({"eos_token_id": "2"}, ("'eos_token_id'", "'2'")),
    ]
    if arch != "gpt2":
        cases += [({"rms_norm_eps": math.nan}, ("'rms_norm_eps'", "nan")),
                  ({"rope_theta": -1.0}, ("'rope_theta'", "-1.0")),
                  ({"num_key_value_heads": 3}, ("num_key_value_heads=3",)),
                  ({act: "swiglu9"}, (repr(act), "swiglu9"))]
    if arch in ("llama", "mistral", "qwen2", "phi3"):
        cases.append(({heads: 5}, ("num_attention_heads=5", "hidden_size=64")))
    for change, fragments in cases:
        with pytest.raises(ConfigError) as info:
            _from_dict({**raw, **change})
        for fragment in fragments:
            assert fragment in str(info.value), (arch, change, str(info.value))
    if arch in ("llama", "qwen2", "qwen3", "phi3"):
        with pytest.raises(ConfigError, match="lacks 'num_attention_heads'"):
            _from_dict({k: v for k, v in raw.items() if k != "num_attention_heads"})
    assert issubclass(ConfigError, ValueError), "callers that catch ValueError keep working"
