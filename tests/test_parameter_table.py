"""sampling_params.RANGES is the one table of parameter ranges: every face maps its names onto it and
its errors name the face's own parameter."""

from __future__ import annotations

import pytest

from tokenloom.generation_settings import TRANSFORMERS_NAMES, resolve
from tokenloom.sampling_params import (
    MAX_SEED,
    RANGES,
    ParameterError,
    SamplingParams,
    build_sampling_params,
    check,
)


def test_seed_is_bounded_by_what_a_torch_generator_takes():
    assert SamplingParams(seed=MAX_SEED - 1).seed == 2**63 - 1
    for bad in (2**63, 2**64, -1):
        with pytest.raises(ParameterError, match=r"seed must be an integer in \[0, 2\*\*63\)") as info:
            SamplingParams(seed=bad)
        assert info.value.param == "seed" and info.value.value == bad
    with pytest.raises(ParameterError, match="seed"):
        resolve({"seed": 2**64})  # the transformers face shares the bound


def test_a_parameter_error_carries_name_value_range_and_renders_under_a_face_name():
    with pytest.raises(ParameterError) as info:
        SamplingParams(top_p=1.5)
    error = info.value
    assert (error.param, error.value, error.allowed) == ("top_p", 1.5, "in (0, 1]")
    assert isinstance(error, ValueError)
    assert str(error.renamed("--top-p")) == "--top-p must be in (0, 1], got 1.5"
    both = pytest.raises(ParameterError, SamplingParams, min_tokens=5, max_tokens=3).value
    renamed = both.renamed({"min_tokens": "min_new_tokens", "max_tokens": "max_new_tokens"})
    assert str(renamed) == "min_new_tokens (5) must not exceed max_new_tokens (3)"
    assert renamed.param == "min_new_tokens"


def test_build_sampling_params_names_the_face_parameter():
    with pytest.raises(ParameterError, match=r"^max_completion_tokens must be >= 1, got 0$"):
        build_sampling_params({"max_tokens": 0}, {"max_tokens": "max_completion_tokens"})
    with pytest.raises(ParameterError, match=r"^temperature must be a finite number >= 0, got -1$"):
        build_sampling_params({"temperature": -1}, {"max_tokens": "max_new_tokens"})  # unmapped: own name


@pytest.mark.parametrize(("name", "entry"), sorted(TRANSFORMERS_NAMES.items()))
def test_every_transformers_range_is_the_tables(name, entry):
    """The transformers face has no range of its own: its error shows the table's allowed text."""
    probe = [""] if entry == "stop" else "nope"  # a string is the wrong type for every other entry
    with pytest.raises(ParameterError) as info:
        resolve({name: probe})
    assert info.value.param == name
    assert RANGES[entry].allowed in str(info.value)
    with pytest.raises(ParameterError):
        check(entry, probe)


def test_cli_flags_are_named_in_their_errors(capsys):
    from tokenloom.cli import main

    assert main(["generate", "hi", "--top-p", "2"]) == 2  # a usage error, before any model is looked for
    assert "--top-p must be in (0, 1], got 2.0" in capsys.readouterr().err
    assert main(["generate", "hi", "--seed", str(2**64)]) == 2
    assert "--seed must be an integer in [0, 2**63)" in capsys.readouterr().err
