"""Builders of malformed model files for the hostile-input and fuzz tests.

A GGUF header is parsed here into typed key/value entries and tensor-table entries (independently of
tokenloom's reader, so a bug there cannot hide one here), changed, and written back with the original
tensor data appended. Tiny Hugging Face directories (config.json, safetensors, tokenizer files) are
written from scratch with torch, safetensors and tokenizers.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# GGUF metadata value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR_FORMATS = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q",
                  I64: "q", F64: "d"}
INT_TYPES = (U8, I8, U16, I16, U32, I32, U64, I64)
FLOAT_TYPES = (F32, F64)


@dataclass
class KV:
    """One metadata entry. For arrays `value` is (element_type, [items]); nested arrays nest the pair."""

    key: str
    type: int
    value: Any


@dataclass
class TensorEntry:
    name: str
    dims: list[int]  # ggml order (innermost first), as stored
    ggml_type: int
    offset: int  # relative to the data section


@dataclass
class RawGGUF:
    path: Path
    version: int
    kvs: list[KV]
    tensors: list[TensorEntry]
    data_start: int  # absolute offset of the data section in `path`
    header_end: int  # end of the tensor table in `path`
    alignment: int = 32
    size: int = 0

    def get(self, key: str) -> KV | None:
        return next((kv for kv in self.kvs if kv.key == key), None)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> Any:
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        length = self.take("Q")
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        return raw.decode("utf-8")

    def value(self, value_type: int) -> Any:
        if value_type in SCALAR_FORMATS:
            return self.take(SCALAR_FORMATS[value_type])
        if value_type == STRING:
            return self.string()
        if value_type == ARRAY:
            element_type, count = self.take("I"), self.take("Q")
            return element_type, [self.value(element_type) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {value_type}")


def parse_raw(path: Path) -> RawGGUF:
    """A well-formed GGUF file's header as typed entries."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(min(size, 64 << 20))
    r = _Reader(head)
    assert r.data[:4] == b"GGUF"
    r.pos = 4
    version, tensor_count, kv_count = r.take("I"), r.take("Q"), r.take("Q")
    kvs = []
    for _ in range(kv_count):
        key = r.string()
        value_type = r.take("I")
        kvs.append(KV(key, value_type, r.value(value_type)))
    tensors = []
    for _ in range(tensor_count):
        name = r.string()
        n_dims = r.take("I")
        dims = [r.take("Q") for _ in range(n_dims)]
        tensors.append(TensorEntry(name, dims, r.take("I"), r.take("Q")))
    alignment_kv = next((kv for kv in kvs if kv.key == "general.alignment"), None)
    alignment = int(alignment_kv.value) if alignment_kv is not None else 32
    data_start = -(-r.pos // alignment) * alignment
    return RawGGUF(path, version, kvs, tensors, data_start, r.pos, alignment, size)


# ---------------------------------------------------------------- encoding


def encode_string(value: str | bytes) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return struct.pack("<Q", len(raw)) + raw


def encode_value(value_type: int, value: Any) -> bytes:
    if value_type in SCALAR_FORMATS:
        fmt = SCALAR_FORMATS[value_type]
        if value_type == BOOL and isinstance(value, int) and not isinstance(value, bool):
            return struct.pack("<B", value & 0xFF)  # a bool byte other than 0/1
        return struct.pack("<" + fmt, value)
    if value_type == STRING:
        return encode_string(value)
    if value_type == ARRAY:
        element_type, items = value
        body = b"".join(encode_value(element_type, item) for item in items)
        return struct.pack("<IQ", element_type, len(items)) + body
    raise ValueError(f"unknown GGUF value type {value_type}")


def encode_kv(kv: KV) -> bytes:
    return encode_string(kv.key) + struct.pack("<I", kv.type) + encode_value(kv.type, kv.value)


def encode_tensor(entry: TensorEntry) -> bytes:
    return (
        encode_string(entry.name)
        + struct.pack("<I", len(entry.dims))
        + b"".join(struct.pack("<Q", d) for d in entry.dims)
        + struct.pack("<IQ", entry.ggml_type, entry.offset)
    )


def encode_header(
    version: int, kvs: list[KV], tensors: list[TensorEntry], *, kv_count: int | None = None,
    tensor_count: int | None = None, raw_kvs: bytes | None = None,
) -> bytes:
    counts = struct.pack(
        "<IQQ", version, len(tensors) if tensor_count is None else tensor_count,
        len(kvs) if kv_count is None else kv_count,
    )
    body = raw_kvs if raw_kvs is not None else b"".join(encode_kv(kv) for kv in kvs)
    return b"GGUF" + counts + body + b"".join(encode_tensor(t) for t in tensors)


def copy_range(src: Path, dst_handle: Any, start: int, length: int) -> None:
    """Append `length` bytes of `src` from `start` to an open file, in the kernel where possible."""
    with open(src, "rb") as s:
        done = 0
        while done < length:
            try:
                n = os.copy_file_range(s.fileno(), dst_handle.fileno(), length - done, start + done)
            except (AttributeError, OSError):
                s.seek(start + done)
                chunk = s.read(min(length - done, 16 << 20))
                dst_handle.write(chunk)
                n = len(chunk)
            if n <= 0:
                break
            done += n


def write_with_header(raw: RawGGUF, out: Path, header: bytes, *, alignment: int | None = None) -> Path:
    """`header` (magic..tensor table), padding to the alignment, then the original tensor data."""
    alignment = alignment or raw.alignment
    with open(out, "wb") as f:
        f.write(header)
        f.write(b"\0" * (-len(header) % alignment))
        f.flush()
        copy_range(raw.path, f, raw.data_start, raw.size - raw.data_start)
    return out


def rewrite(
    raw: RawGGUF, out: Path, *, set_kvs: dict[str, tuple[int, Any]] | None = None, drop: tuple[str, ...] = (),
    tensors: list[TensorEntry] | None = None, **header_options: Any,
) -> Path:
    """A copy of the file with metadata entries set (type, value) or dropped and/or a new tensor table."""
    kvs = [replace(kv) for kv in raw.kvs if kv.key not in drop]
    for key, (value_type, value) in (set_kvs or {}).items():
        existing = next((kv for kv in kvs if kv.key == key), None)
        if existing is None:
            kvs.append(KV(key, value_type, value))
        else:
            existing.type, existing.value = value_type, value
    header = encode_header(raw.version, kvs, raw.tensors if tensors is None else tensors, **header_options)
    return write_with_header(raw, out, header)


def truncated(src: Path, out: Path, length: int) -> Path:
    with open(out, "wb") as f:
        copy_range(src, f, 0, length)
    return out


def flipped(src: Path, out: Path, flips: list[tuple[int, int]]) -> Path:
    size = src.stat().st_size
    with open(out, "wb") as f:
        copy_range(src, f, 0, size)
    with open(out, "r+b") as f:
        for position, xor in flips:
            f.seek(position)
            byte = f.read(1)[0]
            f.seek(position)
            f.write(bytes([byte ^ xor]))
    return out


def nested_array(depth: int) -> tuple[int, Any]:
    """An array nested `depth` deep holding one u8 at the bottom, built without recursion."""
    value: tuple[int, Any] = (U8, [1])
    for _ in range(depth - 1):
        value = (ARRAY, [value])
    return value


def encode_nested_array_kv(key: str, depth: int) -> bytes:
    """The bytes of a metadata entry whose array nests `depth` deep (encode_value would recurse)."""
    header = struct.pack("<IQ", ARRAY, 1)
    return (
        encode_string(key) + struct.pack("<I", ARRAY) + header * (depth - 1) + struct.pack("<IQ", U8, 1) + b"\x01"
    )


# ---------------------------------------------------------------- tiny Hugging Face directories

TINY_LLAMA_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_llama_tensors(config: dict[str, Any] = TINY_LLAMA_CONFIG, seed: int = 0) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv_rows = config["num_key_value_heads"] * head_dim

    def rand(*shape: int):
        return torch.randn(*shape, generator=g) * 0.1

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden),
               "lm_head.weight": rand(vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight": rand(kv_rows, hidden),
            p + "self_attn.v_proj.weight": rand(kv_rows, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
            p + "mlp.gate_proj.weight": rand(ffn, hidden), p + "mlp.up_proj.weight": rand(ffn, hidden),
            p + "mlp.down_proj.weight": rand(hidden, ffn), p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
        }
    return tensors


CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}" \
    "{% if add_generation_prompt %}<assistant>{% endif %}"


