"""GenerationConfig -> SamplingParams (tokenloom.generation_settings, shared by every face), validation
named after the transformers parameter, and the compat generate() outputs on the real SmolLM2:
num_return_sequences, beams, return_dict_in_generate (scores/logits), stop_strings, the default-length
and EOS-lint guards. transformers (same GGUF, fp32) is the oracle."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from tests.tiny_models import hf_generate
from tokenloom import LLM, AutoModelForCausalLM, GenerationConfig, SamplingParams
from tokenloom.generation_settings import DefaultLengthWarning, plan_generation, to_sampling_params

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPT = "A list of colors: red, blue"
IM_END = 2  # <|im_end|>: SmolLM2's EOS and pad token
ENDOFTEXT = 0  # <|endoftext|>

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- validation (no model)


@pytest.mark.parametrize(
    ("kwargs", "named", "value"),
    [
        ({"temperature": -0.5}, "temperature", "-0.5"),
        ({"do_sample": True, "temperature": 0.0}, "temperature", "0"),
        ({"top_p": 0.0}, "top_p", "0.0"),
        ({"top_p": 1.5}, "top_p", "1.5"),
        ({"top_k": -1}, "top_k", "-1"),
        ({"min_p": 1.5}, "min_p", "1.5"),
        ({"min_p": -0.1}, "min_p", "-0.1"),
        ({"typical_p": 0.0}, "typical_p", "0.0"),
        ({"epsilon_cutoff": 1.0}, "epsilon_cutoff", "1.0"),
        ({"eta_cutoff": -0.1}, "eta_cutoff", "-0.1"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "0.0"),
        ({"repetition_penalty": -1.0}, "repetition_penalty", "-1.0"),
        ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size", "-2"),
        ({"max_new_tokens": 0}, "max_new_tokens", "0"),
        ({"max_length": 0}, "max_length", "0"),
        ({"min_new_tokens": 5, "max_new_tokens": 3}, "min_new_tokens", "5"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences", "3"),
        ({"num_return_sequences": 2}, "num_return_sequences", "2"),  # greedy, no beams: transformers errors
        ({"num_beams": 0}, "num_beams", "0"),
        ({"stop_strings": ""}, "stop_strings", "''"),
        ({"stop_strings": ["ok", ""]}, "stop_strings", "''"),
        ({"max_time": 0}, "max_time", "0"),
        ({"bad_words_ids": [[]]}, "bad_words_ids", "[[]]"),
        ({"bad_words_ids": [[3, -1]]}, "bad_words_ids", "-1"),
        ({"sequence_bias": {(): 1.0}}, "sequence_bias", "()"),
        ({"sequence_bias": [[[5], "big"]]}, "sequence_bias", "big"),
        ({"suppress_tokens": [-1]}, "suppress_tokens", "-1"),
        ({"begin_suppress_tokens": [1.5]}, "begin_suppress_tokens", "1.5"),
        ({"eos_token_id": -1}, "eos_token_id", "-1"),
        ({"eos_token_id": [2, -3]}, "eos_token_id", "-3"),
        ({"early_stopping": "sometimes"}, "early_stopping", "sometimes"),
        ({"length_penalty": float("nan")}, "length_penalty", "nan"),
        ({"presence_penalty": 3.0}, "presence_penalty", "3.0"),
        ({"frequency_penalty": -2.5}, "frequency_penalty", "-2.5"),
        ({"logit_bias": {5: 200}}, "logit_bias", "200"),
        ({"seed": -1}, "seed", "-1"),
        ({"renormalize_logits": "yes"}, "renormalize_logits", "yes"),
        ({"num_beams": 2, "do_sample": True}, "do_sample", "True"),  # beam sampling is not implemented
    ],
)
def test_invalid_settings_raise_naming_the_transformers_parameter(kwargs, named, value):
    with pytest.raises(ValueError, match=named) as info:
        GenerationConfig(**kwargs).validate()
    assert value in str(info.value)  # the message shows the value too


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"diversity_penalty": 0.5}, "diversity_penalty"),
        ({"num_beam_groups": 2}, "num_beam_groups"),
        ({"constraints": ["x"]}, "constraints"),
        ({"force_words_ids": [[5]]}, "force_words_ids"),
        ({"penalty_alpha": 0.6}, "penalty_alpha"),
        ({"dola_layers": "low"}, "dola_layers"),
        ({"guidance_scale": 1.5}, "guidance_scale"),
        ({"output_attentions": True}, "output_attentions"),
    ],
)
def test_unsupported_knobs_raise_naming_them(kwargs, named):
    with pytest.raises(ValueError, match=f"not supported.*{named}"):
        GenerationConfig(**kwargs).validate()
    GenerationConfig(**{named: None}).validate()  # None means "not set" and is fine


def test_unknown_setting_is_named():
    with pytest.raises(ValueError, match="bogus_knob"):
        to_sampling_params({"bogus_knob": 1})


# ---------------------------------------------------------------- the mapping


def test_sampling_knobs_map_when_sampling():
    params = GenerationConfig(
        do_sample=True, temperature=0.7, top_k=10, top_p=0.9, min_p=0.05, typical_p=0.95,
        epsilon_cutoff=3e-4, eta_cutoff=1e-3, max_new_tokens=7, seed=11,
    ).to_sampling_params(5)
    assert (params.temperature, params.top_k, params.top_p) == (0.7, 10, 0.9)
    assert (params.min_p, params.typical_p, params.epsilon_cutoff, params.eta_cutoff) == (0.05, 0.95, 3e-4, 1e-3)
    assert (params.max_tokens, params.seed) == (7, 11)
    # transformers' top_k default (50) applies when sampling and nothing set it
    assert GenerationConfig(do_sample=True).to_sampling_params(5).top_k == 50


def test_greedy_drops_the_sampling_warpers_but_keeps_the_processors():
    """transformers applies warpers (temperature, top-k/p, min_p, typical, epsilon, eta) only when
    sampling; the processors (penalties, bans, biases, min length) apply in greedy decoding too."""
    params = GenerationConfig(
        temperature=0.7, top_k=10, top_p=0.9, min_p=0.05, typical_p=0.9, epsilon_cutoff=1e-3, eta_cutoff=1e-3,
        repetition_penalty=1.3, no_repeat_ngram_size=3, bad_words_ids=[[5, 6], [7]], suppress_tokens=[8],
        begin_suppress_tokens=[9], renormalize_logits=True, max_new_tokens=10,
    ).to_sampling_params(4)
    assert params.is_greedy
    assert (params.top_k, params.top_p, params.min_p, params.typical_p) == (0, 1.0, 0.0, 1.0)
    assert (params.epsilon_cutoff, params.eta_cutoff) == (0.0, 0.0)
    assert params.repetition_penalty == 1.3 and params.no_repeat_ngram_size == 3
    assert params.bad_words_ids == [[5, 6], [7]]
    assert params.suppress_tokens == [8] and params.begin_suppress_tokens == [9]
    assert params.renormalize_logits is True


@pytest.mark.parametrize(
    "bias",
    [{(5,): 2.0, (6, 7): -1.5}, [[[5], 2.0], [[6, 7], -1.5]]],  # both transformers formats
)
def test_sequence_bias_formats_and_logit_bias(bias):
    params = to_sampling_params({"sequence_bias": bias, "logit_bias": {"5": 1.0, 9: -100}})
    # logit_bias adds to a 1-token sequence bias of the same token
    assert params.sequence_bias == {(5,): 3.0, (6, 7): -1.5, (9,): -100.0}


def test_stopping_and_output_knobs_map():
    params = to_sampling_params({
        "stop_strings": "END", "eos_token_id": [2, 0, 2], "max_time": 1.5, "output_scores": True,
        "output_logits": True, "presence_penalty": 0.5, "frequency_penalty": -0.25,
    })
    assert params.stop == ["END"]
    assert params.stop_token_ids == [2, 0]
    assert params.max_time == 1.5 and params.output_scores and params.output_logits
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.25)
    assert to_sampling_params({"stop_strings": ["a", "b"], "eos_token_id": 7}).stop == ["a", "b"]
    assert to_sampling_params({"eos_token_id": 7}).stop_token_ids == [7]


def test_lengths_follow_transformers():
    """max_length / min_length are totals over the (padded) input width; max_new_tokens wins over
    max_length; the default max_length (nobody set it) means 20 new tokens."""
    assert GenerationConfig(max_length=30).to_sampling_params(8).max_tokens == 22
    assert GenerationConfig(max_length=30, max_new_tokens=5).to_sampling_params(8).max_tokens == 5
    assert GenerationConfig().to_sampling_params(8).max_tokens == 20
    assert GenerationConfig(min_length=10, max_new_tokens=9).to_sampling_params(4).min_tokens == 6
    assert GenerationConfig(min_new_tokens=3, max_new_tokens=9).to_sampling_params(4).min_tokens == 3
    plan = plan_generation({}, 8)
    assert plan.uses_default_length
    assert not plan_generation({"max_new_tokens": 20}, 8).uses_default_length
    assert not plan_generation({"max_length": 40}, 8).uses_default_length


def test_beam_settings_go_to_the_plan():
    plan = GenerationConfig(num_beams=4, num_return_sequences=2, length_penalty=0.5, early_stopping="never",
                            max_new_tokens=6).plan(3)
    assert (plan.num_beams, plan.num_return_sequences, plan.length_penalty) == (4, 2, 0.5)
    assert plan.early_stopping == "never" and plan.is_beam_search and plan.sampling.max_tokens == 6


def test_generation_config_json_loading_and_overrides(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.6, "top_p": 0.95, "repetition_penalty": 1.1, "eos_token_id": [2, 0],
        "transformers_version": "4.46.0",
    }))
    config = GenerationConfig.from_pretrained(tmp_path)
    params = config.to_sampling_params(4)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.6, 0.95, 50, 1.1)
    assert params.stop_token_ids == [2, 0]
    config.update(temperature=0.9, do_sample=False, max_new_tokens=3)  # a call's overrides
    params = config.to_sampling_params(4)
    assert params.is_greedy and params.top_p == 1.0 and params.repetition_penalty == 1.1 and params.max_tokens == 3


def test_mapping_module_stays_torch_free():
    code = "import sys, tokenloom.generation_settings; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------- compat generate on SmolLM2


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return AutoModelForCausalLM.from_pretrained(str(smollm2_gguf), device_map="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hf(hf_smollm2):
    return hf_smollm2


def test_generate_validates_with_transformers_names(ours, hf):
    _, tok = hf
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="repetition_penalty"):
        ours.generate(ids, max_new_tokens=2, repetition_penalty=0.0)
    with pytest.raises(ValueError, match="assistant_model"):
        ours.generate(ids, max_new_tokens=2, assistant_model=object())
    assert not ours.engine.has_unfinished()


def test_num_return_sequences_with_beams_equals_transformers(ours, hf):
    """Each input row is repeated num_return_sequences times in a row, best beam first."""
    hf_model, tok = hf
    enc = tok(["The capital of France is", "def add(a, b):"], return_tensors="pt", padding=True,
              padding_side="left")
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, do_sample=False)
    ref = hf_generate(hf_model, **enc, **kwargs, return_dict_in_generate=True, output_scores=True)
    got = ours.generate(**enc, **kwargs, return_dict_in_generate=True, output_scores=True)
    assert got.sequences.shape == ref.sequences.shape == (4, enc.input_ids.shape[1] + 6)
    assert torch.equal(got.sequences, ref.sequences)
    assert torch.allclose(got.sequences_scores, ref.sequences_scores, atol=1e-3)
    assert torch.equal(ours.generate(**enc, **kwargs), ref.sequences)
    # per step the processed log-probabilities of all 2 * 3 beams, and the beam each token extended
    assert list(got.keys()) == ["sequences", "sequences_scores", "scores", "beam_indices"]
    assert len(got.scores) == len(ref.scores) == 6 and got.scores[0].shape == ref.scores[0].shape == (6, 49152)
    assert max((g - r).abs().max().item() for g, r in zip(got.scores, ref.scores)) <= 1e-4
    assert torch.equal(got.beam_indices, ref.beam_indices)
    plain = ours.generate(**enc, **kwargs, return_dict_in_generate=True)
    assert list(plain.keys()) == ["sequences", "beam_indices"]  # as transformers without output_scores


def test_num_return_sequences_with_sampling_shapes_and_order(ours, hf):
    hf_model, tok = hf
    enc = tok(["Hi", "The weather today is"], return_tensors="pt", padding=True, padding_side="left")
    kwargs = dict(do_sample=True, num_return_sequences=3, max_new_tokens=6, min_new_tokens=6)
    torch.manual_seed(0)
    ref = hf_generate(hf_model, **enc, **kwargs)
    torch.manual_seed(0)
    got = ours.generate(**enc, **kwargs)
    width = enc.input_ids.shape[1]
    assert got.shape == ref.shape == (6, width + 6)
    # rows 0-2 continue the first input, rows 3-5 the second (transformers' layout)
    assert torch.equal(got[:, :width], ref[:, :width])
    assert torch.equal(got[:, :width], enc.input_ids.repeat_interleave(3, dim=0))
    assert len({tuple(row) for row in got[:3, width:].tolist()}) > 1  # independent samples
    torch.manual_seed(0)
    assert torch.equal(ours.generate(**enc, **kwargs), got)  # seeded: repeatable
    # a request seed gives each of the n copies its own stream (seed + k), still repeatable
    seeded = ours.generate(**enc, **kwargs, seed=7)
    assert len({tuple(row) for row in seeded[:3, width:].tolist()}) > 1
    assert torch.equal(ours.generate(**enc, **kwargs, seed=7), seeded)


def test_return_dict_scores_and_logits_equal_transformers(ours, hf):
    hf_model, tok = hf
    ids = tok(PROMPT, return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True,
                  output_logits=True)
    ref = hf_generate(hf_model, ids, **kwargs)
    got = ours.generate(ids, **kwargs)
    assert torch.equal(got.sequences, ref.sequences) and torch.equal(got["sequences"], got[0])
    assert len(got.scores) == len(ref.scores) == 8 and len(got.logits) == 8
    diff_scores = max((g - r).abs().max().item() for g, r in zip(got.scores, ref.scores))
    diff_logits = max((g - r).abs().max().item() for g, r in zip(got.logits, ref.logits))
    assert got.scores[0].shape == ref.scores[0].shape == (1, hf_model.config.vocab_size)
    assert diff_scores <= 1e-3 and diff_logits <= 1e-3, (diff_scores, diff_logits)
    assert list(got.keys()) == ["sequences", "scores", "logits"]
    assert got.sequences_scores is None  # not a beam search


def test_return_dict_with_processors_scores_equal_transformers(ours, hf):
    """The processed scores differ from the raw logits when a processor acts (here a repetition
    penalty and a suppressed token), exactly as transformers records them."""
    hf_model, tok = hf
    ids = tok(PROMPT, return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_scores=True,
                  output_logits=True, repetition_penalty=1.3, suppress_tokens=[28])
    ref = hf_generate(hf_model, ids, **kwargs)
    got = ours.generate(ids, **kwargs)
    assert torch.equal(got.sequences, ref.sequences)
    finite = [(g, r) for g, r in zip(got.scores, ref.scores)]
    for g, r in finite:
        assert torch.equal(torch.isinf(g), torch.isinf(r))
        mask = ~torch.isinf(r)
        assert (g[mask] - r[mask]).abs().max().item() <= 1e-3
    assert not torch.equal(got.scores[0], got.logits[0])


@pytest.mark.parametrize("stop", ["green", ["black", " user"], "\n\n"])
def test_stop_strings_equal_transformers(ours, hf, stop):
    hf_model, tok = hf
    ids = tok(PROMPT, return_tensors="pt").input_ids
    ref = hf_generate(hf_model, ids, max_new_tokens=30, stop_strings=stop, tokenizer=tok)
    assert ref.shape[1] < ids.shape[1] + 30  # it did stop on the string
    assert torch.equal(ours.generate(ids, max_new_tokens=30, stop_strings=stop, tokenizer=tok), ref)
    assert torch.equal(ours.generate(ids, max_new_tokens=30, stop_strings=stop), ref)  # own tokenizer


def test_stop_string_naming_a_special_token_equals_transformers(ours, hf):
    """transformers matches stop strings on the tokens' text, special tokens included. With EOS set
    elsewhere, "<|im_end|>" ends the reply only as a stop string."""
    hf_model, tok = hf
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)
    kwargs = dict(max_new_tokens=40, stop_strings="<|im_end|>", eos_token_id=0, pad_token_id=0)
    ref = hf_generate(hf_model, **chat, tokenizer=tok, **kwargs)
    assert ref[0, -1].item() == IM_END and ref.shape[1] < chat["input_ids"].shape[1] + 40
    assert torch.equal(ours.generate(**chat, **kwargs), ref)


# ---------------------------------------------------------------- guards


def test_default_length_warning(ours, hf):
    _, tok = hf
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with pytest.warns(DefaultLengthWarning, match="default limit of 20 new tokens"):
        out = ours.generate(ids)
    assert out.shape[1] == ids.shape[1] + 20
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DefaultLengthWarning)
        ours.generate(ids, max_new_tokens=20)  # the limit was chosen
        ours.generate(ids, max_length=ids.shape[1] + 20)
        short = ours.generate(**chat)  # the default applies but the reply ended at EOS first
    assert short[0, -1].item() == IM_END and short.shape[1] < chat["input_ids"].shape[1] + 20


@pytest.fixture(scope="module")
def eos_omitted_dir(hf_smollm2_dir, tmp_path_factory):
    """SmolLM2 whose generation_config.json and tokenizer say EOS = <|endoftext|> only, so nothing names
    the chat template's <|im_end|> (weights and tokenizer.json linked)."""
    path = tmp_path_factory.mktemp("smollm2_eos")
    for item in hf_smollm2_dir.iterdir():
        if item.name not in ("generation_config.json", "tokenizer_config.json"):
            (path / item.name).symlink_to(item)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": ENDOFTEXT, "pad_token_id": IM_END}))
    tokenizer_config = json.loads((hf_smollm2_dir / "tokenizer_config.json").read_text())
    tokenizer_config["eos_token"] = "<|endoftext|>"
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def _lint_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "end-of-turn" in str(w.message)]


