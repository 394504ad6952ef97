"""Engine and face behaviour around failures, empty input and interleaved consumers."""

from __future__ import annotations

import threading

import pytest
import torch

from tokenloom import LLM, AutoModelForCausalLM, SamplingParams

transformers = pytest.importorskip("transformers")

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=2, pad_token_id=0,
    )
    path = tmp_path_factory.mktemp("tiny_api")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(str(path))


def _idle(engine) -> bool:
    return not engine.has_unfinished() and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_rejected_row_leaves_the_model_usable(tiny):
    good = torch.tensor([[5, 6, 7]])
    expected = tiny.generate(good, max_new_tokens=5, do_sample=False)
    bad_batch = torch.tensor([[5, 6, 7], [8, 9, 500]])
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 97\).*500"):
        tiny.generate(bad_batch, max_new_tokens=5, do_sample=False)
    assert _idle(tiny.engine)
    assert torch.equal(tiny.generate(good, max_new_tokens=5, do_sample=False), expected)
    assert tiny(good).logits.shape == (1, 3, 97)


def test_stop_ids_outside_the_vocabulary_are_rejected(tiny):
    with pytest.raises(ValueError, match=r"stop_token_ids must be in \[0, 97\).*1000"):
        tiny.engine.add_request([1, 2], SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1000]))
    with pytest.raises(ValueError, match="stop_token_ids"):
        tiny.generate(torch.tensor([[3, 4]]), max_new_tokens=4, min_new_tokens=2, eos_token_id=500)
    with pytest.raises(ValueError, match="token ids of prompt 0"):
        tiny(torch.tensor([[3, 400]]))
    assert _idle(tiny.engine)


def test_empty_batches(tiny):
    empty = torch.zeros((0, 4), dtype=torch.long)
    assert tiny.generate(empty, max_new_tokens=3).shape == (0, 4)


def test_interleaved_streams_each_get_their_own_tokens(tiny):
    engine = tiny.engine
    alone = []
    for prompt in ([1, 2, 3], [9, 8, 7, 6, 5]):
        (rid,) = engine.add_requests([(prompt, GREEDY)])
        alone.append([t for out in engine.stream([rid]) for t in out.new_token_ids])
    a, b = engine.add_requests([([1, 2, 3], GREEDY), ([9, 8, 7, 6, 5], GREEDY)])
    stream_a, stream_b = engine.stream([a]), engine.stream([b])
    got = {a: [], b: []}
    live = {a: stream_a, b: stream_b}
    while live:  # alternate between the two consumers, one output each
        for rid, stream in list(live.items()):
            out = next(stream, None)
            if out is None:
                del live[rid]
                continue
            assert out.request_id == rid
            got[rid].extend(out.new_token_ids)
    assert [got[a], got[b]] == alone
    assert _idle(engine)


def test_closing_a_stream_early_aborts_its_request(tiny):
    engine = tiny.engine
    (rid,) = engine.add_requests([([4, 5, 6], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))])
    stream = engine.stream([rid])
    next(stream)
    stream.close()
    assert _idle(engine)


def test_loading_a_gguf_keeps_the_thread_count_of_new_threads(smollm2_gguf):
    from tokenloom.loading import load_model

    before = torch.get_num_threads()
    load_model(str(smollm2_gguf))
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [before] and torch.get_num_threads() == before


def test_llm_requests_stop_at_eos_even_with_user_params(smollm2_gguf):
    llm = LLM(str(smollm2_gguf))
    prompt = llm.chat_prompt([{"role": "user", "content": "Say hi."}])
    (done,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=200))
    assert done.finish_reason == "eos" and done.token_ids[-1] in llm.stop_token_ids
    streamed = [out for out in llm.stream(prompt, SamplingParams(temperature=0, max_tokens=200))]
    assert streamed[-1].finished and [t for o in streamed for t in o.new_token_ids] == done.token_ids
    assert "".join(o.text_delta for o in streamed) == done.text