def tiny_tokenizer_json(vocab_size: int = 96) -> str:
    """A word-level tokenizer.json: '<unk>', '<s>', '</s>', then words w3 ... w{vocab_size-1}."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    words = ["<unk>", "<s>", "</s>", *[f"w{i}" for i in range(3, vocab_size)]]
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer.to_str()


def write_tiny_hf_dir(
    directory: Path, *, config: dict[str, Any] | None = None, tensors: dict[str, Any] | None = None,
    tokenizer_config: dict[str, Any] | None = None,
) -> Path:
    """config.json, model.safetensors, tokenizer.json and tokenizer_config.json of a tiny llama."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config if config is not None else TINY_LLAMA_CONFIG))
    save_file(tensors if tensors is not None else tiny_llama_tensors(), str(directory / "model.safetensors"))
    (directory / "tokenizer.json").write_text(tiny_tokenizer_json())
    base_tokenizer_config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                             "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config if tokenizer_config is not None else base_tokenizer_config)
    )
    return directory


@dataclass
class Case:
    """One hostile input: a file or directory to load, and what it stands for."""

    name: str
    path: str
    recipe: dict[str, Any] = field(default_factory=dict)  # how a worker builds it ({} when `path` exists)


# The hostile chat templates of issue 10 and the classes they stand for.
HOSTILE_TEMPLATES: dict[str, str] = {
    "nested_range_loops": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "string_times_1e9": "{{ 'x' * 10**9 }}",
    "huge_power_to_string": "{{ (10 ** 10000000) | string }}",
    "center_1e9": "{{ 'x' | center(1000000000) }}",
    "ljust_1e9": "{{ 'x'.ljust(1000000000) }}",
    "printf_width": "{{ '%1000000000s' | format('x') }}",
    "str_format_width": "{{ '{:>1000000000}'.format('x') }}",
    "printf_star": "{{ '%*s' % (1000000000, 'x') }}",
    "doubling_concat": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s | length }}",
    "doubling_plus": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                     "{% endfor %}{{ ns.s | length }}",
    "doubling_list": "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}"
                     "{% endfor %}{{ ns.l | length }}",
    "doubling_macro": "{% macro f(s, n) %}{% if n > 0 %}{{ f(s ~ s, n - 1) }}{% else %}{{ s | length }}{% endif %}"
                      "{% endmacro %}{{ f('x', 64) }}",
    "recursive_loop": "{% for x in [1, 2] recursive %}{{ loop([1, 2]) }}{% endfor %}",
    "exponential_recursive_loop": "{% for x in [1, 2] recursive %}{% if loop.depth < 40 %}{{ loop([1, 2]) }}"
                                  "{% endif %}{% endfor %}",
    "filtered_inner_loop": "{% for i in range(100000) %}{% for j in range(100000) if false %}{% endfor %}"
                           "{% endfor %}",
    "listed_range_loops": "{% set r = range(100000) | list %}{% for a in r %}{% for b in r %}{% endfor %}"
                          "{% endfor %}",
    "sum_in_loop": "{% set r = range(100000) | list %}{% for a in r %}{{ r | sum }}{% endfor %}",
    "membership_in_loop": "{% set r = range(100000) | list %}{% for a in r %}{% if -1 in r %}{% endif %}"
                          "{% endfor %}",
    "output_flood": "{% set s = 'x' * 100000 %}{% for i in range(1000) %}{{ s }}{% endfor %}",
    "block_capture_flood": "{% set big %}{% for i in range(1000) %}{{ 'x' * 100000 }}{% endfor %}{% endset %}"
                           "{{ big | length }}",
    "join_amplification": "{{ ('x' * 100000).join(range(100000) | map('string')) }}",
    "replace_amplification": "{{ ('x' * 100000) | replace('', 'y' * 100000) }}",
    "list_of_references_printed": "{% set l = ['x' * 100000] * 10000 %}{{ l }}",
    "list_of_references_tojson": "{% set l = ['x' * 100000] * 10000 %}{{ l | tojson | length }}",
    "list_of_references_joined": "{% set l = ['x' * 100000] * 10000 %}{{ l | join | length }}",
    "tojson_indent": "{{ range(100000) | list | tojson(indent=100000) }}",
    "batch_fill": "{{ [1] | batch(1000000000, 0) | list }}",
    "slice_count": "{{ [1] | slice(1000000000) | list }}",
    "int_to_bytes": "{{ (1).to_bytes(1000000000, 'big') | length }}",
    "indent_amplification": "{{ ('\\n' * 100000) | indent(100000) }}",
    "wordwrap_amplification": "{{ ('x ' * 500000) | wordwrap(1, wrapstring='y' * 100000) }}",
    "expandtabs": "{{ ('\\t' * 100000).expandtabs(100000) }}",
    "squaring_int": "{% set ns = namespace(n=10) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}"
                    "{% endfor %}{{ ns.n > 0 }}",
    "lipsum": "{{ lipsum(n=1000000) }}",
    "deep_parentheses": "{{ " + "(" * 100000 + "1" + ")" * 100000 + " }}",
    "translate_amplification": "{{ ('a' * 100000).translate({97: 'b' * 100000}) }}",
    "sum_of_lists": "{{ ([[1] * 1000] * 1000) | sum(start=[]) | length }}",
    "string_iteration": "{% for c in 'x' * 1000000 %}{% endfor %}",
    "allocation_loop": "{% for i in range(100000) %}{% set x = ('x' * 10000) ~ ('y' * 10000) %}{% endfor %}",
    "retained_copies": "{% set ns = namespace(l=[], s='x' * 900000) %}{% for i in range(100000) %}"
                       "{% set ns.l = ns.l + [ns.s ~ 'x'] %}{% endfor %}",
    "retained_slices": "{% set ns = namespace(l=[], s='x' * 900000) %}{% for i in range(100000) %}"
                       "{% set ns.l = ns.l + [ns.s[::-1]] %}{% endfor %}",
    "precision_padding": "{{ '%.1000000000d' % 1 }}",
    "sandbox_escape_subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "sandbox_escape_globals": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "template_too_long": "x" * 2_000_000,
}
# A few representative ones for the GGUF / tokenizer_config carriers (all are in the template tests).
CARRIED_TEMPLATES = (
    "nested_range_loops", "string_times_1e9", "huge_power_to_string", "doubling_concat", "output_flood",
    "list_of_references_printed", "deep_parentheses", "sandbox_escape_globals",
)
