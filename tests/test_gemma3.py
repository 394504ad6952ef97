"""The real Gemma 3 270M (GGUF Q4_K_M, `tokenloom pull gemma3-270m`) against transformers loading the
same GGUF in fp32: logits (one prompt longer than the 512-position sliding window), greedy
continuations of 20 prompts, and chat generation through `tokenloom.LLM`."""

from __future__ import annotations

import os

import pytest
import torch

from tests.prompts import GREEDY_PROMPTS as SHARED_GREEDY_PROMPTS
from tokenloom.chat_template import ChatTemplateError
from tokenloom.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")

GEMMA3 = "gemma3-270m"
NEW_TOKENS = 48
LOGIT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "人工智能是",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    # about 700 tokens: the sliding layers see only the last 512 positions
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest. " * 40,
]
# google/gemma-3-270m-it's chat template (text-only messages)
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}"""
# The shared greedy set with its two chat turns in Gemma's format.
GREEDY_PROMPTS = [
    p.replace("<|im_start|>", "<start_of_turn>").replace("<|im_end|>", "<end_of_turn>").replace("assistant\n", "model\n")
    for p in SHARED_GREEDY_PROMPTS
]


@pytest.fixture(scope="module")
def llm(one_torch_thread):
    from tokenloom import LLM

    return LLM(GEMMA3, dtype="float32")


@pytest.fixture(scope="module")
def hf_gemma3(one_torch_thread):
    """transformers' model from the same GGUF file (fp32, eval)."""
    from tokenloom.loading.pull import pull

    path = pull(GEMMA3, progress=False)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype="float32"
    ).eval()


@pytest.mark.slow
def test_config_matches_transformers(llm, hf_gemma3):
    ours, ref = llm.engine.model.config, hf_gemma3.config
    assert ours.layer_types == ref.layer_types
    assert ours.sliding_window == ref.sliding_window == 512
    assert ours.query_pre_attn_scalar == ref.query_pre_attn_scalar
    assert ours.rope_parameters == ref.rope_parameters
    assert ours.final_logit_softcapping == ref.final_logit_softcapping


@pytest.mark.slow
def test_logits_match_transformers(llm, hf_gemma3):
    prompts = [llm.tokenizer.encode(p) for p in LOGIT_PROMPTS]
    assert max(len(p) for p in prompts) > 600
    our_logits = llm.engine.prompt_logits(prompts)  # one ragged batch
    worst = 0.0
    for ids, logits in zip(prompts, our_logits):
        with torch.no_grad():
            ref = hf_gemma3(torch.tensor([ids])).logits[0]
        worst = max(worst, (ref - logits).abs().max().item())
    print(f"gemma3-270m max abs logit difference: {worst:.3g}")
    assert worst <= 1e-3, f"max abs logit difference {worst}"


@pytest.mark.slow
def test_greedy_continuations_match_transformers(llm, hf_gemma3):
    prompts = [llm.tokenizer.encode(p) for p in GREEDY_PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ids = llm.engine.add_requests([(p, params) for p in prompts], detokenize=False)
    done = {o.request_id: o.token_ids for o in llm.engine.stream(ids) if o.finished}
    got = [done[i] for i in ids]

    # transformers: one left-padded batch
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf_gemma3.generate(
            input_ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    expected = out[:, width:].tolist()
    same = sum(g == r for g, r in zip(got, expected))
    print(f"gemma3-270m greedy: {same}/20 identical")
    assert same >= 19, f"only {same}/20 greedy continuations identical"


@pytest.mark.slow
def test_llm_chats_through_the_template(llm, hf_gemma3):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    # This GGUF is the base model and carries no chat template; Gemma 3's is passed by hand.
    with pytest.raises(ChatTemplateError, match="no chat template"):
        llm.chat_prompt(messages)
    tokenizer = llm.tokenizer
    text = tokenizer.apply_chat_template(messages, chat_template=GEMMA3_CHAT_TEMPLATE, add_generation_prompt=True)
    turn = "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
    assert text == "<bos>" + turn
    prompt = tokenizer.encode(text, add_special_tokens=False)
    bos, start_of_turn, end_of_turn = (
        tokenizer.encode(t, add_special_tokens=False) for t in ("<bos>", "<start_of_turn>", "<end_of_turn>")
    )
    assert prompt.count(bos[0]) == 1 and prompt.count(start_of_turn[0]) == 2 and len(end_of_turn) == 1

    params = llm.sampling_params(temperature=0, max_tokens=24, stop_token_ids=end_of_turn)
    [completion] = llm.generate(prompt, params)
    assert completion.text
    assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    with torch.no_grad():
        out = hf_gemma3.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=24, do_sample=False, pad_token_id=0,
            eos_token_id=[*llm.stop_token_ids, *end_of_turn],
        )
    assert completion.token_ids == out[0, len(prompt):].tolist()
