"""SamplingParams.validate: every bad value raises InvalidParameter naming its field."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.engine import InvalidParameter, SamplingParams

VOCAB = 100


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", 2.5),
        ("max_tokens", True),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "hot"),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", -1.0),
        ("top_p", float("nan")),
        ("top_k", -1),
        ("top_k", 1.5),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("seed", "42"),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", None),
        ("stop", 5),
        ("stop", [""]),
        ("stop", ["ok", 3]),
        ("stop", ["x"] * 17),
        ("stop", ["y" * 513]),
        ("stop_token_ids", [VOCAB]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["3"]),
        ("stop_token_ids", 3),
        ("logprobs", -1),
        ("logprobs", 21),
        ("logprobs", 1.0),
        ("ignore_eos", "yes"),
        ("min_tokens", -1),
        ("min_tokens", 17),  # more than max_tokens (16)
    ],
)
def test_bad_value_names_its_field(field: str, value: Any) -> None:
    params = SamplingParams(**{field: value})
    with pytest.raises(InvalidParameter) as info:
        params.validate(VOCAB)
    assert info.value.field == field
    assert info.value.message
    assert str(info.value).startswith(f"{field}: ")


def test_defaults_and_edge_values_are_valid() -> None:
    SamplingParams().validate(VOCAB)
    SamplingParams(
        max_tokens=None,
        temperature=0,
        top_p=1.0,
        top_k=0,
        seed=2**64 - 1,
        repetition_penalty=0.5,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        stop="###",
        stop_token_ids=[0, VOCAB - 1],
        logprobs=20,
        ignore_eos=True,
        min_tokens=5,
    ).validate(VOCAB)


def test_json_shaped_values_are_normalised() -> None:
    params = SamplingParams(stop="END", stop_token_ids=[1, 2])
    assert params.stop == ("END",)
    assert params.stop_token_ids == (1, 2)
    assert hash(params) == hash(SamplingParams(stop=["END"], stop_token_ids=(1, 2)))


def test_greedy_flag() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.7, top_k=1).greedy
    assert not SamplingParams(temperature=0.7).greedy
