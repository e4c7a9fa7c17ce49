"""Errors the server returns on purpose: a gRPC status, a stable code, and the field at fault.

The status and message go in the usual places; `gptqgw-error-code` and `gptqgw-error-field` go in
trailing metadata so that clients (gateway/client.py, hence the REST shim) can map errors without
parsing messages. proto/gptqgw/v1/gateway.proto documents the codes.
"""

from __future__ import annotations

import grpc

from gateway.proto import pb2

ERROR_CODE_KEY = "gptqgw-error-code"
ERROR_FIELD_KEY = "gptqgw-error-field"
SAMPLING_FIELDS = frozenset(pb2.SamplingParams.DESCRIPTOR.fields_by_name)


class RequestError(Exception):
    """A request the server refuses; raised anywhere under a handler, turned into a status there."""

    def __init__(
        self, status: grpc.StatusCode, message: str, error_code: str, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.field = field

    def __str__(self) -> str:
        return self.message

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        entries = [(ERROR_CODE_KEY, self.error_code)]
        if self.field:
            entries.append((ERROR_FIELD_KEY, self.field))
        return tuple(entries)


def invalid_argument(
    field: str, message: str, error_code: str = "invalid_parameter"
) -> RequestError:
    """INVALID_ARGUMENT whose message starts with the field name, so a person sees it at once."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", error_code, field)


def unavailable(message: str, error_code: str) -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, message, error_code)


def from_engine_error(exc: BaseException, input_field: str = "prompt") -> RequestError | None:
    """The status for an exception the engine raises at submit time; None for anything else.

    `input_field` is the request's input (prompt, messages or token_ids), named when the input
    alone is over the context length.

    Matched by class name so this module need not import the engine (and torch) to be used by
    the stand-in engine of the benchmark, which raises the same names.
    """
    name = type(exc).__name__
    if name == "InvalidParameter":
        field = getattr(exc, "field", None) or "sampling"
        message = getattr(exc, "message", None) or str(exc)
        return invalid_argument(_request_field(field, input_field), message)
    if name == "ContextLengthExceeded":
        prompt = getattr(exc, "prompt_tokens", None)
        wanted = getattr(exc, "max_tokens", None)
        limit = getattr(exc, "context_length", None)
        if None in (prompt, wanted, limit):
            detail = str(exc)
        else:
            detail = (
                f"the prompt ({prompt} tokens) plus max_tokens ({wanted}) is {prompt + wanted} "
                f"tokens, over the model's context length of {limit}"
            )
        too_long_alone = prompt is not None and limit is not None and prompt >= limit
        field = input_field if too_long_alone else "sampling.max_tokens"
        return invalid_argument(
            field, f"context_length_exceeded: {detail}", error_code="context_length_exceeded"
        )
    if name == "KVCacheTooSmall":
        return invalid_argument(
            "sampling.max_tokens", f"kv_cache_too_small: {exc}", error_code="kv_cache_too_small"
        )
    if name == "EngineOverloaded":
        return RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the engine's waiting queue is full ({exc}); retry later",
            "overloaded",
        )
    if name == "EngineStopped":
        return unavailable(f"the engine has stopped ({exc})", "engine_stopped")
    return None


def _request_field(field: str, input_field: str) -> str:
    """The engine names SamplingParams attributes and `prompt_token_ids`; the request nests the
    former under `sampling` and calls the latter by the input the client used."""
    if field in SAMPLING_FIELDS:
        return f"sampling.{field}"
    if field == "prompt_token_ids":
        return input_field
    return field
