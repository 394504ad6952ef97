"""pipeline("text-generation") against transformers' own pipeline on the real SmolLM2 (greedy, same GGUF,
fp32): same outputs, same nesting, for strings, lists, chats and lists of chats."""

from __future__ import annotations

import os
import warnings

import pytest
import transformers

import tokenloom.compat.pipeline as pipeline_module
from tokenloom import AutoModelForCausalLM, pipeline
from tokenloom.generation_settings import DefaultLengthWarning

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHAT = [{"role": "user", "content": "What is 2+2?"}]
CHAT2 = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
GREEDY = {"do_sample": False, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def ref(hf_smollm2):
    model, tokenizer = hf_smollm2
    return transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return pipeline("text-generation", model=str(smollm2_gguf), device_map="cpu", dtype="float32")


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize(
    "inputs",
    [
        "The capital of France is",
        ["Hello, my name is", "def add(a, b):", "Once upon a time"],
        CHAT,
        [CHAT, CHAT2],
    ],
    ids=["string", "strings", "chat", "chats"],
)
def test_outputs_equal_transformers(ref, ours, inputs, full):
    expected = ref(inputs, return_full_text=full, **GREEDY)
    got = ours(inputs, return_full_text=full, **GREEDY)
    assert got == expected


def test_default_return_full_text_and_chat_shape(ref, ours):
    got = ours(CHAT, **GREEDY)
    assert got == ref(CHAT, **GREEDY)
    (record,) = got
    messages = record["generated_text"]
    assert messages[:-1] == CHAT and messages[-1]["role"] == "assistant" and "4" in messages[-1]["content"]
    assert ours("Hi", **GREEDY)[0]["generated_text"].startswith("Hi")


def test_continue_final_message_equals_transformers(ref, ours):
    prefill = [*CHAT, {"role": "assistant", "content": "The answer is"}]
    assert ours(prefill, **GREEDY) == ref(prefill, **GREEDY)


def test_beams_and_stop_sequence_equal_transformers(ref, ours):
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, do_sample=False)
    got = ours(["The capital of France is", "Colors: red,"], **kwargs)
    assert got == ref(["The capital of France is", "Colors: red,"], **kwargs)
    assert [len(per_input) for per_input in got] == [2, 2]
    stop = dict(stop_sequence="\n", max_new_tokens=30, do_sample=False)
    assert ours("A list of colors: red, blue", **stop) == ref("A list of colors: red, blue", **stop)


def test_loaded_model_path_and_construction_defaults(ref, hf_smollm2_dir, smollm2_gguf):
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf), device_map="cpu", dtype="float32")
    from_model = pipeline("text-generation", model=model, max_new_tokens=12, do_sample=False)
    assert from_model.model is model
    expected = ref("The capital of France is", **GREEDY)
    assert from_model("The capital of France is") == expected
    from_dir = pipeline("text-generation", model=str(hf_smollm2_dir), tokenizer=str(hf_smollm2_dir))
    assert from_dir("The capital of France is", **GREEDY) == expected


def test_batch_size_keeps_outputs(ref, ours):
    prompts = ["Hello, my name is", "def add(a, b):", "Once upon a time"]
    assert ours(prompts, batch_size=2, **GREEDY) == ref(prompts, **GREEDY)


def test_pipeline_default_length_warning(ours, monkeypatch):
    """transformers' pipeline generates up to 256 new tokens when nothing says how many (a smaller limit
    is patched in here to keep the test fast); hitting that unchosen limit warns."""
    monkeypatch.setitem(pipeline_module.PIPELINE_DEFAULTS, "max_new_tokens", 6)
    with pytest.warns(DefaultLengthWarning, match="default limit of 6 new tokens"):
        ours("A list of colors: red, blue", do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DefaultLengthWarning)
        ours("A list of colors: red, blue", do_sample=False, max_new_tokens=6)  # chosen: no warning
        ours(CHAT, do_sample=False, max_new_tokens=40)


def test_pipeline_samples_by_default_like_transformers(ours):
    """transformers' text-generation defaults: do_sample=True, temperature=0.7 (model config permitting)."""
    from tokenloom import set_seed

    set_seed(0)
    first = ours("Once upon a time", max_new_tokens=8)
    set_seed(1)
    outputs = {ours("Once upon a time", max_new_tokens=8)[0]["generated_text"] for _ in range(3)}
    set_seed(0)
    assert ours("Once upon a time", max_new_tokens=8) == first
    assert len(outputs) > 1


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda p: p(42), "text-generation inputs"),
        (lambda p: p([{"role": "user"}]), "text-generation inputs"),
        (lambda p: p("Hi", handle_long_generation="hole"), "handle_long_generation"),
        (lambda p: p("Hi", batch_size=0), "batch_size"),
        (lambda p: p("Hi", max_new_tokens=4, top_p=2.0, do_sample=True), "top_p"),
    ],
)
def test_errors_name_the_problem(ours, call, match):
    with pytest.raises(ValueError, match=match):
        call(ours)


def test_only_text_generation():
    with pytest.raises(ValueError, match="text-generation"):
        pipeline("summarization", model="x")


class RecordingStreamer:
    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = 0

    def put(self, value) -> None:
        self.puts.append(value.flatten().tolist())

    def end(self) -> None:
        self.ended += 1


def test_streamer_gets_the_prompt_then_the_new_tokens(ours):
    streamer = RecordingStreamer()
    (record,) = ours("The capital of France is", streamer=streamer, return_tensors=True, **GREEDY)
    prompt = ours.tokenizer("The capital of France is")["input_ids"]
    assert streamer.ended == 1 and streamer.puts[0] == prompt
    assert prompt + [t for put in streamer.puts[1:] for t in put] == record["generated_token_ids"]
    with pytest.raises(ValueError, match="one input at a time"):
        ours(["a", "b"], streamer=RecordingStreamer(), **GREEDY)
