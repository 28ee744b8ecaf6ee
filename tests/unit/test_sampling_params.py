"""SamplingParams validation: bad values raise ValueError with a clear message."""

import math

import pytest

from tokenmill import SamplingParams
from tokenmill.sampling_params import StructuredOutputsParams


@pytest.mark.parametrize("kwargs, fragment", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"n": 0}, "n must"),
    ({"n": 10_000}, "n must"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"prompt_logprobs": 100}, "prompt_logprobs"),
    ({"seed": 2**70}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-3]}, "stop_token_ids"),
    ({"logit_bias": {5: 500.0}}, "logit_bias"),
    ({"logit_bias": {5: math.nan}}, "logit_bias"),
])
def test_invalid_values_raise(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        SamplingParams(**kwargs)


def test_defaults_and_normalisation():
    p = SamplingParams(stop="END", top_k=-1)
    assert p.stop == ["END"] and p.top_k == 0
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(repetition_penalty=1.2).needs_penalties
    assert not SamplingParams().needs_penalties


def test_boundaries_accepted():
    SamplingParams(top_p=1.0, min_p=1.0, logprobs=20, min_tokens=5, max_tokens=5, seed=-(2**63))


def test_structured_outputs_needs_exactly_one():
    with pytest.raises(ValueError):
        StructuredOutputsParams()
    with pytest.raises(ValueError):
        StructuredOutputsParams(regex="a+", choice=["x"])
    assert StructuredOutputsParams(choice=["yes", "no"]).choice == ["yes", "no"]


@pytest.mark.parametrize("kwargs", [
    {"top_k": 2**63}, {"stop_token_ids": [2**64]}, {"logit_bias": {2**64: 1.0}}, {"max_tokens": 2**63},
    {"min_tokens": 2**63}, {"seed": True}, {"n": True}, {"max_tokens": 1.5},
])
def test_integers_are_64_bit(kwargs):
    """msgpack carries 64 bits: wider values are a ValueError here, not an encoding failure later."""
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [{"choice": "abc"}, {"json_object": "yes"}, {"regex": 5}, {"grammar": 7},
                                    {"json": 3}, {"choice": ["a", 1]}])
def test_structured_outputs_fields_are_typed(kwargs):
    with pytest.raises(ValueError):
        StructuredOutputsParams(**kwargs)


def test_child_seeds_wrap_within_64_bits():
    from tokenmill.sampling_params import INT64_MAX, INT64_MIN, wrap_int64
    assert wrap_int64(INT64_MAX + 1) == INT64_MIN and wrap_int64(5) == 5 and wrap_int64(INT64_MIN - 1) == INT64_MAX
