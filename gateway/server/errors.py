"""Errors the server returns on purpose: a gRPC status, a stable code, and the field at fault.

The status and message go in the usual places; `gptqgw-error-code` and `gptqgw-error-field` go in
trailing metadata so that clients (gateway/client.py, hence the REST shim) can map errors without
parsing messages. proto/gptqgw/v1/gateway.proto documents the codes.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from gateway.proto import pb2
from gateway.server.logs import RateLimitedLog, printable

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


# ----------------------------------------------------------------------------- wire garbage

MALFORMED_REQUEST = "malformed_request"
_wire_log = logging.getLogger("gateway.server.wire")


class Undecodable:
    """What a tolerant deserializer hands on in place of a message whose bytes do not parse."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def tolerant_deserializer(
    deserialize: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    """`deserialize`, returning Undecodable instead of raising.

    grpc calls the deserializer before the handler, so an exception there (a DecodeError for
    random bytes, a truncated message or invalid UTF-8 in a string field) escapes every handler:
    grpc logs it at ERROR with a traceback and answers UNKNOWN. Deferred to the handler, it
    becomes an ordinary INVALID_ARGUMENT."""
    if deserialize is None:
        return None

    def tolerant(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # whatever the parser raises: the bytes are the client's
            return Undecodable(exc)

    return tolerant


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Answers requests whose bytes do not parse with INVALID_ARGUMENT, logging them at WARNING
    at most once per `log_interval_s` (a client can send garbage as fast as it likes).

    Put it after the ApiKeyInterceptor: a refused call then reads its (ignored) request through
    the tolerant deserializer too, so garbage without a key gets a clean UNAUTHENTICATED."""

    def __init__(
        self,
        on_reject: Callable[[str], None] | None = None,
        log_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_reject = on_reject
        self._log = RateLimitedLog(_wire_log, log_interval_s, clock)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return handler
        return self._checking_handler(handler, handler_call_details.method)

    def _checking_handler(self, handler: grpc.RpcMethodHandler, method: str) -> Any:
        behavior = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # a sync handler (none here): it would not know the marker
        reject = functools.partial(self._reject, method)
        codec = {
            "request_deserializer": tolerant_deserializer(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_unary_request(behavior, reject), **codec)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_unary_request(behavior, reject), **codec)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(_stream_request(behavior, reject), **codec)
        return grpc.stream_stream_rpc_method_handler(_stream_request(behavior, reject), **codec)

    async def _reject(
        self, method: str, bad: Undecodable, context: grpc.aio.ServicerContext
    ) -> None:
        if self._on_reject is not None:
            self._on_reject(method)
        # protobuf's message names the type and the fault ("String field had bad UTF-8").
        reason = str(bad.error) or type(bad.error).__name__
        self._log.warning(
            "refused a request that does not parse",
            method=printable(method),
            error=printable(reason),
            peer=printable(context.peer() or ""),
        )
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request: the message received does not parse ({printable(reason)})",
            trailing_metadata=((ERROR_CODE_KEY, MALFORMED_REQUEST), (ERROR_FIELD_KEY, "request")),
        )


_Reject = Callable[[Undecodable, grpc.aio.ServicerContext], Awaitable[None]]


def _unary_request(behavior: Callable[..., Any], reject: _Reject) -> Callable[..., Any]:
    """`behavior` (async function or async generator) refusing an Undecodable request first."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await reject(request, context)
                return
            # aclosing: a client going away closes this generator, and must close the inner one
            # at once too (Generate cancels its engine request there), not at garbage collection.
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await reject(request, context)
            return None
        return await behavior(request, context)

    return call


def _stream_request(behavior: Callable[..., Any], reject: _Reject) -> Callable[..., Any]:
    """`behavior` reading its requests through a check that refuses the first Undecodable one."""

    async def checked(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Undecodable):
                await reject(request, context)
            yield request

    if inspect.isasyncgenfunction(behavior):

        async def stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with contextlib.aclosing(behavior(checked(requests, context), context)) as out:
                async for response in out:
                    yield response

        return stream

    async def call(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(checked(requests, context), context)

    return call
