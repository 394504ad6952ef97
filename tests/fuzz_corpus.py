"""The hostile-input corpus, built by the tests (never committed): the cases of issue 10 written by hand,
HF directories with each config key missing / of the wrong type / out of range, and random variants
of real and tiny GGUF files (truncations, single-field metadata mutations, byte flips in the header and
tensor table). Random cases are drawn with fixed seeds; a case that needs a large file is a recipe the
worker builds when it runs it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from tests import tiny_models
from tests.hostile_files import (
    ARRAY,
    CARRIED_TEMPLATES,
    CHAT_TEMPLATE,
    F32,
    HOSTILE_TEMPLATES,
    I32,
    STRING,
    TINY_LLAMA_CONFIG,
    U32,
    U64,
    Case,
    RawGGUF,
    encode_header,
    encode_kv,
    encode_nested_array_kv,
    parse_raw,
    rewrite,
    write_tiny_hf_dir,
)

# ---------------------------------------------------------------- GGUF cases written by hand


# A byte-level vocabulary of the tiny models' 96 rows whose merges are all in it (tiny_models' own
# tokenizer metadata only serves tests that never build its tokenizer).
TINY_TOKENS = [chr(c) for c in range(33, 33 + 94)] + ["He", "ll"]
TINY_TOKENIZER = {
    "tokenizer.ggml.tokens": (ARRAY, (STRING, TINY_TOKENS)),
    "tokenizer.ggml.merges": (ARRAY, (STRING, ["H e", "l l"])),
    "tokenizer.chat_template": (STRING, CHAT_TEMPLATE),
}


def _tiny(root: Path, arch: str = "llama") -> RawGGUF:
    """The tiny random model of `arch` (tests/tiny_models.py) with a working tokenizer."""
    path = root / f"base-{arch}.gguf"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        written = tiny_models.write_tiny_gguf(root, arch)
        rewrite(parse_raw(written), path, set_kvs=TINY_TOKENIZER)
        written.unlink()
    return parse_raw(path)


def _tiny_with_tensor(root: Path, name: str, tensor: str, values: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    kv, tensors = tiny_models._decoder_case("llama", rng)
    tensors[tensor] = (values, tensors[tensor][1])
    with np.errstate(invalid="ignore", over="ignore"):
        written = tiny_models.write_gguf(root / f"{name}-raw.gguf", "llama", kv, tensors)
    path = rewrite(parse_raw(written), root / f"{name}.gguf", set_kvs=TINY_TOKENIZER)
    written.unlink()
    return path


def gguf_cases(root: Path) -> list[Case]:
    root.mkdir(parents=True, exist_ok=True)
    base = _tiny(root)
    cases: list[Case] = []

    def add(name: str, expect_typed: bool = True, **changes: Any) -> None:
        path = rewrite(base, root / f"{name}.gguf", **changes)
        cases.append(Case(name, str(path), {"expect_typed": expect_typed}))

    def header(name: str, data: bytes, *, keep_data: bool = True) -> None:
        path = root / f"{name}.gguf"
        with open(path, "wb") as f:
            f.write(data)
            if keep_data:
                f.write(b"\0" * (-len(data) % 32))
                with open(base.path, "rb") as src:
                    src.seek(base.data_start)
                    f.write(src.read())
        cases.append(Case(name, str(path), {"expect_typed": True}))

    for template in CARRIED_TEMPLATES:
        add(f"gguf_chat_template_{template}", set_kvs={"tokenizer.chat_template": (STRING, HOSTILE_TEMPLATES[template])})
    # sizes trusted before they are checked
    add("block_count_1e9", set_kvs={"llama.block_count": (U32, 10**9)})
    add("block_count_beyond_tensors", set_kvs={"llama.block_count": (U32, 3)})
    add("embedding_length_2e31", set_kvs={"llama.embedding_length": (U32, 2**31)})
    add("context_length_u64_max", set_kvs={"llama.context_length": (U64, 2**64 - 1)})
    add("feed_forward_negative", set_kvs={"llama.feed_forward_length": (I32, -1)})
    add("head_count_zero", set_kvs={"llama.attention.head_count": (U32, 0)})
    add("head_count_not_dividing", set_kvs={"llama.attention.head_count": (U32, 5)})
    add("head_count_kv_not_dividing", set_kvs={"llama.attention.head_count_kv": (U32, 3)})
    add("rope_dimension_1e6", set_kvs={"llama.rope.dimension_count": (U32, 10**6)})
    add("vocab_size_1e9", set_kvs={"llama.vocab_size": (U32, 10**9)})
    # wrong value types
    add("head_count_string", set_kvs={"llama.attention.head_count": (STRING, "4")})
    add("head_count_per_layer_array", set_kvs={"llama.attention.head_count": (ARRAY, (U32, [4, 4, 2]))})
    add("bos_token_id_string", set_kvs={"tokenizer.ggml.bos_token_id": (STRING, "1")})
    add("bos_token_id_float", set_kvs={"tokenizer.ggml.bos_token_id": (F32, 1.5)})
    add("eos_token_id_out_of_vocab", expect_typed=False, set_kvs={"tokenizer.ggml.eos_token_id": (U32, 2**32 - 1)})
    add("merges_as_ints", set_kvs={"tokenizer.ggml.merges": (ARRAY, (U32, [1, 2, 3]))})
    add("merges_unparsable", set_kvs={"tokenizer.ggml.merges": (ARRAY, (STRING, ["<t", "a b c", ""]))})
    add("merges_unknown_tokens", set_kvs={"tokenizer.ggml.merges": (ARRAY, (STRING, ["zz qq"]))})
    add("tokens_as_ints", set_kvs={"tokenizer.ggml.tokens": (ARRAY, (U32, list(range(96))))})
    add("tokens_scalar", set_kvs={"tokenizer.ggml.tokens": (STRING, "<t0>")})
    add("tokens_empty", expect_typed=False, set_kvs={"tokenizer.ggml.tokens": (ARRAY, (STRING, []))})
    add("token_type_strings", set_kvs={"tokenizer.ggml.token_type": (ARRAY, (STRING, ["a"] * 96))})
    add("chat_template_int", set_kvs={"tokenizer.chat_template": (U32, 5)})
    add("chat_template_array", set_kvs={"tokenizer.chat_template": (ARRAY, (STRING, [CHAT_TEMPLATE]))})
    add("tokenizer_model_int", set_kvs={"tokenizer.ggml.model": (U32, 5)})
    add("tokenizer_model_unknown", expect_typed=False, set_kvs={"tokenizer.ggml.model": (STRING, "bert")})
    add("add_bos_token_string", set_kvs={"tokenizer.ggml.add_bos_token": (STRING, "yes")})
    add(
        "sentencepiece_rebuild_amplification",
        set_kvs={
            "tokenizer.ggml.model": (STRING, "llama"),
            "tokenizer.ggml.tokens": (ARRAY, (STRING, ["a" * k for k in range(1, 2001)])),
            "tokenizer.ggml.token_type": (ARRAY, (I32, [1] * 2000)),
        },
        drop=("tokenizer.ggml.merges",),
    )
    add(
        "byte_level_merges_without_byte_tokens",
        set_kvs={
            "tokenizer.ggml.tokens": (ARRAY, (STRING, ["ab", "abc", *[f"<t{i}>" for i in range(2, 96)]])),
            "tokenizer.ggml.merges": (ARRAY, (STRING, ["a b", "ab c"])),
        },
    )
    add(
        "byte_level_without_byte_tokens",
        expect_typed=False,
        set_kvs={
            "tokenizer.ggml.tokens": (ARRAY, (STRING, ["a", "b", "ab", "hello world", "€uro"] + [f"<t{i}>" for i in range(5, 96)])),
            "tokenizer.ggml.merges": (ARRAY, (STRING, ["a b"])),
            "tokenizer.ggml.bos_token_id": (U32, 3),
        },
    )
    # bad values accepted silently
    add("rms_epsilon_nan", set_kvs={"llama.attention.layer_norm_rms_epsilon": (F32, math.nan)})
    add("rms_epsilon_negative", set_kvs={"llama.attention.layer_norm_rms_epsilon": (F32, -1.0)})
    add("freq_base_negative", set_kvs={"llama.rope.freq_base": (F32, -10000.0)})
    add("freq_base_zero", set_kvs={"llama.rope.freq_base": (F32, 0.0)})
    add("freq_base_inf", set_kvs={"llama.rope.freq_base": (F32, math.inf)})
    cases.append(Case("norm_tensor_nan", str(_tiny_with_tensor(root, "norm_tensor_nan", "blk.0.attn_norm.weight",
                                                               np.full(64, np.nan))), {"expect_typed": True}))
    cases.append(Case("embedding_inf", str(_tiny_with_tensor(root, "embedding_inf", "token_embd.weight",
                                                             np.full((96, 64), np.inf))), {"expect_typed": True}))
    overlapping = [replace(t) for t in base.tensors]
    overlapping[1].offset = overlapping[0].offset
    add("tensors_overlap", tensors=overlapping)
    beyond = [replace(t) for t in base.tensors]
    beyond[-1].offset = 1 << 40
    add("tensor_offset_beyond_file", tensors=beyond)
    misaligned = [replace(t) for t in base.tensors]
    misaligned[2].offset += 1
    add("tensor_offset_misaligned", tensors=misaligned)
    many_dims = [replace(t) for t in base.tensors]
    many_dims[0] = replace(many_dims[0], dims=[1] * (1 << 20))
    add("tensor_with_2e20_dimensions", tensors=many_dims)
    five_dims = [replace(t) for t in base.tensors]
    five_dims[0] = replace(five_dims[0], dims=[*five_dims[0].dims, 1, 1, 1])
    add("tensor_with_5_dimensions", tensors=five_dims)
    huge = [replace(t) for t in base.tensors]
    huge[0] = replace(huge[0], dims=[huge[0].dims[0], 1 << 40])
    add("tensor_rows_2e40", tensors=huge)
    odd_type = [replace(t) for t in base.tensors]
    odd_type[0].ggml_type = 250
    add("tensor_type_unknown", tensors=odd_type)
    duplicate = [replace(t) for t in base.tensors]
    duplicate[1] = replace(duplicate[1], name=duplicate[0].name)
    add("tensor_names_duplicate", tensors=duplicate)
    add("alignment_zero", set_kvs={"general.alignment": (U32, 0)})
    add("alignment_three", set_kvs={"general.alignment": (U32, 3)})
    add("alignment_string", set_kvs={"general.alignment": (STRING, "32")})
    add("architecture_int", set_kvs={"general.architecture": (U32, 7)})
    add("architecture_unknown", set_kvs={"general.architecture": (STRING, "bert")})
    kvs = list(base.kvs)
    header("metadata_nested_100k_deep", encode_header(
        base.version, kvs, base.tensors, kv_count=len(kvs) + 1,
        raw_kvs=b"".join(encode_kv(kv) for kv in kvs) + encode_nested_array_kv("general.nested", 100_000),
    ))
    header("metadata_key_duplicate", encode_header(base.version, [*kvs, kvs[0]], base.tensors))
    header("kv_count_2e60", encode_header(base.version, kvs, base.tensors, kv_count=1 << 60))
    header("tensor_count_2e60", encode_header(base.version, kvs, base.tensors, tensor_count=1 << 60))
    lie = encode_header(base.version, kvs, base.tensors)
    header("key_length_2e62", lie[:24] + struct.pack("<Q", 1 << 62) + lie[32:])
    tokens = base.get("tokenizer.ggml.tokens")
    assert tokens is not None
    token_bytes = encode_kv(tokens)
    at = lie.index(token_bytes)
    count_at = at + 8 + len(tokens.key) + 4 + 4
    header("array_count_2e40", lie[:count_at] + struct.pack("<Q", 1 << 40) + lie[count_at + 8 :])
    header("version_1", lie[:4] + struct.pack("<I", 1) + lie[8:])
    header("version_big_endian", lie[:4] + struct.pack(">I", 3) + lie[8:])
    header("empty_file", b"", keep_data=False)
    header("magic_only", b"GGUF", keep_data=False)
    header("three_bytes", b"GGU", keep_data=False)
    return cases


# ---------------------------------------------------------------- HF directories written by hand


def _link_dir(base: Path, target: Path, keep: tuple[str, ...] = ()) -> Path:
    """A copy of `base` sharing its files (hard links), except those in `keep` which are left out."""
    target.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        if item.name not in keep and item.is_file():
            os.link(item, target / item.name)
    return target


def hf_cases(root: Path) -> list[Case]:
    root.mkdir(parents=True, exist_ok=True)
    base = write_tiny_hf_dir(root / "base")
    cases = [Case("hf_tiny_llama_as_is", str(base), {"expect_typed": False})]

    def variant(name: str, files: dict[str, bytes | str], expect_typed: bool = True, **recipe: Any) -> None:
        directory = _link_dir(base, root / name, keep=tuple(files))
        for filename, content in files.items():
            path = directory / filename
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        cases.append(Case(name, str(directory), {"expect_typed": expect_typed, **recipe}))

    config = dict(TINY_LLAMA_CONFIG)
    variant("config_not_utf8", {"config.json": json.dumps(config).encode() + b"\xff\xfe"})
    variant("config_latin1", {"config.json": json.dumps({**config, "name": "caf\u00e9"}, ensure_ascii=False).encode("latin-1")})
    variant("config_not_json", {"config.json": "{model_type: llama"})
    variant("config_json_array", {"config.json": "[1, 2, 3]"})
    variant("config_nested_100k", {"config.json": "[" * 100_000 + "]" * 100_000})
    variant("config_empty", {"config.json": ""})
    variant("config_hidden_1e999", {"config.json": json.dumps(config).replace('"hidden_size": 64', '"hidden_size": 1e999')})
    variant("config_eps_nan_literal", {"config.json": json.dumps({**config, "rms_norm_eps": math.nan})})
    variant("config_layers_1e9", {"config.json": json.dumps({**config, "num_hidden_layers": 10**9})})
    variant("config_layers_beyond_tensors", {"config.json": json.dumps({**config, "num_hidden_layers": 5})})
    variant("config_missing_heads", {"config.json": json.dumps({k: v for k, v in config.items()
                                                                 if k != "num_attention_heads"})})
    variant("config_model_type_unknown", {"config.json": json.dumps({**config, "model_type": "bert"})})
    variant("config_model_type_list", {"config.json": json.dumps({**config, "model_type": ["llama"]})})
    variant("config_rope_scaling_garbage", {"config.json": json.dumps({**config, "rope_scaling": {"rope_type": "llama3"}})})
    variant("config_rope_scaling_string", {"config.json": json.dumps({**config, "rope_scaling": "linear"})})
    variant("config_torch_dtype_garbage", {"config.json": json.dumps({**config, "torch_dtype": "int3"})})
    variant("config_torch_dtype_int", {"config.json": json.dumps({**config, "torch_dtype": 5})})
    # shards and paths
    outside = root / "outside.safetensors"
    os.link(base / "model.safetensors", outside)
    names = json.loads((base / "model.safetensors").read_bytes()[8 : 8 + struct.unpack("<Q", (base / "model.safetensors").read_bytes()[:8])[0]])
    weight_names = [n for n in names if n != "__metadata__"]

    def index(weight_map: Any) -> str:
        return json.dumps({"metadata": {}, "weight_map": weight_map})

    no_single = ("model.safetensors",)
    for name, shard in (("shard_dotdot", "../outside.safetensors"), ("shard_absolute", "/etc/passwd"),
                        ("shard_absolute_outside", str(outside)), ("shard_int", 5), ("shard_empty", ""),
                        ("shard_dot", "."), ("shard_nul", "model\0.safetensors")):
        directory = _link_dir(base, root / name, keep=no_single)
        (directory / "model.safetensors.index.json").write_text(index(dict.fromkeys(weight_names, shard)))
        cases.append(Case(name, str(directory), {"expect_typed": True}))
    for name, weight_map in (("index_weight_map_list", weight_names), ("index_weight_map_empty", {})):
        directory = _link_dir(base, root / name, keep=no_single)
        (directory / "model.safetensors.index.json").write_text(index(weight_map))
        cases.append(Case(name, str(directory), {"expect_typed": True}))
    directory = _link_dir(base, root / "index_names_missing_from_shard", keep=no_single)
    os.link(base / "model.safetensors", directory / "shard.safetensors")
    (directory / "model.safetensors.index.json").write_text(index({**dict.fromkeys(weight_names, "shard.safetensors"),
                                                                   "model.extra.weight": "shard.safetensors"}))
    cases.append(Case("index_names_missing_from_shard", str(directory), {"expect_typed": True}))
    weights = (base / "model.safetensors").read_bytes()
    variant("safetensors_garbage", {"model.safetensors": os.urandom(4096)})
    variant("safetensors_header_length_lie", {"model.safetensors": struct.pack("<Q", 1 << 50) + weights[8:]})
    variant("safetensors_truncated", {"model.safetensors": weights[: len(weights) // 2]})
    variant("safetensors_header_not_json", {"model.safetensors": struct.pack("<Q", 16) + b"{not json at all" + weights[8:]})
    variant("safetensors_offsets_lie", {"model.safetensors": weights.replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1)})
    # tokenizer files
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    variant("tokenizer_json_garbage", {"tokenizer.json": "{\"model\": 5}"})
    variant("tokenizer_json_not_utf8", {"tokenizer.json": b"\xff\xfe\x00garbage"})
    variant("tokenizer_json_nested", {"tokenizer.json": "[" * 100_000 + "]" * 100_000})
    variant("tokenizer_config_chat_template_int", {"tokenizer_config.json": json.dumps({**tokenizer_config, "chat_template": 5})})
    variant("tokenizer_config_bos_int", {"tokenizer_config.json": json.dumps({**tokenizer_config, "bos_token": 5})})
    variant("tokenizer_config_added_tokens_garbage",
            {"tokenizer_config.json": json.dumps({**tokenizer_config, "added_tokens_decoder": {"x": 5}})})
    variant("tokenizer_config_model_max_length_string",
            {"tokenizer_config.json": json.dumps({**tokenizer_config, "model_max_length": "big"})})
    variant("tokenizer_config_chat_template_list_garbage",
            {"tokenizer_config.json": json.dumps({**tokenizer_config, "chat_template": [5, {"name": 3}]})})
    variant("tokenizer_config_extra_special_garbage",
            {"tokenizer_config.json": json.dumps({**tokenizer_config, "additional_special_tokens": [5, None, {"a": 1}]})})
    variant("tokenizer_config_not_utf8", {"tokenizer_config.json": b"\xff{}"})
    variant("special_tokens_map_garbage", {"special_tokens_map.json": json.dumps({"bos_token": [1, 2]})})
    variant("chat_template_jinja_not_utf8", {"chat_template.jinja": b"{{ messages }}\xff"})
    for template in CARRIED_TEMPLATES:
        variant(f"chat_template_jinja_{template}", {"chat_template.jinja": HOSTILE_TEMPLATES[template]})
    variant("generation_config_eos_string", {"generation_config.json": json.dumps({"eos_token_id": "2"})})
    variant("generation_config_eos_negative", {"generation_config.json": json.dumps({"eos_token_id": -1})})
    variant("generation_config_eos_2e64", {"generation_config.json": json.dumps({"eos_token_id": 2**64})})
    variant("generation_config_temperature_string", {"generation_config.json": json.dumps({"temperature": "hot"})})
    variant("generation_config_max_length_negative", {"generation_config.json": json.dumps({"max_length": -5})})
    variant("generation_config_not_object", {"generation_config.json": json.dumps([1])})
    # gguf_file= escaping the directory
    gguf_dir = root / "gguf_dir"
    gguf_dir.mkdir(exist_ok=True)
    _tiny(gguf_dir)
    _tiny(root, "qwen2")
    for name, gguf_file in (("gguf_file_dotdot", "../base-qwen2.gguf"),
                            ("gguf_file_absolute", str(root / "base-qwen2.gguf")),
                            ("gguf_file_etc_passwd", "/etc/passwd")):
        cases.append(Case(name, str(gguf_dir), {"expect_typed": True, "gguf_file": gguf_file}))
    return cases


_WRONG_TYPES: list[tuple[str, Any]] = [("string", "s"), ("list", [1]), ("null", None), ("bool", True), ("object", {})]


def config_key_cases(root: Path) -> list[Case]:
    """Each key of the tiny llama's config.json missing, of another type, and out of range."""
    base = root / "base"
    cases = []
    for key, value in TINY_LLAMA_CONFIG.items():
        variants: list[tuple[str, Any]] = [("missing", None)]
        variants += [(f"as_{kind}", v if kind != "string" else str(value)) for kind, v in _WRONG_TYPES]
        if isinstance(value, bool):
            variants += [("as_int", 1)]
        elif isinstance(value, int):
            variants += [("as_float", value + 0.5), ("zero", 0), ("negative", -value), ("huge", 10**9),
                         ("2e63", 2**63)]
        elif isinstance(value, float):
            variants += [("nan", math.nan), ("inf", math.inf), ("negative", -value), ("zero", 0.0)]
        for kind, new in variants:
            config = {k: v for k, v in TINY_LLAMA_CONFIG.items() if not (kind == "missing" and k == key)}
            if kind != "missing":
                config[key] = new
            name = f"config_{key}_{kind}"
            directory = _link_dir(base, root / name, keep=("config.json",))
            (directory / "config.json").write_text(json.dumps(config))
            cases.append(Case(name, str(directory), {}))
    for number, (arch, extra) in enumerate((
        ("gemma3_text", {"sliding_window_pattern": 0}),
        ("gemma3_text", {"layer_types": ["sliding_attention"]}),
        ("gemma3_text", {"layer_types": "full_attention"}),
        ("gemma3_text", {"query_pre_attn_scalar": -1}),
        ("qwen2", {"max_window_layers": -1, "use_sliding_window": True}),
        ("qwen2", {"use_sliding_window": "yes"}),
        ("qwen3", {"head_dim": 0}),
        ("phi3", {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": "x"}}),
        ("phi3", {"partial_rotary_factor": 2.0}),
        ("gpt2", {"n_embd": 64, "n_head": 5, "n_layer": 2}),
        ("gpt2", {"n_embd": "64", "n_head": 4}),
        ("mistral", {"sliding_window": -4}),
    )):
        name = f"config_{arch}_{number}_{'_'.join(extra)}"
        directory = _link_dir(base, root / name, keep=("config.json",))
        (directory / "config.json").write_text(json.dumps({**TINY_LLAMA_CONFIG, "model_type": arch, **extra}))
        cases.append(Case(name, str(directory), {"expect_typed": True}))
    return cases
