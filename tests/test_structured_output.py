"""Structured output: JSON schema, regex, choice and grammar constraints as a token mask in the sampler,
on every face (library, transformers face, OpenAI server, CLI). The real SmolLM2 model is loaded once
for the module; outputs are checked by jsonschema / re, never against hand-written outputs."""

from __future__ import annotations

import gc
import json
import re

import pytest
import torch

from tokenloom.engine.beam_search import BeamSearchParams
from tokenloom.generation_settings import to_sampling_params
from tokenloom.sampling.grammar import GrammarMask, compile_grammar, num_live_matchers
from tokenloom.sampling.sampler import SamplingBatch, process_logits
from tokenloom.sampling_params import ParameterError, SamplingParams

jsonschema = pytest.importorskip("jsonschema")

MAX_TOKENS = 96


def _schemas() -> list[dict]:
    """50 schemas built from the shapes the issue names: nested objects, arrays, enums, numbers with
    ranges, required fields, regex patterns. Strings and arrays are bounded so that a sampled output
    can complete within MAX_TOKENS."""
    word = {"type": "string", "maxLength": 12}
    code = {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}
    color = {"type": "string", "enum": ["red", "green", "blue"]}
    age = {"type": "integer", "minimum": 0, "maximum": 120}
    score = {"type": "number", "minimum": -5, "maximum": 5}
    flag = {"type": "boolean"}
    level = {"enum": [1, 2, 3, "max"]}
    tags = {"type": "array", "items": color, "minItems": 1, "maxItems": 3}
    small = {"type": "array", "items": {"type": "integer", "minimum": 10, "maximum": 99}, "maxItems": 3}
    parts = [("name", word), ("code", code), ("color", color), ("age", age), ("score", score), ("ok", flag),
             ("level", level), ("tags", tags), ("counts", small)]
    schemas: list[dict] = []
    for i in range(50):
        chosen = [parts[(i + k * 3) % len(parts)] for k in range(1 + i % 3)]
        props = dict(chosen)
        schema: dict = {"type": "object", "properties": props, "additionalProperties": False}
        if i % 2 == 0:
            schema["required"] = list(props)
        else:
            schema["required"] = list(props)[:1]
        if i % 5 == 0:  # nested object
            inner = {"type": "object", "properties": {"city": word, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                     "required": ["city", "zip"], "additionalProperties": False}
            schema["properties"]["address"] = inner
            schema["required"].append("address")
        if i % 7 == 3:  # an array of objects
            schema = {"type": "array", "items": schema, "minItems": 1, "maxItems": 2}
        if i % 11 == 5:  # a bare enum or a bounded integer at the top
            schema = level if i % 2 else age
        schemas.append(schema)
    return schemas


SCHEMAS = _schemas()


# ---- parameters (no model) -------------------------------------------------------------------


def test_one_constraint_at_most_and_each_checked():
    with pytest.raises(ParameterError, match="only one of json_schema, regex, choice, grammar"):
        SamplingParams(json_schema={"type": "object"}, regex="a+")
    with pytest.raises(ParameterError, match="json_schema is not valid JSON"):
        SamplingParams(json_schema="{not json")
    with pytest.raises(ParameterError, match="choice must be a non-empty list"):
        SamplingParams(choice=[])
    assert SamplingParams(json_schema='{"type": "integer"}').json_schema == {"type": "integer"}
    assert SamplingParams(choice=("a", "b")).structured == ("choice", ["a", "b"])


def test_grammar_with_beam_search_is_refused():
    with pytest.raises(ParameterError, match="not supported with beam search"):
        BeamSearchParams(num_beams=2, sampling_params=SamplingParams(regex="a+"))
    with pytest.raises(ParameterError, match="json_schema.*beam search"):
        to_sampling_params({"num_beams": 2, "json_schema": {"type": "object"}})
    assert to_sampling_params({"regex": "[0-9]+"}).regex == "[0-9]+"


# ---- the real model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(smollm2_gguf, one_torch_thread):
    from tokenloom import LLM

    # exact mode: a row's tokens do not depend on the rest of its batch
    llm = LLM(str(smollm2_gguf), dtype="float32")
    yield llm
    llm.close()


def _chat(llm, text: str) -> list[int]:
    return llm.chat_prompt([{"role": "user", "content": text}])


def test_fifty_schemas_sampled_at_temperature_one_give_valid_json(llm):
    prompt = _chat(llm, "Reply with a JSON value.")
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=MAX_TOKENS, json_schema=s) for i, s in enumerate(SCHEMAS)]
    results = llm.generate([prompt] * len(SCHEMAS), params)
    for schema, result in zip(SCHEMAS, results):
        # the grammar completing ends the request
        assert result.finish_reason == "stop", (schema, result.text)
        jsonschema.validate(json.loads(result.text), schema)
    assert len({r.text for r in results}) > 25  # sampled, not one answer forced for every schema
    gc.collect()
    assert num_live_matchers() == 0  # every finished request released its grammar state


