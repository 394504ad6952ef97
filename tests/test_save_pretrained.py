"""save_pretrained round trips: what tokenloom saves, transformers loads (no missing or unexpected
weights) and decodes to the same greedy tokens; tokenloom loads it back too. The tokenizer's
save_pretrained gives transformers a tokenizer that encodes like the original."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.tiny_gguf import write_tiny_gguf_with_tokenizer
from tests.tiny_models import ARCHS, reference_greedy
from tokenloom import AutoModelForCausalLM, AutoTokenizer

transformers = pytest.importorskip("transformers")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [[1, 5, 9, 33, 7], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41]]
NUM_TOKENS = 12


def ours_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_what_tokenloom_saved(arch, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(write_tiny_gguf_with_tokenizer(tmp_path, arch)),
                                                 device_map="cpu", dtype="float32")  # fmt: skip
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == model.config.architectures and config["dtype"] == "float32"

    reference, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(saved), dtype=torch.float32, output_loading_info=True)  # fmt: skip
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    reference.eval()
    for prompt in PROMPTS:
        expected = reference_greedy(reference, prompt, NUM_TOKENS)
        assert ours_greedy(model, prompt, NUM_TOKENS) == expected
        with torch.no_grad():
            theirs = reference(torch.tensor([prompt])).logits
        assert (model(torch.tensor([prompt])).logits - theirs).abs().max() <= 1e-4

    again = AutoModelForCausalLM.from_pretrained(str(saved), device_map="cpu", dtype="float32")
    assert [ours_greedy(again, p, NUM_TOKENS) for p in PROMPTS] == [ours_greedy(model, p, NUM_TOKENS) for p in PROMPTS]
    assert again.config.architectures == model.config.architectures


def test_shards_half_precision_and_tied_weights(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(write_tiny_gguf_with_tokenizer(tmp_path, "gemma3")),
                                                 device_map="cpu", dtype="float32")  # fmt: skip
    assert model.config.tie_word_embeddings
    model.to(torch.bfloat16)
    saved = tmp_path / "sharded"
    model.save_pretrained(saved, max_shard_size="20kB")
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in saved.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert "lm_head.weight" not in index["weight_map"]  # tied to the embedding: written once
    assert json.loads((saved / "config.json").read_text())["dtype"] == "bfloat16"
    reference, info = transformers.AutoModelForCausalLM.from_pretrained(str(saved), output_loading_info=True)
    assert not any(info.values()), info
    assert reference.dtype == torch.bfloat16
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    again = AutoModelForCausalLM.from_pretrained(str(saved), device_map="cpu", dtype="bfloat16")
    assert ours_greedy(again, PROMPTS[0], 6) == ours_greedy(model, PROMPTS[0], 6)
    model.save_pretrained(saved)  # saving again over shards leaves one file, no stale shards
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [({"safe_serialization": False}, NotImplementedError, "safetensors only"),
     ({"push_to_hub": True}, NotImplementedError, "push_to_hub"),
     ({"max_shard_size": "lots"}, ValueError, "max_shard_size"),
     ({"compress": True}, TypeError, "compress")],
)
def test_save_pretrained_refuses_what_it_does_not_do(tmp_path, kwargs, error, match):
    model = AutoModelForCausalLM.from_pretrained(str(write_tiny_gguf_with_tokenizer(tmp_path, "llama")),
                                                 device_map="cpu", dtype="float32")  # fmt: skip
    with pytest.raises(error, match=match):
        model.save_pretrained(tmp_path / "out", **kwargs)


def test_quantized_model_saves_the_weights_it_computes_with(tmp_path):
    """A load_in_8bit model is written dequantized (the values its kernel uses, no quantization_config):
    transformers loads those values."""
    model = AutoModelForCausalLM.from_pretrained(str(write_tiny_gguf_with_tokenizer(tmp_path, "llama")),
                                                 device_map="cpu", dtype="float32", load_in_8bit=True)  # fmt: skip
    model.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    layer = model.model.layers[0]
    saved = dict(reference.named_parameters())
    q_size = layer.self_attn.qkv_proj.output_sizes[0]
    dense = {  # what each kernel multiplies by (checked against the kernel in test_weight_formats)
        "model.layers.0.self_attn.o_proj.weight": layer.self_attn.o_proj.dequantized_weight(),
        "model.layers.0.self_attn.q_proj.weight": layer.self_attn.qkv_proj.dequantized_weight()[:q_size],
        "model.layers.0.mlp.down_proj.weight": layer.mlp.down_proj.dequantized_weight(),
    }
    for name, weight in dense.items():
        assert torch.equal(saved[name].detach(), weight), name
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        expected = reference(ids).logits
    got = model(ids).logits  # the kernels round activations to bfloat16: close, not the same bits
    assert (got - expected).abs().mean() <= 0.05 * expected.abs().mean()  # a wrong weight: ~100%


def test_tokenizer_save_pretrained_round_trip(tmp_path):
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    path = write_tiny_gguf_with_tokenizer(tmp_path, "llama", chat_template=template)
    ours = AutoTokenizer.from_pretrained(str(path), padding_side="left")
    files = ours.save_pretrained(tmp_path / "tok")
    assert sorted(os.path.basename(f) for f in files) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    back = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    texts = ["abc def", "%&'()*", "#$ x y"]
    for text in texts:
        assert theirs(text).input_ids == ours(text).input_ids == back(text).input_ids
    assert theirs.padding_side == back.padding_side == "left"
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == (ours.bos_token, ours.eos_token, ours.pad_token)
    messages = [{"role": "user", "content": "hi"}]
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "<user>hi<assistant>"
    assert back.chat_template == template


def test_smollm2_round_trip_through_transformers(smollm2_gguf, hf_smollm2, tmp_path):
    """The issue's case: transformers loads what tokenloom saved from the GGUF and decodes the same."""
    hf_on_gguf, hf_tokenizer = hf_smollm2
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf), device_map="cpu", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_gguf))
    saved = tmp_path / "smollm2"
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    reference, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(saved), dtype=torch.float32, output_loading_info=True)  # fmt: skip
    assert not any(info.values()), info
    saved_tokenizer = transformers.AutoTokenizer.from_pretrained(str(saved))
    texts = ["A list of colors: red, blue", "def fibonacci(n):", "Portugal is"]
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert saved_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        hf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    for text in texts:
        ids = hf_tokenizer(text).input_ids
        assert saved_tokenizer(text).input_ids == ids
        expected = reference_greedy(hf_on_gguf.eval(), ids, NUM_TOKENS)
        assert reference_greedy(reference.eval(), ids, NUM_TOKENS) == expected
        assert ours_greedy(model, ids, NUM_TOKENS) == expected
    assert reference.generation_config.eos_token_id == model.generation_config.eos_token_id
