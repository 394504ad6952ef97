"""Random variants of GGUF files for the fuzz corpus, deterministic in their seeds: single-field metadata
mutations (type, value, length), truncations and byte flips in the header and tensor table, of the real
SmolLM2 GGUF and of the tiny models of every architecture. A variant is a recipe the worker builds."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from tests import tiny_models
from tests.fuzz_corpus import _tiny
from tests.hostile_files import (
    ARRAY,
    BOOL,
    CARRIED_TEMPLATES,
    F32,
    F64,
    FLOAT_TYPES,
    HOSTILE_TEMPLATES,
    I32,
    I64,
    INT_TYPES,
    KV,
    STRING,
    U8,
    U16,
    U32,
    U64,
    Case,
    RawGGUF,
    parse_raw,
)

_INT_RANGES = {U8: (0, 255), 1: (-128, 127), U16: (0, 65535), 3: (-32768, 32767), U32: (0, 2**32 - 1),
               I32: (-(2**31), 2**31 - 1), U64: (0, 2**64 - 1), I64: (-(2**63), 2**63 - 1)}
_ALL_TYPES = [*INT_TYPES, F32, F64, BOOL, STRING, ARRAY]


def _random_int(value_type: int, rng: random.Random) -> int:
    low, high = _INT_RANGES[value_type]
    return rng.choice([low, high, 0, 1, min(high, 2**31 - 1), min(high, 10**9), rng.randint(low, high),
                       max(low, -1), rng.randint(0, min(high, 4096))])


def _random_value(value_type: int, old: Any, rng: random.Random, key: str) -> Any:
    if value_type in INT_TYPES:
        return _random_int(value_type, rng)
    if value_type in FLOAT_TYPES:
        value = rng.choice([math.nan, math.inf, -math.inf, 0.0, -1.0, 1e30, 1e-30, rng.uniform(-1e6, 1e6)])
        return value if value_type == F64 or not math.isfinite(value) or abs(value) < 3e38 else 1e30
    if value_type == BOOL:
        return rng.choice([True, False, 2, 255])
    if value_type == STRING:
        choices = ["", "x" * rng.choice([1, 1000, 1_000_000]), "\u2581\x00\ud7ff\U0010ffff", "llama", "gpt2",
                   str(old)[: rng.randint(0, 20)] + chr(rng.randint(32, 0x2FFF))]
        if "template" in key:
            choices.append(HOSTILE_TEMPLATES[rng.choice(CARRIED_TEMPLATES)])
        return rng.choice(choices)
    element_type, items = old if isinstance(old, tuple) else (U32, [])
    if not items:
        return element_type, [_random_value(element_type, None, rng, key)] if element_type != ARRAY else []
    items = list(items)
    index = rng.randrange(len(items))
    items[index] = _random_value(element_type, items[index], rng, key)
    return element_type, items


def _convert(value: Any, old_type: int, new_type: int, rng: random.Random, key: str) -> Any:
    if new_type == ARRAY:
        if old_type == ARRAY:
            return value
        return (old_type, [value]) if old_type != ARRAY else value
    if old_type == ARRAY:
        element_type, items = value
        if items and element_type == new_type:
            return items[0]
        return _random_value(new_type, None, rng, key)
    if new_type == STRING:
        return str(value)[:1000]
    if new_type in INT_TYPES and isinstance(value, (int, float)) and math.isfinite(value):
        low, high = _INT_RANGES[new_type]
        return int(value) if low <= int(value) <= high else _random_int(new_type, rng)
    if new_type in FLOAT_TYPES and isinstance(value, (int, float)):
        return float(value) if abs(value) < 3e38 else 1e30
    if new_type == BOOL:
        return bool(value) if isinstance(value, (int, float)) else True
    return _random_value(new_type, None, rng, key)


def random_mutation(raw: RawGGUF, seed: int) -> tuple[str, list[KV]]:
    """One metadata entry changed in type, value or length (deterministic in `seed`)."""
    rng = random.Random(seed)
    kvs = [replace(kv) for kv in raw.kvs]
    kv = rng.choice(kvs)
    kind = rng.choice(["type", "value", "length"])
    if kind == "type":
        new_type = rng.choice([t for t in _ALL_TYPES if t != kv.type])
        kv.value, kv.type = _convert(kv.value, kv.type, new_type, rng, kv.key), new_type
        return f"{kv.key}: type -> {new_type} value {str(kv.value)[:60]!r}", kvs
    if kind == "length" and kv.type in (STRING, ARRAY):
        if kv.type == STRING:
            text = kv.value
            kv.value = rng.choice(["", text[: rng.randint(0, len(text))], text * rng.choice([2, 100]),
                                   text + "x" * rng.choice([1, 10_000])])[:2_000_000]
            return f"{kv.key}: string length -> {len(kv.value)}", kvs
        element_type, items = kv.value
        new_len = rng.choice([0, 1, len(items) // 2, max(len(items) - 1, 0), len(items) + 1, len(items) * 2])
        extended = (items * (new_len // max(len(items), 1) + 1))[:new_len] if items else []
        kv.value = (element_type, extended)
        return f"{kv.key}: array length {len(items)} -> {new_len}", kvs
    kv.value = _random_value(kv.type, kv.value, rng, kv.key)
    return f"{kv.key}: value -> {str(kv.value)[:60]!r}", kvs


def mutation_case(raw: RawGGUF, seed: int, label: str) -> Case:
    return Case(f"{label}_mutation_{seed}", "", {"op": "mutate", "src": str(raw.path), "seed": seed})


def truncation_cases(raw: RawGGUF, count: int, seed: int, label: str) -> list[Case]:
    rng = random.Random(seed)
    lengths = sorted({rng.randrange(0, raw.header_end) for _ in range(count - count // 2)}
                     | {rng.randrange(raw.data_start, raw.size) for _ in range(count // 2)})
    return [Case(f"{label}_truncated_at_{n}", "", {"op": "truncate", "src": str(raw.path), "length": n,
                                                    "expect_typed": True}) for n in lengths]


def flip_cases(raw: RawGGUF, count: int, seed: int, label: str) -> list[Case]:
    """Byte flips in the header: half in the tensor table, a quarter in the first 4 KiB (counts, general
    metadata), a quarter anywhere before the data."""
    rng = random.Random(seed)
    table_start = raw.header_end - sum(8 + len(t.name) + 4 + 8 * len(t.dims) + 12 for t in raw.tensors)
    cases = []
    for i in range(count):
        region = i % 4
        if region < 2:
            position = rng.randrange(table_start, raw.header_end)
        elif region == 2:
            position = rng.randrange(4, min(4096, raw.header_end))
        else:
            position = rng.randrange(4, raw.header_end)
        xor = rng.randrange(1, 256)
        cases.append(Case(f"{label}_flip_{position}_{xor}", "", {"op": "flip", "src": str(raw.path),
                                                                 "flips": [[position, xor]]}))
    return cases


# A case on the real model loads 135M parameters (twice: the tokenizer stage and the model stage build
# the tokenizer each): it gets a longer wall-clock limit than the tiny ones' 20 s.
REAL_MODEL_TIMEOUT = 60.0


def random_gguf_cases(root: Path, smollm2: Path | None, *, full: bool) -> list[Case]:
    """Random variants: of SmolLM2 (50 truncations, 200 mutations, 50 flips with --fuzz-all; a fixed sample
    otherwise) and of the tiny models of every architecture."""
    cases: list[Case] = []
    if smollm2 is not None:
        raw = parse_raw(smollm2)
        truncations, mutations, flips = (50, 200, 50) if full else (6, 12, 6)
        sample = random.Random(10)
        all_truncations = truncation_cases(raw, 50, 1, "smollm2")
        all_flips = flip_cases(raw, 50, 2, "smollm2")
        all_mutations = [mutation_case(raw, seed, "smollm2") for seed in range(200)]
        cases += sample.sample(all_truncations, min(truncations, len(all_truncations)))
        cases += sample.sample(all_mutations, mutations)
        cases += sample.sample(all_flips, flips)
        for case in cases:
            case.recipe["timeout"] = REAL_MODEL_TIMEOUT
    per_arch = 100 if full else 16
    for arch in tiny_models.ARCHS:
        raw = _tiny(root, arch)
        cases += [mutation_case(raw, seed, f"tiny_{arch}") for seed in range(per_arch)]
        cases += truncation_cases(raw, 4 if not full else 20, 3, f"tiny_{arch}")
        cases += flip_cases(raw, 4 if not full else 20, 4, f"tiny_{arch}")
    return cases
