"""The transformers-compatible face on the real SmolLM2 GGUF: generate() defaults, generation_config
handling, errors, padding, logits, dtypes, weight-only quantization, seeding and streamers.

transformers (same GGUF, fp32) is the oracle wherever it defines the behaviour.
"""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stdout

import pytest
import torch
import transformers

from tests.prompts import LOGIT_PROMPTS
from tests.tiny_models import hf_generate
from tokenloom import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, set_seed
from tokenloom.models.linear import Int4Linear, Linear

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPT = "A list of colors: red, blue"
# greedy replies end at <|im_end|> after ~12 and ~24 tokens; the poem runs past 40
CHATS = ["What is 2+2?", "Name a color.", "Write a long poem about the ocean and the stars."]
IM_END = 2  # <|im_end|>: SmolLM2's EOS and pad token


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return AutoModelForCausalLM.from_pretrained(str(smollm2_gguf), device_map="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hf(hf_smollm2):
    return hf_smollm2


@pytest.fixture(scope="module")
def prompt_ids(hf):
    _, tok = hf
    return tok(PROMPT, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def prompt_token_lists(hf):
    _, tok = hf
    return [tok(p).input_ids for p in LOGIT_PROMPTS]


@pytest.fixture(scope="module")
def fp32_logits(ours, prompt_token_lists):
    return ours.engine.prompt_logits(prompt_token_lists)


def chat_texts(tok, contents=CHATS) -> list[str]:
    return [
        tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False)
        for c in contents
    ]


# ---------------------------------------------------------------- defaults and generation_config


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")
@pytest.mark.filterwarnings("ignore::tokenloom.generation_settings.DefaultLengthWarning")
def test_defaults_follow_transformers(ours, hf, prompt_ids):
    """No length given: transformers >= 5 generates 20 new tokens (its max_length=20 default counts
    new tokens when nobody set it), greedily, and so must we."""
    hf_model, _ = hf
    ref = hf_generate(hf_model, prompt_ids)
    got = ours.generate(prompt_ids)
    assert ref.shape[1] == prompt_ids.shape[1] + 20
    assert torch.equal(got, ref)


def test_passed_generation_config_inherits_the_models_eos(ours, hf):
    """GenerationConfig(max_new_tokens=...) passed to generate() keeps the model's EOS/pad settings for
    everything it leaves unset (transformers layers it over model.generation_config)."""
    hf_model, tok = hf
    ids = tok(chat_texts(tok, ["What is 2+2?"]), return_tensors="pt", add_special_tokens=False).input_ids
    ref = hf_generate(hf_model, ids, generation_config=transformers.GenerationConfig(max_new_tokens=30))
    got = ours.generate(ids, generation_config=GenerationConfig(max_new_tokens=30))
    assert ref[0, -1].item() == IM_END and ref.shape[1] < ids.shape[1] + 30  # it did stop at EOS
    assert torch.equal(got, ref)
    five = ours.generate(ids, generation_config=GenerationConfig(max_new_tokens=5))
    assert torch.equal(five, ref[:, : ids.shape[1] + 5])
    # a transformers GenerationConfig is understood as well
    assert torch.equal(ours.generate(ids, generation_config=transformers.GenerationConfig(max_new_tokens=5)), five)
    with pytest.raises(ValueError, match="top_h"):  # a transformers knob tokenloom lacks is named, not dropped
        ours.generate(ids, generation_config=transformers.GenerationConfig(max_new_tokens=5, top_h=0.3))


@pytest.fixture(scope="module")
def custom_dir(hf_smollm2_dir, tmp_path_factory):
    """The HF copy of SmolLM2 with generation_config.json saying max_length=24 and eos [<|im_end|>, "\\n"]
    (weights linked, not copied)."""
    path = tmp_path_factory.mktemp("smollm2_gencfg")
    for item in hf_smollm2_dir.iterdir():
        if item.name != "generation_config.json":
            (path / item.name).symlink_to(item)
    original = hf_smollm2_dir / "generation_config.json"
    config = json.loads(original.read_text()) if original.exists() else {}
    newline = 198
    config.update(max_length=24, eos_token_id=[IM_END, newline], pad_token_id=IM_END)
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def custom_pair(custom_dir, hf):
    """Ours loaded from the directory; for transformers, the same weights with the directory's
    generation_config.json as transformers itself reads it (saves loading the model a second time)."""
    ours = AutoModelForCausalLM.from_pretrained(str(custom_dir), device_map="cpu")
    file_config = transformers.GenerationConfig.from_pretrained(str(custom_dir))
    return ours, hf[0], file_config


def test_generation_config_json_is_honoured(custom_pair, prompt_ids):
    ours, hf_model, file_config = custom_pair
    assert ours.generation_config.max_length == 24
    assert ours.generation_config.eos_token_ids == [IM_END, 198]
    ref = hf_generate(hf_model, prompt_ids, generation_config=file_config)
    got = ours.generate(prompt_ids)
    assert torch.equal(got, ref)
    assert got[0, -1].item() == 198 and got.shape[1] < 24  # stopped at the second EOS id ("\n")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eos_token_id": IM_END},  # the "\n" stop removed: runs to max_length=24 in total
        {"max_new_tokens": 3},
        {"eos_token_id": IM_END, "max_length": 12},
    ],
)
def test_call_kwargs_override_generation_config_json(custom_pair, prompt_ids, kwargs):
    ours, hf_model, file_config = custom_pair
    ref = hf_generate(hf_model, prompt_ids, generation_config=file_config, **kwargs)
    got = ours.generate(prompt_ids, **kwargs)
    assert torch.equal(got, ref)
    if "max_new_tokens" in kwargs:
        assert got.shape[1] == prompt_ids.shape[1] + 3
    else:
        assert got.shape[1] == kwargs.get("max_length", 24)


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"max_new_tokens": 4, "no_such_knob": 1}, "no_such_knob"),
        ({"max_new_tokens": 4, "do_sample": True, "temperature": 0.0}, "temperature"),
        # out of range: named with transformers' parameter name
        ({"max_new_tokens": 4, "repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_new_tokens": 4, "num_beams": 0}, "num_beams"),
        ({"max_new_tokens": 4, "num_return_sequences": 2}, "num_return_sequences"),  # greedy: transformers errors
        ({"max_new_tokens": 4, "min_p": 1.5}, "min_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        # not implemented: rejected by name instead of silently ignored
        ({"max_new_tokens": 4, "num_beams": 2, "diversity_penalty": 0.5, "num_beam_groups": 2}, "diversity_penalty"),
    ],
)
def test_bad_generate_arguments_raise_naming_them(ours, prompt_ids, kwargs, named):
    with pytest.raises(ValueError, match=named):
        ours.generate(prompt_ids, **kwargs)
    assert not ours.engine.has_unfinished()


