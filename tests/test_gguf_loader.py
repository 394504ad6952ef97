"""GGUF model source: header parsing, config mapping, tensor names/layout and dequantization.

transformers (reading the same files) is the oracle for config and tensors; `gguf` (llama.cpp's own
Python package) is the oracle for the header and for every dequantizer.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tests.tiny_models import ARCHS, HIDDEN, LAYERS, VOCAB, write_gguf, write_tiny_gguf
from tokenloom.errors import GGUFFormatError, ModelLoadError, ModelNotFoundError, UnsupportedModelError
from tokenloom.loading.gguf_loader import hf_tensor_name, load_gguf_checkpoint
from tokenloom.loading.gguf_quants import TORCH_DEQUANTIZERS, dequantize
from tokenloom.loading.gguf_reader import read_gguf

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# ---------------------------------------------------------------- synthetic files


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_gguf")
    return {arch: write_tiny_gguf(root, arch) for arch in ARCHS}


# ---------------------------------------------------------------- header


def test_reader_matches_gguf_reader(smollm2_gguf: Path) -> None:
    ours = read_gguf(smollm2_gguf)
    reference = gguf.GGUFReader(smollm2_gguf)
    expected = {
        key: field.contents() for key, field in reference.fields.items() if not key.startswith("GGUF.")
    }
    assert ours.metadata == expected
    assert ours.version == 3
    assert [(t.name, t.ggml_type, t.offset, t.nbytes) for t in ours.tensors] == [
        (t.name, int(t.tensor_type), int(t.data_offset), int(t.n_bytes)) for t in reference.tensors
    ]
    assert [t.shape for t in ours.tensors] == [
        tuple(int(d) for d in reversed(t.shape)) for t in reference.tensors
    ]


# ---------------------------------------------------------------- SmolLM2 against transformers


@pytest.fixture(scope="module")
def smollm2_checkpoint(smollm2_gguf: Path):
    return load_gguf_checkpoint(smollm2_gguf)


def test_smollm2_config_equals_transformers_gguf_config(smollm2_gguf: Path, smollm2_checkpoint) -> None:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint as hf_load_gguf

    reference = hf_load_gguf(str(smollm2_gguf), return_tensors=False)["config"]
    assert {key: smollm2_checkpoint.config.get(key) for key in reference} == reference


def test_smollm2_config_equals_transformers_model_config(hf_smollm2, smollm2_checkpoint) -> None:
    model, _ = hf_smollm2
    config = smollm2_checkpoint.config
    keys = [
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    ]  # fmt: skip
    assert {key: config[key] for key in keys} == {key: getattr(model.config, key) for key in keys}
    assert config["rope_theta"] == model.config.rope_parameters["rope_theta"] == 100000.0
    assert config["rope_parameters"] == model.config.rope_parameters
    assert config["torch_dtype"] == "float32"
    assert config["tie_word_embeddings"] is True  # the file has no output.weight
    generation = model.generation_config
    assert smollm2_checkpoint.generation_config == {
        "bos_token_id": generation.bos_token_id,
        "eos_token_id": generation.eos_token_id,
        "pad_token_id": generation.pad_token_id,
    }


def test_smollm2_tensors_equal_transformers_state_dict(hf_smollm2, smollm2_checkpoint) -> None:
    """Names, Q/K un-permutation and dequantization, all at once: every tensor bit-identical."""
    model, _ = hf_smollm2
    state = model.state_dict()
    seen = set()
    for name, tensor in smollm2_checkpoint.iter_tensors():
        assert name in state, name
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, state[name]), name
        seen.add(name)
    assert len(seen) == smollm2_checkpoint.num_tensors == 272
    assert set(state) - seen == {"lm_head.weight"}  # tied to the embedding


def test_iter_tensors_is_repeatable_and_can_stop_early(smollm2_checkpoint) -> None:
    first = next(iter(smollm2_checkpoint.iter_tensors()))
    iterator = smollm2_checkpoint.iter_tensors()
    for index, _ in enumerate(iterator):
        if index == 5:
            break
    iterator.close()  # cancels the queued work and joins the pool
    again = next(iter(smollm2_checkpoint.iter_tensors()))
    assert first[0] == again[0] == "model.embed_tokens.weight"
    assert torch.equal(first[1], again[1])


def test_single_worker_gives_the_same_tensors(smollm2_gguf: Path, smollm2_checkpoint) -> None:
    serial = load_gguf_checkpoint(smollm2_gguf, num_workers=1).iter_tensors()
    for (name_a, a), (name_b, b) in zip(serial, smollm2_checkpoint.iter_tensors(), strict=True):
        assert name_a == name_b and torch.equal(a, b)
        if name_a.startswith("model.layers.2."):
            break


# ---------------------------------------------------------------- other architectures against transformers


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_matches_transformers(arch: str, tiny_models: dict[str, Path]) -> None:
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint as hf_load_gguf

    path = tiny_models[arch]
    checkpoint = load_gguf_checkpoint(path)
    reference = hf_load_gguf(str(path), return_tensors=False)["config"]
    assert {key: checkpoint.config.get(key) for key in reference} == reference

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype="float32"
    )
    state = model.state_dict()
    ours = dict(checkpoint.iter_tensors())
    assert len(ours) == checkpoint.num_tensors
    tied = {"lm_head.weight"} if checkpoint.config["tie_word_embeddings"] else set()
    assert set(ours) == set(state) - tied
    for name, tensor in ours.items():
        assert tensor.shape == state[name].shape, name
        assert torch.equal(tensor, state[name]), name


def test_gemma3_norms_are_stored_plus_one(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["gemma3"]
    raw = {info.name: info for info in read_gguf(path).tensors}
    tensors = dict(load_gguf_checkpoint(path).iter_tensors())
    stored = dequantize(read_gguf(path).raw(raw["blk.0.post_ffw_norm.weight"]), Q.F32, (HIDDEN,))
    assert torch.equal(tensors["model.layers.0.post_feedforward_layernorm.weight"], stored - 1)


def test_extra_config_keys_for_our_models(tiny_models: dict[str, Path]) -> None:
    gemma = load_gguf_checkpoint(tiny_models["gemma3"]).config
    assert gemma["model_type"] == "gemma3_text" and gemma["head_dim"] == 32 and gemma["sliding_window"] == 16
    assert gemma["layer_types"] == ["sliding_attention", "sliding_attention"]
    assert gemma["rope_parameters"]["full_attention"]["rope_theta"] == 10000.0
    assert load_gguf_checkpoint(tiny_models["qwen3"]).config["head_dim"] == 128
    gpt2 = load_gguf_checkpoint(tiny_models["gpt2"]).config
    assert (gpt2["n_embd"], gpt2["n_layer"], gpt2["n_positions"], gpt2["vocab_size"]) == (
        HIDDEN,
        LAYERS,
        1024,
        VOCAB,
    )


def test_tensor_names() -> None:
    assert hf_tensor_name("blk.3.attn_q.weight", "llama") == "model.layers.3.self_attn.q_proj.weight"
    assert (
        hf_tensor_name("blk.0.ffn_norm.weight", "llama") == "model.layers.0.post_attention_layernorm.weight"
    )
    assert (
        hf_tensor_name("blk.0.ffn_norm.weight", "gemma3") == "model.layers.0.pre_feedforward_layernorm.weight"
    )
    assert hf_tensor_name("output.weight", "llama") == "lm_head.weight"
    assert hf_tensor_name("blk.1.attn_qkv.bias", "gpt2") == "transformer.h.1.attn.c_attn.bias"
    assert hf_tensor_name("rope_freqs.weight", "llama") is None


# ---------------------------------------------------------------- dequantization against gguf.quants


def _reference(raw: np.ndarray, qtype: Q) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32))


def _check_real_blocks(file, qtype: Q, count: int) -> None:
    infos = [info for info in file.tensors if info.ggml_type == qtype]
    assert infos
    for info in infos[:count]:
        rows = min(info.shape[0], 512)  # a slice of whole rows keeps this fast
        raw = file.raw(info)[: rows * (info.nbytes // info.shape[0])]
        shape = (rows, *info.shape[1:])
        assert torch.equal(dequantize(raw, qtype, shape), _reference(raw, qtype).reshape(shape)), info.name


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_1])
def test_dequantize_real_smollm2_blocks(qtype: Q, smollm2_gguf: Path) -> None:
    _check_real_blocks(read_gguf(smollm2_gguf), qtype, count=3)


@pytest.fixture(scope="module")
def gemma_file():
    try:
        from tokenloom.loading.pull import pull

        path = pull("gemma3-270m", progress=False)
    except Exception as exc:  # noqa: BLE001 - any pull failure means the file is not available here
        pytest.skip(f"gemma3-270m GGUF not available: {exc}")
    return read_gguf(path)


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q4_K, Q.Q6_K, Q.Q8_0])
def test_dequantize_real_gemma_blocks(qtype: Q, gemma_file) -> None:
    _check_real_blocks(gemma_file, qtype, count=2)


F16_FIELDS = {  # byte offsets of the float16 scales in each block
    Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q2_K: [80, 82],
    Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
}  # fmt: skip


@pytest.mark.parametrize("qtype", sorted(TORCH_DEQUANTIZERS, key=int), ids=lambda q: Q(q).name)
def test_dequantize_random_blocks(qtype: int) -> None:
    """Random bytes exercise every bit of every field; scales are made finite so results compare exactly."""
    qtype = Q(qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    num_blocks = 20000 if block_size > 1 else 300  # > one internal chunk of blocks
    raw = rng.integers(0, 256, size=(num_blocks, type_size), dtype=np.uint8)
    for offset in F16_FIELDS.get(qtype, []):
        scales = rng.standard_normal(num_blocks).astype(np.float16)
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(num_blocks, 2)
    shape = (num_blocks * block_size,)
    ours = dequantize(raw.reshape(-1), qtype, shape)
    torch.testing.assert_close(
        ours, _reference(raw.reshape(-1), qtype).reshape(shape), rtol=0, atol=0, equal_nan=True
    )


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0])
def test_dequantize_quantized_values(qtype: Q) -> None:
    values = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype).view(np.uint8).reshape(-1)
    ours = dequantize(raw, qtype, values.shape)
    assert torch.equal(ours, _reference(raw, qtype).reshape(values.shape))
    assert torch.allclose(ours, torch.from_numpy(values), atol=0.5)  # and it is the data, roughly


def test_dequantize_falls_back_to_gguf_for_other_types() -> None:
    values = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    raw = gguf.quants.quantize(values, Q.TQ2_0).view(np.uint8).reshape(-1)
    assert Q.TQ2_0 not in TORCH_DEQUANTIZERS
    assert torch.equal(dequantize(raw, Q.TQ2_0, (4, 256)), _reference(raw, Q.TQ2_0).reshape(4, 256))


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not found") as info:
        load_gguf_checkpoint(tmp_path / "absent.gguf")
    assert isinstance(info.value, FileNotFoundError)
    assert "absent.gguf" in str(info.value)


def test_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b'{"not": "gguf"}' + bytes(100))
    with pytest.raises(GGUFFormatError, match=r"not a GGUF file \(bad magic") as info:
        load_gguf_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("size", ["half", 100, 2])
def test_truncated_file(size, smollm2_gguf: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    total = smollm2_gguf.stat().st_size
    length = total // 2 if size == "half" else size
    with smollm2_gguf.open("rb") as source, path.open("wb") as target:
        target.write(source.read(length))
    with pytest.raises(GGUFFormatError, match="truncated") as info:
        load_gguf_checkpoint(path)
    assert str(path) in str(info.value)
    if size == "half":
        assert f"has only {length} bytes" in str(info.value)


def test_directory_is_not_a_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        load_gguf_checkpoint(tmp_path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "bert.gguf", "bert", {"bert.block_count": 1}, {"x.weight": (np.ones(4), Q.F32)}
    )
    with pytest.raises(UnsupportedModelError, match="'bert' is not supported") as info:
        load_gguf_checkpoint(path)
    assert "llama" in (info.value.hint or "")


def test_unknown_tensor_type(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "odd.gguf"
    shutil.copy(tiny_models["llama"], path)
    file = read_gguf(path)
    info = file.tensors[0]
    data = bytearray(path.read_bytes())
    # the tensor table entry ends with <u32 type><u64 offset>; find it by the name and dims that precede it
    name = info.name.encode()
    start = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    type_at = start + 4 + 8 * len(info.shape)
    data[type_at : type_at + 4] = (250).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFFormatError, match="unknown ggml type 250"):
        load_gguf_checkpoint(path)


def test_errors_are_model_load_errors() -> None:
    assert issubclass(GGUFFormatError, ModelLoadError) and issubclass(UnsupportedModelError, ModelLoadError)


def _string_array_gguf(path, items: list[bytes], cut: int = 0):
    """A GGUF file with no tensors and one metadata key: an array of strings (raw bytes each)."""
    import struct

    key = b"tokenizer.ggml.tokens"
    body = b"".join(struct.pack("<Q", len(item)) + item for item in items)
    data = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
            + struct.pack("<IIQ", 9, 8, len(items)) + body)  # fmt: skip
    path.write_bytes(data[: len(data) - cut] if cut else data)
    return path


def test_string_arrays_parse_and_fail_naming_the_element(tmp_path):
    from tokenloom.errors import GGUFFormatError
    from tokenloom.loading.gguf_reader import read_gguf

    items = ["a", "\u00e9t\u00e9", "", "\u4e2d"]
    parsed = read_gguf(_string_array_gguf(tmp_path / "ok.gguf", [s.encode() for s in items]))
    assert parsed.metadata["tokenizer.ggml.tokens"] == items
    with pytest.raises(GGUFFormatError, match=r"truncated GGUF file: reading element 3 of metadata array"):
        read_gguf(_string_array_gguf(tmp_path / "cut.gguf", [s.encode() for s in items], cut=2))
    with pytest.raises(GGUFFormatError, match=r"element 1 of metadata array 'tokenizer.ggml.tokens' at byte \d+ is not "
                                              r"valid UTF-8"):
        read_gguf(_string_array_gguf(tmp_path / "latin1.gguf", [b"a", "\u00e9t\u00e9".encode("latin-1")]))
