"""Full multimodal Gemma 3 checkpoints (`model_type "gemma3"`, Gemma3ForConditionalGeneration): the
text backbone is loaded as gemma3_text, the vision tower is never read. transformers' conditional
generation model on text-only input is the oracle; Google's original configs (which leave most text
keys to Gemma3TextConfig's defaults) are compared with transformers' config classes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.tiny_models import engine_greedy, reference_greedy, reference_logits
from tokenloom.config import EngineConfig
from tokenloom.engine.engine import Engine
from tokenloom.loading import load_model
from tokenloom.loading.hf_loader import load_hf_checkpoint
from tokenloom.models.gemma3 import Gemma3TextConfig

transformers = pytest.importorskip("transformers")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPTS = [
    [2, 5, 9, 33, 7],
    [2],
    [2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
    [40, 41],
]
NUM_TOKENS = 24
TOLERANCE = 1e-4
VISION_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)

TEXT_CONFIG = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=256,
    sliding_window=6, layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    rope_scaling={"rope_type": "linear", "factor": 8.0}, final_logit_softcapping=30.0,
    bos_token_id=2, eos_token_id=1, pad_token_id=0,
)  # fmt: skip
VISION_CONFIG = dict(
    model_type="siglip_vision_model", hidden_size=32, intermediate_size=37, num_hidden_layers=1,
    num_attention_heads=2, image_size=28, patch_size=14,
)  # fmt: skip


def _save_reference(path, seed: int = 0):
    """A random Gemma3ForConditionalGeneration (tiny text and vision configs) written by save_pretrained."""
    torch.manual_seed(seed)
    config = transformers.Gemma3Config(
        text_config=dict(TEXT_CONFIG), vision_config=dict(VISION_CONFIG), mm_tokens_per_image=4,
        boi_token_index=125, eoi_token_index=126, image_token_index=127,
    )  # fmt: skip
    reference = transformers.Gemma3ForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():  # norms start at zero: noise makes every parameter count
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    reference.save_pretrained(path)
    return reference


def _engine(path) -> Engine:
    return Engine(load_model(path, device_map="cpu", dtype="float32").model, EngineConfig(block_size=4))


def _assert_matches(reference, engine: Engine) -> None:
    for prompt, logits in zip(PROMPTS, engine.prompt_logits(PROMPTS), strict=True):
        assert (logits - reference_logits(reference, prompt)).abs().max().item() <= TOLERANCE
    expected = [reference_greedy(reference, prompt, NUM_TOKENS) for prompt in PROMPTS]
    assert engine_greedy(engine, PROMPTS, NUM_TOKENS) == expected


@pytest.fixture(scope="module")
def saved(tmp_path_factory, one_torch_thread):
    path = tmp_path_factory.mktemp("gemma3_mm")
    return path, _save_reference(path)


def test_text_logits_and_greedy_tokens_match_transformers(saved) -> None:
    path, reference = saved
    assert json.loads((path / "config.json").read_text())["model_type"] == "gemma3"
    _assert_matches(reference, _engine(path))


def test_vision_tensors_are_never_read(saved) -> None:
    from safetensors import safe_open

    path, _ = saved
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        stored = list(f.keys())
    text = [name for name in stored if not name.startswith(VISION_PREFIXES)]
    assert len(text) < len(stored)
    checkpoint = load_hf_checkpoint(path)
    names = [name for name, _ in checkpoint.iter_tensors()]
    assert checkpoint.num_tensors == len(names) == len(text)
    assert not any(name.startswith(VISION_PREFIXES) for name in names)
    assert all(name.startswith(("model.layers.", "model.embed_tokens.", "model.norm.")) for name in names)


def test_original_layout_sharded(tmp_path, one_torch_thread) -> None:
    """The layout of Google's releases (transformers 4.x names: `language_model.model.*`,
    `language_model.lm_head.weight`, `vision_tower.*`), split into shards with an index."""
    from safetensors.torch import load_file, save_file

    reference = _save_reference(tmp_path, seed=1)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    renamed = {}
    for name, tensor in state.items():
        name = name.replace("model.language_model.", "language_model.model.", 1)
        name = name.removeprefix("model.")  # vision_tower.*, multi_modal_projector.*
        renamed[name] = tensor
    renamed["language_model.lm_head.weight"] = renamed["language_model.model.embed_tokens.weight"].clone()
    names = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file(
            {n: renamed[n].contiguous() for n in shard_names}, tmp_path / shard, metadata={"format": "pt"}
        )
        weight_map |= dict.fromkeys(shard_names, shard)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    checkpoint = load_hf_checkpoint(tmp_path)
    assert checkpoint.num_tensors == sum(not n.startswith(VISION_PREFIXES) for n in names)
    assert "lm_head.weight" in dict(checkpoint.iter_tensors())
    _assert_matches(reference, _engine(tmp_path))


# gemma-3-4b-it's config.json as Google published it (transformers 4.50): the text config states only
# what differs from Gemma3TextConfig's defaults.
GEMMA3_4B_CONFIG = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0",
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "vision_use_head": False,
    },
}


@pytest.mark.parametrize("tie", [None, False])
def test_google_config_gets_transformers_defaults(tie) -> None:
    raw = json.loads(json.dumps(GEMMA3_4B_CONFIG))
    if tie is not None:
        raw["tie_word_embeddings"] = tie
    ours = Gemma3TextConfig.from_dict(raw)
    reference = transformers.Gemma3Config(**raw)
    text = reference.text_config
    for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "attention_bias",
        "query_pre_attn_scalar", "sliding_window", "layer_types", "final_logit_softcapping",
        "attn_logit_softcapping", "hidden_activation", "rope_parameters",
    ):  # fmt: skip
        assert getattr(ours, key) == getattr(text, key), key
    assert ours.vocab_size == 262_208 and ours.head_dim == 256 and ours.num_key_value_heads == 4
    assert ours.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    # the conditional-generation model ties its lm_head by the top-level flag
    assert ours.tie_word_embeddings == reference.tie_word_embeddings == (tie is not False)
    assert ours.torch_dtype == "bfloat16"
