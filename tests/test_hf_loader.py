"""HF checkpoint directories: config, generation config, single and sharded safetensors, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tokenloom.errors import MissingShardError, ModelLoadError, ModelNotFoundError
from tokenloom.loading.hf_loader import load_hf_checkpoint

CONFIG = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 16}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
        "model.norm.weight": torch.ones(8, dtype=torch.bfloat16),
        "lm_head.weight": torch.randn(16, 8, generator=g),
    }


def _write_single(directory: Path, with_generation_config: bool = True) -> dict[str, torch.Tensor]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(CONFIG))
    if with_generation_config:
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    tensors = _tensors()
    save_file(tensors, str(directory / "model.safetensors"))
    return tensors


def _write_sharded(directory: Path) -> dict[str, torch.Tensor]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(CONFIG))
    tensors = _tensors()
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(directory / shard))
        weight_map.update(dict.fromkeys(shard_names, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors


def _assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name


def test_single_file(tmp_path: Path) -> None:
    expected = _write_single(tmp_path)
    ckpt = load_hf_checkpoint(tmp_path)
    assert ckpt.source.kind == "hf" and ckpt.source.path == tmp_path
    assert ckpt.config == CONFIG
    assert ckpt.generation_config == {"eos_token_id": 2}
    assert ckpt.num_tensors == len(expected)
    _assert_same(dict(ckpt.iter_tensors()), expected)
    _assert_same(dict(ckpt.iter_tensors()), expected)  # can be iterated again


def test_generation_config_optional(tmp_path: Path) -> None:
    _write_single(tmp_path, with_generation_config=False)
    assert load_hf_checkpoint(tmp_path).generation_config == {}


def test_sharded(tmp_path: Path) -> None:
    expected = _write_sharded(tmp_path)
    ckpt = load_hf_checkpoint(tmp_path)
    assert ckpt.num_tensors == len(expected)
    _assert_same(dict(ckpt.iter_tensors()), expected)


def test_iter_tensors_is_lazy(tmp_path: Path) -> None:
    _write_sharded(tmp_path)
    ckpt = load_hf_checkpoint(tmp_path)
    it = ckpt.iter_tensors()
    name, tensor = next(it)
    assert isinstance(name, str) and isinstance(tensor, torch.Tensor)
    it.close()


def test_missing_shard(tmp_path: Path) -> None:
    _write_sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MissingShardError) as info:
        load_hf_checkpoint(tmp_path)
    assert "model-00002-of-00002.safetensors" in str(info.value)
    assert "model.safetensors.index.json" in str(info.value)


def test_index_names_tensor_absent_from_shard(tmp_path: Path) -> None:
    _write_sharded(tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    ckpt = load_hf_checkpoint(tmp_path)
    with pytest.raises(ModelLoadError, match="model.extra.weight"):
        list(ckpt.iter_tensors())


def test_missing_config(tmp_path: Path) -> None:
    _write_single(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelNotFoundError) as info:
        load_hf_checkpoint(tmp_path)
    assert str(tmp_path) in str(info.value) and "config.json" in str(info.value)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope")


def test_bad_config_json(tmp_path: Path) -> None:
    _write_single(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_hf_checkpoint(tmp_path)


def test_only_bin_weights(tmp_path: Path) -> None:
    tmp_path.joinpath("config.json").write_text(json.dumps(CONFIG))
    tmp_path.joinpath("pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelLoadError) as info:
        load_hf_checkpoint(tmp_path)
    assert "pytorch_model.bin" in str(info.value) and "safetensors" in str(info.value)


def test_no_weights(tmp_path: Path) -> None:
    tmp_path.joinpath("config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        load_hf_checkpoint(tmp_path)


def test_transformers_sharded_save(tmp_path: Path) -> None:
    """A realistic sharded directory written by transformers' save_pretrained; names stored as HF names."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ckpt = load_hf_checkpoint(tmp_path)
    assert ckpt.config["model_type"] == "llama" and ckpt.config["hidden_size"] == 32
    assert "bos_token_id" in ckpt.generation_config
    loaded = dict(ckpt.iter_tensors())
    assert ckpt.num_tensors == len(loaded)
    _assert_same(loaded, {k: v.detach() for k, v in model.state_dict().items()})

    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(MissingShardError, match=shards[-1].name):
        load_hf_checkpoint(tmp_path)