def test_regex_and_choice(llm):
    prompt = _chat(llm, "What is the phone number and is it valid?")
    pattern = r"\+[0-9]{2} [0-9]{3}-[0-9]{4}"
    regex, choice = llm.generate([prompt, prompt], [
        SamplingParams(temperature=1.0, seed=1, max_tokens=40, regex=pattern),
        SamplingParams(temperature=1.0, seed=2, max_tokens=40, choice=["valid", "invalid", "unknown"]),
    ])
    assert re.fullmatch(pattern, regex.text) and regex.finish_reason == "stop"
    assert choice.text in ("valid", "invalid", "unknown") and choice.finish_reason == "stop"


def test_a_lark_and_a_gbnf_grammar(llm):
    prompt = _chat(llm, "Count.")
    lark, gbnf = llm.generate([prompt, prompt], [
        SamplingParams(temperature=1.0, seed=3, max_tokens=30, grammar='start: "n=" NUM ";"\nNUM: /[1-9][0-9]?/'),
        SamplingParams(temperature=1.0, seed=4, max_tokens=30, grammar='root ::= "x" ("ab" | "cd") "!"'),
    ])
    assert re.fullmatch(r"n=[1-9][0-9]?;", lark.text) and lark.finish_reason == "stop"
    assert re.fullmatch(r"x(ab|cd)!", gbnf.text) and gbnf.finish_reason == "stop"


def test_unconstrained_rows_keep_their_greedy_tokens(llm):
    prompts = [_chat(llm, "Name a fruit."), _chat(llm, "Say hello in French."), _chat(llm, "Describe a person.")]
    free = SamplingParams(temperature=0.0, max_tokens=24)
    constrained = SamplingParams(temperature=0.0, max_tokens=24, json_schema={
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 10}}, "required": ["name"]})
    without = llm.generate(prompts, [free, free, free])
    with_grammar = llm.generate(prompts, [free, free, constrained])
    assert [r.token_ids for r in with_grammar[:2]] == [r.token_ids for r in without[:2]]
    assert with_grammar[2].token_ids != without[2].token_ids
    jsonschema.validate(json.loads(with_grammar[2].text), constrained.json_schema)


def test_a_constrained_row_beside_speculating_rows_decodes_one_token_a_step(llm):
    """Prompt lookup proposes for the free row (its prompt asks to repeat a text); a row with a grammar
    takes no proposals (its mask at a proposed position would need the grammar advanced over the
    proposals first), and its output is valid."""
    from tokenloom.speculative_config import SpeculativeConfig

    text = "one two three four five six seven eight nine ten"
    prompt = _chat(llm, f"Repeat exactly: {text} {text}")
    spec = SpeculativeConfig(method="prompt_lookup", num_speculative_tokens=4)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    stats = llm.engine.speculative_stats
    constrained = SamplingParams(temperature=0.0, max_tokens=32, speculative=spec, json_schema=schema)
    proposed = stats.num_proposed_tokens
    (alone,) = llm.generate([prompt], constrained)
    assert stats.num_proposed_tokens == proposed  # nothing proposed for the constrained row
    free, together = llm.generate([prompt, prompt], [SamplingParams(temperature=0.0, max_tokens=32, speculative=spec),
                                                     constrained])
    assert stats.num_proposed_tokens > proposed  # the free row did speculate
    (plain,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=32))
    assert free.token_ids == plain.token_ids
    assert together.token_ids == alone.token_ids and together.finish_reason == "stop"
    jsonschema.validate(json.loads(together.text), schema)