def test_prompt_reaching_explicit_max_length_raises_like_transformers(ours, hf, prompt_ids):
    hf_model, _ = hf
    width = prompt_ids.shape[1]
    with pytest.raises(ValueError, match="max_length"):
        hf_generate(hf_model, prompt_ids, max_length=width)
    with pytest.raises(ValueError, match="max_length"):
        ours.generate(prompt_ids, max_length=width)


# ---------------------------------------------------------------- batches, padding, chat templates


def test_left_padded_batch_with_eos_rows_equals_transformers(ours, hf):
    hf_model, tok = hf
    enc = tok(chat_texts(tok), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    assert (enc.attention_mask == 0).any()  # really padded
    ref = hf_generate(hf_model, **enc, max_new_tokens=40)
    got = ours.generate(**enc, max_new_tokens=40)
    assert got.shape == ref.shape
    assert torch.equal(got, ref)
    width = enc.input_ids.shape[1]
    new = got[:, width:]
    finished_early = [row for row in new.tolist() if IM_END in row and row.index(IM_END) < len(row) - 1]
    assert finished_early, "expected a row to end at <|im_end|> before the others"
    for row in finished_early:  # after EOS: pad fill = pad_token_id
        assert all(t == tok.pad_token_id for t in row[row.index(IM_END):])


def test_chat_template_batch_encoding_into_generate(ours, hf):
    hf_model, tok = hf
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ref = hf_generate(hf_model, **inputs, max_new_tokens=20)
    by_keyword = ours.generate(**inputs, max_new_tokens=20)
    positional = ours.generate(inputs, max_new_tokens=20)
    assert torch.equal(by_keyword, ref)
    assert torch.equal(positional, ref)
    text = tok.decode(by_keyword[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip() and "Paris" in text


def test_tokenloom_tokenizer_chat_template_into_generate(ours, hf, smollm2_gguf):
    _, hf_tok = hf
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf))
    messages = [{"role": "user", "content": "Say hi"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    hf_inputs = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    assert inputs["input_ids"].tolist() == hf_inputs["input_ids"].tolist()
    out = ours.generate(**inputs, max_new_tokens=8)
    assert out.shape[0] == 1 and 1 <= out.shape[1] - inputs["input_ids"].shape[1] <= 8
    assert tok.decode(out[0], skip_special_tokens=True).strip()


def test_forward_logits_match_transformers_at_unpadded_positions(ours, hf):
    hf_model, tok = hf
    prompts = ["Hi", "The capital of France is", "def fibonacci(n):\n    return"]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    logits = ours(**enc).logits
    batch, seq = enc.input_ids.shape
    assert logits.shape == (batch, seq, hf_model.config.vocab_size)
    for i, prompt in enumerate(prompts):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = hf_model(ids).logits[0]  # the row alone, unpadded
        positions = enc.attention_mask[i].bool()
        assert (logits[i, positions] - ref).abs().max().item() <= 1e-3
        assert torch.all(logits[i, ~positions] == 0)  # padded positions are zero-filled


# ---------------------------------------------------------------- dtype and device


def _mean_abs_diff(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return sum((g.float() - r).abs().mean().item() for g, r in zip(got, ref)) / len(ref)


def _mean_abs(ref: list[torch.Tensor]) -> float:
    return sum(r.abs().mean().item() for r in ref) / len(ref)


def _top1_agreement(got: list[torch.Tensor], ref: list[torch.Tensor]) -> int:
    """How many prompts predict the same next token (argmax at the last position)."""
    return sum(int(g[-1].float().argmax() == r[-1].argmax()) for g, r in zip(got, ref))


def test_bfloat16_loads_and_stays_close_to_float32(smollm2_gguf, prompt_token_lists, fp32_logits, prompt_ids):
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert next(model.model.parameters()).dtype == torch.bfloat16
    logits = model.engine.prompt_logits(prompt_token_lists)
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per operation); over 30 layers that
    # compounds to a few percent of the logits' size, far from the ~100% an actual bug gives.
    assert _mean_abs_diff(logits, fp32_logits) <= 0.05 * _mean_abs(fp32_logits)
    assert _top1_agreement(logits, fp32_logits) >= 8  # of 10 prompts
    out = model.generate(prompt_ids, max_new_tokens=5)
    assert out.shape == (1, prompt_ids.shape[1] + 5)


def test_device_map_cpu(ours):
    assert ours.device == torch.device("cpu")  # the module's model was loaded with device_map="cpu"
    assert next(ours.model.parameters()).device == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_map_cuda_without_cuda_raises(smollm2_gguf):
    with pytest.raises(ValueError, match="CUDA"):
        AutoModelForCausalLM.from_pretrained(str(smollm2_gguf), device_map="cuda")


# ---------------------------------------------------------------- weight-only quantization


def _weight_bytes(model) -> int:
    """Bytes of parameters and buffers, each storage counted once (the tied embedding is shared)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@pytest.fixture(scope="module")
def linear_fraction(ours) -> float:
    """Share of the fp32 model's bytes held by the Linear layers that get quantized (not lm_head)."""
    linear = sum(
        m.weight.numel() * 4 for name, m in ours.named_modules()
        if isinstance(m, Linear) and not name.endswith("lm_head")
    )
    return linear / _weight_bytes(ours)


@pytest.mark.parametrize(
    ("kwargs", "module_type", "bytes_per_weight", "logit_share", "min_top1"),
    [
        # 8 bits in groups of 32 as two 4-bit pieces: 1 byte per weight plus a bfloat16 scale and zero
        # per group and piece = 1.25 bytes; rounding error <= range/510 per weight
        ({"load_in_8bit": True}, Int4Linear, 1.0 + 8 / 32, 0.05, 8),
        # int4: half a byte per weight plus a bfloat16 scale and zero per 32-weight group = 0.625 byte;
        # 16 levels instead of 255 make each weight's error ~8x coarser (range/30 per weight)
        ({"load_in_4bit": True}, Int4Linear, 0.5 + 4 / 32, 0.4, 6),
    ],
)
def test_quantized_loading(smollm2_gguf, ours, linear_fraction, prompt_token_lists, fp32_logits, prompt_ids,
                           kwargs, module_type, bytes_per_weight, logit_share, min_top1):
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf), **kwargs)
    quantized = [m for m in model.modules() if isinstance(m, module_type)]
    linears = [name for name, m in model.named_modules() if isinstance(m, Linear)]
    assert len(quantized) == 4 * model.config.num_hidden_layers  # qkv, o, gate_up, down
    assert all(name.endswith("lm_head") for name in linears)  # only the (tied) output head stays
    # memory: the quantized share shrinks from 4 bytes per weight to `bytes_per_weight`
    expected_ratio = (1 - linear_fraction) + linear_fraction * bytes_per_weight / 4
    ratio = _weight_bytes(model) / _weight_bytes(ours)
    assert ratio <= expected_ratio * 1.02, f"memory ratio {ratio:.3f}, expected about {expected_ratio:.3f}"
    logits = model.engine.prompt_logits(prompt_token_lists)
    assert _mean_abs_diff(logits, fp32_logits) <= logit_share * _mean_abs(fp32_logits)
    assert _top1_agreement(logits, fp32_logits) >= min_top1
    out = model.generate(prompt_ids, max_new_tokens=5)
    assert out.shape == (1, prompt_ids.shape[1] + 5)
    assert torch.equal(out[:, : prompt_ids.shape[1]], prompt_ids)


# ---------------------------------------------------------------- seeding and streaming


def test_set_seed_makes_sampling_repeatable(ours, prompt_ids):
    kwargs = dict(do_sample=True, max_new_tokens=20, min_new_tokens=20)
    set_seed(0)
    first = ours.generate(prompt_ids, **kwargs)
    set_seed(0)
    second = ours.generate(prompt_ids, **kwargs)
    set_seed(1)
    other = ours.generate(prompt_ids, **kwargs)
    assert torch.equal(first, second)
    assert first.shape == other.shape == (1, prompt_ids.shape[1] + 20)
    assert not torch.equal(first, other)


class RecordingStreamer:
    """The put/end interface of transformers' streamers."""

    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        assert self.ended == 0, "put after end"
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ended += 1


def test_streamer_receives_prompt_then_each_token(ours, hf, prompt_ids):
    streamer = RecordingStreamer()
    out = ours.generate(prompt_ids, max_new_tokens=10, streamer=streamer)
    assert streamer.ended == 1
    assert torch.equal(streamer.puts[0].reshape(1, -1), prompt_ids)  # the prompt first
    assert all(p.numel() == 1 for p in streamer.puts[1:])  # then one token at a time
    assert len(streamer.puts) == 1 + 10
    assert torch.cat([p.flatten() for p in streamer.puts]).tolist() == out[0].tolist()


def test_transformers_text_streamer_prints_the_continuation(ours, hf, prompt_ids):
    _, tok = hf
    streamer = transformers.TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        out = ours.generate(prompt_ids, max_new_tokens=12, streamer=streamer)
    expected = tok.decode(out[0, prompt_ids.shape[1]:], skip_special_tokens=True)
    assert buffer.getvalue() == expected + "\n"


def test_streamer_refuses_a_batch(ours, hf):
    _, tok = hf
    enc = tok(["Hi", "Hello there"], return_tensors="pt", padding=True, padding_side="left")
    with pytest.raises(ValueError, match="batch"):
        ours.generate(**enc, max_new_tokens=2, streamer=RecordingStreamer())
    assert not ours.engine.has_unfinished()


class RowStreamer(RecordingStreamer):
    """A streamer that takes a batch: put(prompt) once, then put_row(row, ids)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, list[int]] = {}

    def put_row(self, row: int, ids: torch.Tensor) -> None:
        assert self.ended == 0, "put_row after end"
        self.rows.setdefault(row, []).extend(ids.tolist())


def test_batch_streamer_gets_each_output_row(ours, hf):
    _, tok = hf
    enc = tok(["Hi", "Hello there"], return_tensors="pt", padding=True, padding_side="left")
    streamer = RowStreamer()
    out = ours.generate(**enc, max_new_tokens=5, min_new_tokens=5, do_sample=True, num_return_sequences=2,
                        streamer=streamer)
    assert streamer.ended == 1 and len(streamer.puts) == 1
    # the prompt once, one row per output row (each input row num_return_sequences times)
    assert torch.equal(streamer.puts[0], enc.input_ids.repeat_interleave(2, 0))
    width = enc.input_ids.shape[1]
    assert out.shape == (4, width + 5)
    assert streamer.rows == {row: out[row, width:].tolist() for row in range(4)}


def test_none_means_not_set(ours, hf, prompt_ids):
    """transformers >= 5 treats None as "use the default": greedy decoding, no penalty."""
    hf_model, _ = hf
    kwargs = dict(max_new_tokens=4, temperature=None, top_k=None, top_p=None, repetition_penalty=None,
                  min_p=None, max_length=None)
    ref = hf_generate(hf_model, prompt_ids, **kwargs)
    assert torch.equal(ours.generate(prompt_ids, **kwargs), ref)
    assert torch.equal(ref, hf_generate(hf_model, prompt_ids, max_new_tokens=4))


def test_generation_config_save_and_load_keep_explicit_settings(tmp_path):
    cfg = GenerationConfig(max_length=20, do_sample=True, top_k=5)
    cfg.save_pretrained(tmp_path)
    back = GenerationConfig.from_pretrained(tmp_path)
    assert back == cfg
    theirs = transformers.GenerationConfig.from_pretrained(str(tmp_path))  # the file reads in transformers
    assert (theirs.max_length, theirs.do_sample, theirs.top_k) == (20, True, 5)
    # a max_length that was set is a total (20 - 8 prompt tokens); the default one means 20 new tokens
    assert back.to_sampling_params(8).max_tokens == 12
    assert GenerationConfig().to_sampling_params(8).max_tokens == 20
    with pytest.raises(ValueError, match="bogus_knob"):
        GenerationConfig(bogus_knob=1)
