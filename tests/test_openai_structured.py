"""Structured outputs end to end (issue 14): `response_format` through the official `openai` SDK
and `sampling.guided` through the gRPC client, against a real `gptq-gateway serve` process (the
SmolLM2 4-bit checkpoint on CPU) and a real `gptq-gateway openai` process in front of it.

Every schema here bounds its strings, arrays and numbers, so that a 135M model closes the JSON
well within max_tokens; the answers must parse and validate with `jsonschema` every time.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import openai
import pytest
from fixtures_grpc import ServedGateway, start_gateway
from fixtures_openai import ServedShim, shim_in_front

from gateway.client import InvalidArgumentError
from gateway.proto import pb2

pytestmark = pytest.mark.slow

MODEL = "smollm2-w4"
MAX_TOKENS = 160
ASK = [
    {"role": "system", "content": "You answer with JSON only."},
    {"role": "user", "content": "Describe a person who lives in Paris and likes two colors."},
]

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested_object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 16},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "array_of_enums": {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["colors"],
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "height_m": {"type": "number", "minimum": 1.2, "maximum": 2.3},
            "member": {"type": "boolean"},
        },
        "required": ["age", "height_m", "member"],
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "pets": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "kind": {"type": "string", "enum": ["cat", "dog"]},
                        "legs": {"type": "integer", "minimum": 0, "maximum": 4},
                    },
                    "required": ["kind", "legs"],
                },
                "maxItems": 2,
            },
            "owner": {"type": "string", "maxLength": 12},
        },
        "required": ["pets", "owner"],
    },
}


@pytest.fixture(scope="module")
def gateway(
    smollm2_w4_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedGateway]:
    served = start_gateway(
        smollm2_w4_checkpoint,
        tmp_path_factory.mktemp("structured-grpc"),
        extra_args=["--max-num-seqs", "4", "--max-model-len", "512", "--model-name", MODEL],
    )
    yield served
    served.stop()


@pytest.fixture(scope="module")
def shim(gateway: ServedGateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedShim]:
    yield from shim_in_front(gateway, tmp_path_factory.mktemp("structured-shim"))


@pytest.fixture(scope="module")
def client(shim: ServedShim) -> Iterator[openai.OpenAI]:
    with shim.openai_client() as sdk:
        yield sdk


def schema_format(name: str, schema: dict[str, Any] | None, strict: bool = True) -> dict:
    spec: dict[str, Any] = {"name": name, "strict": strict}
    if schema is not None:
        spec["schema"] = schema
    return {"type": "json_schema", "json_schema": spec}


# ----------------------------------------------------------------------------- response_format


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_chat_answers_validate_against_the_schema(client: openai.OpenAI, name: str) -> None:
    schema = SCHEMAS[name]
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=MAX_TOKENS,
        temperature=0,
        response_format=schema_format(name, schema),
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_sampled_and_streamed_answers_validate(client: openai.OpenAI) -> None:
    schema = SCHEMAS["bounded_numbers"]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=MAX_TOKENS,
        temperature=1.0,
        seed=3,
        n=2,
        stream=True,
        response_format=schema_format("numbers", schema, strict=False),
    )
    texts = ["", ""]
    reasons: list[str | None] = [None, None]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert reasons == ["stop", "stop"], texts
    for text in texts:
        jsonschema.validate(json.loads(text), schema)


def test_json_object_and_schemaless_json_schema_give_objects(client: openai.OpenAI) -> None:
    for response_format in ({"type": "json_object"}, schema_format("anything", None)):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            max_tokens=MAX_TOKENS,
            temperature=0,
            response_format=response_format,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content or ""), dict)


def test_completions_take_response_format(client: openai.OpenAI) -> None:
    schema = SCHEMAS["array_of_enums"]
    reply = client.completions.create(
        model=MODEL,
        prompt="Favourite colors as JSON:",
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"response_format": schema_format("colors", schema)},
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].text), schema)
    plain = client.completions.create(
        model=MODEL,
        prompt="Favourite colors as JSON:",
        max_tokens=4,
        temperature=0,
        extra_body={"response_format": {"type": "text"}},
    )
    assert plain.choices[0].finish_reason == "length"


def test_constrained_request_shares_a_batch_with_unconstrained_ones(shim: ServedShim) -> None:
    plain = {"model": MODEL, "messages": ASK, "max_tokens": 24, "temperature": 0}
    schema = SCHEMAS["nested_object"]

    async def scenario() -> tuple[list[str], list[str]]:
        async with shim.async_openai_client() as sdk:
            alone = await asyncio.gather(*(sdk.chat.completions.create(**plain) for _ in range(2)))
            constrained = sdk.chat.completions.create(
                **{**plain, "max_tokens": MAX_TOKENS},
                response_format=schema_format("person", schema),
            )
            together = await asyncio.gather(
                constrained, *(sdk.chat.completions.create(**plain) for _ in range(2))
            )
        return (
            [r.choices[0].message.content or "" for r in alone],
            [r.choices[0].message.content or "" for r in together],
        )

    alone, together = asyncio.run(scenario())
    jsonschema.validate(json.loads(together[0]), schema)
    # Greedy decoding is batch-invariant: the constrained row changed nobody else's tokens.
    assert together[1:] == alone


@pytest.mark.parametrize(
    ("response_format", "reason"),
    [
        ("json", "must be an object"),
        ({"type": "xml"}, "type must be one of"),
        ({"type": "json_object", "schema": {}}, "unknown field"),
        ({"type": "json_schema"}, "json_schema must be an object"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "name is required"),
        ({"type": "json_schema", "json_schema": {"name": "has space"}}, "name is required"),
        ({"type": "json_schema", "json_schema": {"name": "a", "strict": "yes"}}, "strict"),
        ({"type": "json_schema", "json_schema": {"name": "a", "extra": 1}}, "unknown field"),
        (schema_format("a", {"type": "florp"}), "not a valid JSON Schema"),
        (schema_format("a", {"type": "string", "minLength": -1}), "not a valid JSON Schema"),
        # Valid JSON Schema the grammar library refuses: the engine's reason comes back.
        (schema_format("a", {"type": "integer", "minimum": 5, "maximum": 1}), "minimum"),
        (schema_format("a", {"$ref": "#/$defs/missing"}), "$defs"),
        # Valid, but a keyword the library would not enforce: refused, not ignored.
        (schema_format("a", {"properties": {"n": {"not": {"const": 3}}}}), "not supported"),
    ],
)
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_bad_response_formats_are_400_naming_response_format(
    client: openai.OpenAI, response_format: Any, reason: str, endpoint: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        if endpoint == "chat":
            client.chat.completions.create(
                model=MODEL,
                messages=ASK,
                max_tokens=4,
                extra_body={"response_format": response_format},
            )
        else:
            client.completions.create(
                model=MODEL,
                prompt="x",
                max_tokens=4,
                extra_body={"response_format": response_format},
            )
    error = caught.value
    assert error.status_code == 400 and error.param == "response_format", error.message
    assert reason in error.message and "sampling.guided" not in error.message


# ----------------------------------------------------------------------------- gRPC


def test_grpc_guided_regex_grammar_and_schema(gateway: ServedGateway) -> None:
    schema = SCHEMAS["bounded_numbers"]
    cases = [
        (pb2.GuidedDecoding(regex=r"\+33 [0-9]{2}( [0-9]{2}){4}"), None),
        (pb2.GuidedDecoding(grammar='start: "yes" | "no"'), None),
        (pb2.GuidedDecoding(json_schema=json.dumps(schema)), schema),
        (pb2.GuidedDecoding(json_object=True), {"type": "object"}),
    ]
    with gateway.client() as grpc_client:
        for guided, expected in cases:
            chunks = list(
                grpc_client.generate(
                    messages=ASK, max_tokens=MAX_TOKENS, temperature=0.0, guided=guided
                )
            )
            text = "".join(chunk.text for chunk in chunks)
            assert chunks[-1].finish_reason == "stop", text
            kind = guided.WhichOneof("kind")
            if kind == "regex":
                assert re.fullmatch(guided.regex, text), text
            elif kind == "grammar":
                assert text in ("yes", "no")
            else:
                jsonschema.validate(json.loads(text), expected)


@pytest.mark.parametrize(
    ("guided", "reason"),
    [
        (pb2.GuidedDecoding(), "set one of"),
        (pb2.GuidedDecoding(regex="a(b"), "parenthesis"),
        (pb2.GuidedDecoding(regex=""), "must not be empty"),
        (pb2.GuidedDecoding(json_schema="{not json"), "not valid JSON"),
        (pb2.GuidedDecoding(json_schema='{"type": "florp"}'), "florp"),
        (pb2.GuidedDecoding(json_object=False), "json_object must be true"),
        (pb2.GuidedDecoding(grammar="start: missing_rule"), "unknown name"),
    ],
)
def test_grpc_bad_guided_is_invalid_argument(
    gateway: ServedGateway, guided: pb2.GuidedDecoding, reason: str
) -> None:
    with gateway.client() as grpc_client, pytest.raises(InvalidArgumentError) as caught:
        list(grpc_client.generate(prompt="x", max_tokens=4, guided=guided))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.field == "sampling.guided"
    assert caught.value.message.startswith("sampling.guided:") and reason in caught.value.message