def test_the_mask_leaves_other_rows_bit_identical_and_allows_only_prefixes(llm):
    tokenizer = llm.tokenizer
    vocab = llm.engine.model.config.vocab_size
    params = SamplingParams(temperature=0.0, choice=["yes", "no"])
    matcher = compile_grammar(params, tokenizer, vocab)
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    rows = [SamplingParams(temperature=0.0), params, SamplingParams(temperature=0.0)]
    plain = process_logits(logits, SamplingBatch.build(rows, [[1]] * 3, [1] * 3, [None] * 3, torch.device("cpu")))
    masked = process_logits(logits, SamplingBatch.build(
        rows, [[1]] * 3, [1] * 3, [None] * 3, torch.device("cpu"), vocab_size=vocab, grammars=[None, matcher, None]))
    assert torch.equal(masked[0], plain[0]) and torch.equal(masked[2], plain[2])
    allowed = torch.isfinite(masked[1]).nonzero()[:, 0].tolist()
    texts = [tokenizer.decode([t]) for t in allowed]
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts), texts
    assert {"yes", "no"} <= set(texts)  # the whole words are single tokens of this vocabulary
    eos = tokenizer.eos_token_id
    assert eos not in allowed  # the grammar is not complete yet
    for token in tokenizer.encode("yes", add_special_tokens=False):
        assert matcher.accept(token)
    mask = GrammarMask.build([matcher], vocab, torch.device("cpu"))
    assert mask is None or mask.allowed_ids(0) in ([], [eos])
    assert matcher.is_terminated


def test_finished_and_aborted_requests_release_their_grammar(llm):
    engine = llm.engine
    prompt = _chat(llm, "JSON please.")
    schema = {"type": "array", "items": {"type": "integer"}}  # unbounded: it runs until aborted
    request_id = engine.add_request(prompt, SamplingParams(temperature=1.0, seed=0, max_tokens=50, json_schema=schema))
    for _ in range(3):
        engine.step()
    assert num_live_matchers() == 1
    engine.abort(request_id)
    assert not engine.has_unfinished()
    gc.collect()
    assert num_live_matchers() == 0


def test_an_invalid_schema_names_the_problem(llm):
    prompt = _chat(llm, "x")
    with pytest.raises(ParameterError, match="json_schema is not valid: .*nonsense"):
        llm.generate(prompt, SamplingParams(json_schema={"type": "nonsense"}))
    with pytest.raises(ParameterError, match="regex is not valid"):
        llm.generate(prompt, SamplingParams(regex="(unclosed"))


# ---- faces -----------------------------------------------------------------------------------


def test_transformers_face_generate_takes_json_schema(smollm2_gguf, one_torch_thread):
    from tokenloom import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf))
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_gguf))
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}, "n": {"type": "integer",
              "minimum": 1, "maximum": 9}}, "required": ["color", "n"], "additionalProperties": False}
    text = tokenizer.apply_chat_template([{"role": "user", "content": "A color and a digit."}],
                                        add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=40, do_sample=True, temperature=1.0, json_schema=schema)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    jsonschema.validate(json.loads(reply), schema)
    out = model.generate(**inputs, max_new_tokens=10, choice=["red", "blue"])
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) in ("red", "blue")


def test_cli_generate_json_schema_file(smollm2_gguf, tmp_path, capsys):
    from tokenloom.cli import main

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 15}}, "required": ["city"],
              "additionalProperties": False}
    path = tmp_path / "city.json"
    path.write_text(json.dumps(schema))
    code = main(["generate", "--chat", "Name a city as JSON.", "--model", str(smollm2_gguf), "--json-schema",
                 str(path), "--temperature", "1.0", "--seed", "5", "-n", "40", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    jsonschema.validate(json.loads(result["text"]), schema)
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "nonsense"}')
    assert main(["generate", "x", "--model", str(smollm2_gguf), "--json-schema", str(bad), "-n", "4"]) != 0
    assert "nonsense" in capsys.readouterr().err


# ---- the OpenAI server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(llm):
    from tests.serving_helpers import start_server

    running = start_server(llm)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
          "age": {"type": "integer", "minimum": 18, "maximum": 99}}, "required": ["name", "age"],
          "additionalProperties": False}


