"""The compat model as a torch module, with transformers' habits: parameters under transformers' names,
to() / eval(), num_parameters, config, forward with labels (the loss transformers returns), hidden
states, and everything not implemented refused by name. transformers is the oracle: it loads the same
weights (written by save_pretrained from the tiny GGUF models, or SmolLM2's GGUF for the slow tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.tiny_gguf import write_tiny_gguf_with_tokenizer
from tokenloom import AutoModelForCausalLM

transformers = pytest.importorskip("transformers")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDS = torch.tensor([[1, 5, 9, 33, 7, 11, 40], [4, 8, 15, 16, 23, 42, 3]])
RIGHT_PADDED = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["llama", "qwen3", "phi3", "gemma3", "gpt2"])
def pair(request, tmp_path_factory):
    """(tokenloom's model from a tiny GGUF, transformers' model from what tokenloom saved)."""
    root = tmp_path_factory.mktemp(request.param)
    path = write_tiny_gguf_with_tokenizer(root, request.param)
    ours = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", dtype="float32")
    ours.save_pretrained(root / "saved")
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(root / "saved"), dtype=torch.float32).eval()
    return ours, reference


# ---------------------------------------------------------------- the module surface


def test_is_a_torch_module_with_transformers_names(pair):
    ours, reference = pair
    assert isinstance(ours, torch.nn.Module)
    assert sorted(dict(ours.named_parameters())) == sorted(dict(reference.named_parameters()))
    assert sorted(ours.state_dict()) == sorted(reference.state_dict())
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    assert ours.num_parameters() == reference.num_parameters()
    assert ours.num_parameters(exclude_embeddings=True) == reference.num_parameters(exclude_embeddings=True)
    assert ours.num_parameters(only_trainable=True) == 0  # inference only: nothing requires grad
    assert torch.equal(ours.get_input_embeddings().weight, reference.get_input_embeddings().weight)
    assert ours.get_output_embeddings() is ours.lm_head
    assert sum(1 for _ in ours.parameters()) == sum(1 for _ in reference.parameters())


def test_eval_to_and_train(pair):
    ours, _ = pair
    assert ours.eval() is ours and not ours.training
    assert ours.to("cpu") is ours and ours.device == torch.device("cpu")
    with pytest.raises(NotImplementedError, match=r"model\.train\(\) is not supported"):
        ours.train()
    assert not ours.training
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            ours.to("cuda")


def test_config_carries_what_transformers_has(pair, tmp_path):
    ours, reference = pair
    config = ours.config
    assert config.architectures == [type(reference).__name__]
    assert config.torch_dtype == torch.float32 and config.dtype == torch.float32
    assert config.name_or_path == ours.name_or_path and config.name_or_path.endswith(".gguf")
    as_dict = config.to_dict()
    json.dumps(as_dict)  # plain JSON: dtypes as names
    assert as_dict["dtype"] == "float32" and as_dict["architectures"] == config.architectures
    assert as_dict["model_type"] == reference.config.model_type
    for key in ("vocab_size", "tie_word_embeddings"):
        assert as_dict[key] == reference.config.to_dict()[key]


def test_dtype_moves_rebuild_the_engine(tmp_path):
    path = write_tiny_gguf_with_tokenizer(tmp_path, "llama")
    model = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", dtype="float32")
    fp32 = model(IDS).logits
    assert model.half() is model and model.dtype == torch.float16 and model.config.torch_dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in model.parameters())
    model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.engine.runner.kv_cache.keys[0].dtype == torch.bfloat16
    bf16 = model(IDS).logits
    assert bf16.dtype == torch.bfloat16 and (bf16.float() - fp32).abs().max() < 0.1 * fp32.abs().max()
    out = model.generate(IDS[:1], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 3)


def test_dir_lists_the_public_names_and_imports_stay_lazy():
    code = ("import sys, tokenloom; names = dir(tokenloom); "
            "assert 'torch' not in sys.modules, 'import tokenloom imported torch'; "
            "assert {'AutoModelForCausalLM', 'AutoTokenizer', 'LLM', 'SamplingParams', 'pipeline', "
            "'TextStreamer', 'GenerationConfig', '__version__'} <= set(names), names; "
            "assert 'torch' not in sys.modules, 'dir() imported torch'; "
            "assert tokenloom.SamplingParams.__name__ == 'SamplingParams'; print('ok')")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ---------------------------------------------------------------- forward like transformers


def _reference(reference, *args, **kwargs):
    with torch.no_grad():
        return reference(*args, **kwargs)


def test_labels_loss_and_hidden_states_match_transformers(pair):
    ours, reference = pair
    expected = _reference(reference, IDS, labels=IDS, output_hidden_states=True)
    got = ours(IDS, labels=IDS, output_hidden_states=True)
    assert abs(got.loss.item() - expected.loss.item()) <= TOLERANCE
    assert (got.logits - expected.logits).abs().max() <= TOLERANCE
    assert len(got.hidden_states) == len(expected.hidden_states) == reference.config.num_hidden_layers + 1
    for mine, theirs in zip(got.hidden_states, expected.hidden_states):
        # relative to the layer's scale (the random tiny models reach ~1e3): the CPU runner pads a
        # prompt's attention blocks to 16 rows and keys (chunk invariance), so sums are ordered otherwise
        scale = theirs.abs().max().item()
        assert mine.shape == theirs.shape and (mine - theirs).abs().max() <= TOLERANCE * max(scale, 1.0)


def test_padded_labels_num_items_and_shift_labels(pair):
    ours, reference = pair
    labels = IDS.masked_fill(RIGHT_PADDED == 0, -100)
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(7)}, {"num_items_in_batch": 3}):
        expected = _reference(reference, IDS, attention_mask=RIGHT_PADDED, labels=labels, **kwargs).loss
        got = ours(IDS, attention_mask=RIGHT_PADDED, labels=labels, **kwargs).loss
        assert abs(got.item() - expected.item()) <= TOLERANCE, kwargs
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    shift[:, :2] = -100  # shift_labels win over labels: these positions no longer count
    expected = _reference(reference, IDS, attention_mask=RIGHT_PADDED, labels=labels, shift_labels=shift).loss
    got = ours(IDS, attention_mask=RIGHT_PADDED, labels=labels, shift_labels=shift).loss
    assert abs(got.item() - expected.item()) <= TOLERANCE


def test_output_forms(pair):
    ours, reference = pair
    out = ours(IDS, labels=IDS, output_hidden_states=True)
    loss, logits, hidden = ours(IDS, labels=IDS, output_hidden_states=True, return_dict=False)
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits) and len(hidden) == len(out.hidden_states)
    assert out["logits"] is out.logits and out[0] is out.loss and list(out.keys()) == ["loss", "logits", "hidden_states"]
    assert ours(IDS).to_tuple()[0].shape == (2, 7, reference.config.vocab_size)
    last = ours(IDS, logits_to_keep=1).logits
    assert last.shape == (2, 1, reference.config.vocab_size)
    assert (last - _reference(reference, IDS, logits_to_keep=1).logits).abs().max() <= TOLERANCE
    picked = ours(IDS, output_hidden_states=[0, -1]).hidden_states
    expected = _reference(reference, IDS, output_hidden_states=[0, -1]).hidden_states
    assert [h is None for h in picked] == [h is None for h in expected]
    assert picked[1] is None and (picked[-1] - expected[-1]).abs().max() <= TOLERANCE


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [({"past_key_values": object()}, NotImplementedError, "past_key_values"),
     ({"use_cache": True}, NotImplementedError, "use_cache=True"),
     ({"output_attentions": True}, NotImplementedError, "output_attentions=True"),
     ({"inputs_embeds": torch.zeros(1, 2, 4)}, NotImplementedError, "inputs_embeds"),
     ({"position_ids": torch.arange(7)[None]}, NotImplementedError, "position_ids"),
     ({"cache_position": torch.arange(7)}, NotImplementedError, "cache_position"),
     ({"not_a_thing": 1}, TypeError, "not_a_thing"),
     ({"labels": torch.zeros(2, 3, dtype=torch.long)}, ValueError, "labels must have the shape"),
     ({"labels": IDS, "attention_mask": RIGHT_PADDED}, ValueError, "labels must be -100 after a padded position"),
     ({"labels": IDS, "logits_to_keep": 1}, ValueError, "logits_to_keep")],
)
def test_what_is_not_implemented_is_refused_by_name(pair, kwargs, error, match):
    ours, _ = pair
    with pytest.raises(error, match=match):
        ours(IDS, **kwargs)


def test_use_cache_false_and_no_hidden_states_are_accepted(pair):
    ours, _ = pair
    out = ours(IDS, use_cache=False, output_hidden_states=False, output_attentions=False)
    assert out.hidden_states is None and out.past_key_values is None and out.loss is None


# ---------------------------------------------------------------- the real model (slow)


def test_smollm2_labels_loss_equals_transformers(smollm2_gguf, hf_smollm2):
    hf_model, tok = hf_smollm2
    ours = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf), device_map="cpu", dtype="float32")
    texts = ["The capital of France is Paris, and the capital of Spain is Madrid.", "def add(a, b):\n    return a + b"]
    batch = tok(texts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    expected = _reference(hf_model, ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    got = ours(ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    assert abs(got.loss.item() - expected.loss.item()) <= TOLERANCE
    assert got.loss.item() > 0.5  # a real loss, not a degenerate one
    real = mask.bool()
    for mine, theirs in zip(got.hidden_states, expected.hidden_states, strict=True):
        scale = theirs[real].abs().max().item()
        assert (mine[real] - theirs[real]).abs().max().item() <= TOLERANCE * max(scale, 1.0)
    # one row alone: the same loss as transformers on that row
    row = tok(texts[:1], return_tensors="pt")["input_ids"]
    assert abs(ours(row, labels=row).loss.item() - _reference(hf_model, row, labels=row).loss.item()) <= TOLERANCE
    assert ours.num_parameters() == hf_model.num_parameters()


def test_load_state_dict_takes_transformers_names(pair):
    ours, reference = pair
    before = ours(IDS).logits
    theirs = reference.state_dict()
    assert ours.load_state_dict(theirs) is not None  # q/k/v and gate/up joined back into the fused rows
    assert ours.load_state_dict(ours.state_dict()) is not None  # and its own round trip
    for name, tensor in theirs.items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    assert torch.equal(ours(IDS).logits, before)
    # a fused block's part missing (llama, qwen3, gemma3), else any layer tensor (phi3, gpt2: fused upstream)
    victim = next((k for k in sorted(theirs) if k.endswith("k_proj.weight")), None) or \
        next(k for k in sorted(theirs) if ".0." in k)
    with pytest.raises(RuntimeError, match="Missing key"):
        ours.load_state_dict({k: v for k, v in theirs.items() if k != victim})
    positional = {}
    assert ours.state_dict(positional, "x.") is positional and sorted(positional) == sorted(f"x.{k}" for k in theirs)


def test_input_embeddings_have_a_weight_in_the_default_mode(tmp_path):
    path = write_tiny_gguf_with_tokenizer(tmp_path, "llama")
    model = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu")  # GGUF blocks kept as they are
    exact = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", dtype="float32")
    weight = model.get_input_embeddings().weight
    assert weight.shape == (model.config.vocab_size, model.config.hidden_size)
    assert torch.equal(weight, exact.get_input_embeddings().weight)