LINT = r"omits the chat template's end-of-turn token '<\|im_end\|>'"


def test_eos_lint_adds_the_end_of_turn_token_to_the_compat_model(eos_omitted_dir, smollm2_gguf, hf):
    with pytest.warns(UserWarning, match=LINT):
        model = AutoModelForCausalLM.from_pretrained(str(eos_omitted_dir), device_map="cpu")
    assert model.generation_config.eos_token_ids == [ENDOFTEXT, IM_END]
    _, tok = hf
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)
    out = model.generate(**chat, max_new_tokens=40)
    assert out[0, -1].item() == IM_END and out.shape[1] < chat["input_ids"].shape[1] + 40  # the turn ended it
    with warnings.catch_warnings(record=True) as record:  # SmolLM2's own config names <|im_end|>
        warnings.simplefilter("always")
        plain = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf), device_map="cpu")
    assert not _lint_warnings(record) and plain.generation_config.eos_token_ids == [IM_END]


def test_eos_lint_in_the_offline_api(eos_omitted_dir, smollm2_gguf):
    with pytest.warns(UserWarning, match=LINT):
        llm = LLM(str(eos_omitted_dir))
    assert llm.stop_token_ids == [ENDOFTEXT, IM_END]
    assert IM_END in llm.sampling_params().stop_token_ids
    (done,) = llm.generate([llm.chat_prompt([{"role": "user", "content": "Say hi."}])],
                           SamplingParams(temperature=0, max_tokens=60))
    assert done.finish_reason == "eos" and done.token_ids[-1] == IM_END
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plain = LLM(str(smollm2_gguf))
    assert not _lint_warnings(record) and plain.stop_token_ids == [IM_END]


def test_llm_sampling_params_use_the_shared_mapping(smollm2_gguf, tmp_path):
    llm = LLM(str(smollm2_gguf))
    llm.generation_defaults = {"do_sample": True, "temperature": 0.6, "repetition_penalty": 1.2, "max_length": 9}
    params = llm.sampling_params()
    assert (params.temperature, params.top_k, params.repetition_penalty) == (0.6, 50, 1.2)
    assert params.max_tokens == 20  # max_length is a total: unknown before the prompt, so not used
    assert params.stop_token_ids == llm.stop_token_ids
    # SamplingParams names apply as given; transformers names go through the mapping
    assert llm.sampling_params(temperature=0.0, max_tokens=5).is_greedy
    assert llm.sampling_params(max_new_tokens=7, stop_strings="x").max_tokens == 7
    assert llm.sampling_params(stop_strings="x").stop == ["x"]
    with pytest.raises(ValueError, match="repetition_penalty"):
        llm.sampling_params(repetition_penalty=-1.0)
    assert math.isclose(llm.sampling_params(top_p=0.5).top_p, 0.5)