def test_openai_response_format_round_trip(client):
    messages = [{"role": "user", "content": "Invent a person."}]
    reply = client.chat.completions.create(model="smollm2", messages=messages, temperature=1.0, seed=3, max_tokens=60,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "person", "schema": PERSON}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    reply = client.chat.completions.create(model="smollm2", messages=messages, temperature=1.0, seed=4, max_tokens=80,
                                           response_format={"type": "json_object"})
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # an open object may run past max_tokens; what there is must still start an object
        assert reply.choices[0].message.content.startswith("{")


def test_openai_guided_fields(client):
    reply = client.completions.create(model="smollm2", prompt="The answer is", max_tokens=10, temperature=1.0,
                                      extra_body={"guided_choice": ["alpha", "beta"]})
    assert reply.choices[0].text in ("alpha", "beta") and reply.choices[0].finish_reason == "stop"
    reply = client.completions.create(model="smollm2", prompt="Code:", max_tokens=10, temperature=1.0,
                                      extra_body={"guided_regex": "[A-F]{4}"})
    assert re.fullmatch("[A-F]{4}", reply.choices[0].text)
    reply = client.completions.create(model="smollm2", prompt="Person:", max_tokens=60, temperature=1.0,
                                      extra_body={"guided_json": PERSON})
    jsonschema.validate(json.loads(reply.choices[0].text), PERSON)


def test_openai_tools_round_trip(client):
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                              "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
                              "additionalProperties": False}}}
    time_tool = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}}, "required": ["zone"],
        "additionalProperties": False}}}
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(model="smollm2", messages=messages, tools=[weather, time_tool],
                                           tool_choice="required", temperature=1.0, seed=1, max_tokens=80)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(c.type == "function" and c.id for c in calls)
    by_name = {"get_weather": weather, "get_time": time_tool}
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name]["function"]["parameters"])
    reply = client.chat.completions.create(model="smollm2", messages=messages, tools=[weather, time_tool],
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           temperature=1.0, seed=2, max_tokens=80)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), weather["function"]["parameters"])
    # the result goes back to the model as a tool message; the template renders it and the reply is text
    follow = client.chat.completions.create(model="smollm2", messages=[
        *messages, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}], max_tokens=8, temperature=0)
    assert follow.choices[0].message.content and follow.choices[0].message.tool_calls is None


def test_openai_invalid_schema_is_a_400_naming_the_problem(client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "bad", "schema": {"type": "nonsense"}}})
    assert "nonsense" in str(info.value) and "response_format" in str(info.value)
    with pytest.raises(openai.BadRequestError, match="guided_json"):
        client.completions.create(model="smollm2", prompt="x", max_tokens=4,
                                  extra_body={"guided_json": {"type": "object"}, "guided_regex": "a"})


def test_tgi_grammar_json_json_schema_and_regex(server):
    import httpx

    def generate(grammar, **parameters):
        body = {"inputs": "Person:", "parameters": {"max_new_tokens": 60, "do_sample": True, "seed": 5,
                                                     "grammar": grammar, **parameters}}
        return httpx.post(server.url + "/generate", json=body, timeout=120)

    for grammar in ({"type": "json", "value": PERSON}, {"type": "json", "value": json.dumps(PERSON)},
                    {"type": "json_schema", "value": {"name": "person", "schema": PERSON}}):
        reply = generate(grammar, details=True)
        assert reply.status_code == 200, reply.text
        jsonschema.validate(json.loads(reply.json()["generated_text"]), PERSON)
        assert reply.json()["details"]["finish_reason"] == "eos_token"  # TGI's name for a completed grammar
    reply = generate({"type": "regex", "value": "[A-F]{4}"})
    assert re.fullmatch("[A-F]{4}", reply.json()["generated_text"])
    for bad, needle in (({"type": "yaml", "value": "x"}, "grammar.type"), ({"type": "json"}, "grammar must be"),
                        ({"type": "json", "value": "{not json"}, "not valid JSON"),
                        ({"type": "json", "value": {"type": "nonsense"}}, "nonsense")):
        reply = generate(bad)
        assert reply.status_code == 422 and needle in reply.json()["error"], (bad, reply.text)
    assert server.idle()
