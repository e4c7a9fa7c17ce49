"""`response_format` in the REST shim, without servers: shapes, the upstream `sampling.guided`
it becomes, and the name upstream errors come back under (the end-to-end tests are in
test_openai_structured.py)."""

from __future__ import annotations

import json

import grpc
import pytest
from pydantic import ValidationError

from gateway.client import InvalidArgumentError
from gateway.openai_api.errors import from_gateway_error, validation_error
from gateway.openai_api.schemas import ChatCompletionRequest, CompletionRequest
from gateway.openai_api.translate import (
    chat_calls,
    chat_param_names,
    completion_calls,
    completion_param_names,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def json_schema(**spec: object) -> dict:
    return {"type": "json_schema", "json_schema": spec}


@pytest.mark.parametrize(
    ("response_format", "guided"),
    [
        (None, None),
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"json_object": True}),
        (json_schema(name="a", schema=SCHEMA, strict=True), {"json_schema": json.dumps(SCHEMA)}),
        (json_schema(name="a", description="d", strict=False), {"json_object": True}),
    ],
)
def test_response_format_becomes_sampling_guided(response_format: object, guided: object) -> None:
    chat = ChatCompletionRequest.model_validate({**CHAT, "response_format": response_format})
    [call] = chat_calls(chat, max_tokens=5)
    assert call.sampling["guided"] == guided
    completion = CompletionRequest.model_validate(
        {**COMPLETION, "response_format": response_format}
    )
    [call] = completion_calls(completion)
    assert call.sampling["guided"] == guided
    # The upstream's errors on sampling.guided are about response_format.
    expected = {"sampling.guided": "response_format"} if guided else {}
    assert {k: v for k, v in chat_param_names(chat).items() if k == "sampling.guided"} == expected
    names = completion_param_names(completion)
    assert {k: v for k, v in names.items() if k == "sampling.guided"} == expected


@pytest.mark.parametrize(
    "response_format",
    [
        "json",
        [],
        {},
        {"type": "json"},
        {"type": "text", "json_schema": {"name": "a"}},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": "a"},
        json_schema(schema=SCHEMA),
        json_schema(name=""),
        json_schema(name="x" * 65),
        json_schema(name="a", strict=1),
        json_schema(name="a", description=3),
        json_schema(name="a", schema=[1]),
        json_schema(name="a", schema={"type": 5}),
        json_schema(name="a", extra=True),
    ],
)
@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
def test_bad_shapes_are_400_naming_response_format(response_format: object, model: type) -> None:
    base = CHAT if model is ChatCompletionRequest else COMPLETION
    with pytest.raises(ValidationError) as caught:
        model.model_validate({**base, "response_format": response_format})
    error = validation_error(caught.value.errors())
    assert (error.status, error.param) == (400, "response_format"), error.message
    assert error.message.startswith("response_format: ")


def test_upstream_guided_error_is_renamed() -> None:
    body = ChatCompletionRequest.model_validate(
        {**CHAT, "response_format": json_schema(name="a", schema=SCHEMA)}
    )
    upstream = InvalidArgumentError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.guided: json_schema: Invalid range",
        "invalid_parameter",
        "sampling.guided",
    )
    error = from_gateway_error(upstream, chat_param_names(body))
    assert (error.status, error.param) == (400, "response_format")
    assert error.message == "response_format: json_schema: Invalid range"


def test_openapi_schema_documents_response_format() -> None:
    from gateway.openai_api import ShimConfig, create_app

    schema = create_app(ShimConfig(upstream="localhost:1")).openapi()
    text = json.dumps(schema)
    for name in ("TextFormat", "JSONObjectFormat", "JSONSchemaFormat", "JSONSchemaSpec"):
        assert name in schema["components"]["schemas"], name
    assert '"schema"' in text
