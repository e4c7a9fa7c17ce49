"""Python client of the gptqgw.v1 gRPC API: `GatewayClient` (sync), `AsyncGatewayClient` (asyncio).

    with GatewayClient("127.0.0.1:50051", api_key="...") as client:
        for chunk in client.generate(prompt="Hello", max_tokens=32, temperature=0):
            print(chunk.text, end="")

`generate` takes exactly one of `prompt=`, `messages=` (a list of {"role", "content"}, plus
"tool_calls" [{"id", "name", "arguments"}], "tool_call_id" and "name" for tool use; `tools=` the
OpenAI tool list, rendered by the chat template) or `token_ids=`, plus any sampling parameter
by its name (see SAMPLING_PARAMETERS), and returns a stream of `Chunk`s; the last one has
`finish_reason`, `usage` and `timings`. Breaking out of the loop, `close()`, or leaving a `with`
block cancels the call, and the server frees the engine slot.

Every failure is a `GatewayError` subclass carrying the gRPC `code`, the server's `message`, and
its stable `error_code` and `field` (from trailing metadata) when it sent them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.proto import pb2, pb2_grpc

ERROR_CODE_KEY = "gptqgw-error-code"
ERROR_FIELD_KEY = "gptqgw-error-field"
SAMPLING_PARAMETERS: tuple[str, ...] = tuple(pb2.SamplingParams.DESCRIPTOR.fields_by_name)
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_FINISH_REASONS = {
    pb2.FINISH_REASON_STOP: "stop",
    pb2.FINISH_REASON_LENGTH: "length",
    pb2.FINISH_REASON_CANCELLED: "cancelled",
    pb2.FINISH_REASON_ERROR: "error",
}

Message = Mapping[str, Any] | tuple[str, str]


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Timings:
    queued_s: float
    ttft_s: float
    total_s: float


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed message: new text and token ids; the last also says why and how much."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" on the last
    error: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None


@dataclass(frozen=True, slots=True)
class ModelCard:
    name: str
    context_length: int
    vocab_size: int
    quantization: dict[str, Any] | None
    eos_token_ids: tuple[int, ...]
    tool_call_format: str = ""  # "hermes", "llama3_json", "mistral"; "" = no tool support


# ----------------------------------------------------------------------------- errors


class GatewayError(Exception):
    """A failed call: the gRPC status `code`, the server's `message`, and when the server sent
    them a stable `error_code` (e.g. "context_length_exceeded") and the request `field` at fault."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        error_code: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.error_code = error_code
        self.field = field


class InvalidArgumentError(GatewayError):
    """A field is missing or out of range (`field` names it)."""


class ContextLengthExceededError(InvalidArgumentError):
    """The prompt plus max_tokens is over the model's context length."""


class ModelNotFoundError(InvalidArgumentError):
    """The request named a model this server does not serve."""


class UnauthenticatedError(GatewayError):
    """No API key, or a wrong one."""


class PermissionDeniedError(GatewayError):
    pass


class OverloadedError(GatewayError):
    """RESOURCE_EXHAUSTED: the engine's queue is full (or a message was too large); retry later."""


class UnavailableError(GatewayError):
    """The server is unreachable, still loading, or draining."""


class DeadlineExceededError(GatewayError):
    pass


class RequestCancelledError(GatewayError):
    pass


class NotFoundError(GatewayError):
    pass


class InternalError(GatewayError):
    pass


_ERRORS_BY_CODE: dict[grpc.StatusCode, type[GatewayError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INTERNAL: InternalError,
}
_ERRORS_BY_ERROR_CODE: dict[str, type[GatewayError]] = {
    "context_length_exceeded": ContextLengthExceededError,
    "model_not_found": ModelNotFoundError,
}


def error_from_rpc(exc: grpc.RpcError) -> GatewayError:
    """The typed error for a failed call (sync or asyncio)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    message = (exc.details() if callable(getattr(exc, "details", None)) else None) or str(exc)
    trailing = (
        exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else None
    )
    extras = {
        key: value for key, value in (trailing or ()) if key in (ERROR_CODE_KEY, ERROR_FIELD_KEY)
    }
    error_code = extras.get(ERROR_CODE_KEY)
    cls = _ERRORS_BY_ERROR_CODE.get(error_code or "") or _ERRORS_BY_CODE.get(code, GatewayError)
    return cls(code, message, error_code, extras.get(ERROR_FIELD_KEY))


# ----------------------------------------------------------------------------- requests


def generate_request(
    prompt: str | None = None,
    messages: Sequence[Message] | None = None,
    token_ids: Sequence[int] | None = None,
    *,
    model: str = "",
    request_id: str = "",
    tools: Sequence[Mapping[str, Any]] | None = None,
    **sampling: Any,
) -> pb2.GenerateRequest:
    """The GenerateRequest for these arguments. A sampling parameter left out or None takes the
    engine's default; an unknown name is a TypeError."""
    given = [
        name
        for name, value in (("prompt", prompt), ("messages", messages), ("token_ids", token_ids))
        if value is not None
    ]
    if len(given) != 1:
        raise TypeError(
            f"generate() takes exactly one of prompt, messages, token_ids (got {given or 'none'})"
        )
    request = pb2.GenerateRequest(
        model=model, request_id=request_id, sampling=sampling_params(**sampling)
    )
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.messages.SetInParent()  # selects the oneof even for an empty list
        request.messages.CopyFrom(chat_messages(messages, tools))
    else:
        request.token_ids.SetInParent()
        request.token_ids.ids.extend(token_ids or ())
    return request


def sampling_params(**sampling: Any) -> pb2.SamplingParams:
    unknown = sorted(set(sampling) - set(SAMPLING_PARAMETERS))
    if unknown:
        raise TypeError(
            f"unknown sampling parameter(s) {unknown}; known: {list(SAMPLING_PARAMETERS)}"
        )
    values = {name: value for name, value in sampling.items() if value is not None}
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
    return pb2.SamplingParams(**values)


def chat_messages(
    messages: Iterable[Message], tools: Sequence[Mapping[str, Any]] | None = None
) -> pb2.ChatMessages:
    turns = []
    for message in messages:
        if isinstance(message, Mapping):
            turns.append(
                pb2.ChatMessage(
                    role=message["role"],
                    content=message.get("content") or "",
                    tool_calls=[
                        pb2.ToolCall(
                            id=call.get("id") or "",
                            name=call["name"],
                            arguments=call.get("arguments") or "",
                        )
                        for call in message.get("tool_calls") or ()
                    ],
                    tool_call_id=message.get("tool_call_id") or "",
                    name=message.get("name") or "",
                )
            )
        else:
            role, content = message
            turns.append(pb2.ChatMessage(role=role, content=content))
    tools_json = json.dumps(list(tools), ensure_ascii=False) if tools else ""
    return pb2.ChatMessages(messages=turns, tools_json=tools_json)


def tokenize_request(
    text: str | None = None,
    messages: Sequence[Message] | None = None,
    *,
    model: str = "",
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool | None = None,
) -> pb2.TokenizeRequest:
    if (text is None) == (messages is None):
        raise TypeError("tokenize() takes exactly one of text, messages")
    if text is not None:
        request = pb2.TokenizeRequest(model=model, text=text)
    else:
        request = pb2.TokenizeRequest(model=model, messages=chat_messages(messages or (), tools))
    if add_generation_prompt is not None:
        request.add_generation_prompt = add_generation_prompt
    return request


# ----------------------------------------------------------------------------- from messages


def chunk_from_message(message: pb2.GenerateChunk) -> Chunk:
    finish = message.finish_reason
    if not finish and not message.logprobs:  # the common case, kept cheap: it runs per token
        return Chunk(message.request_id, message.text, tuple(message.token_ids))
    logprobs = None
    if message.logprobs:
        logprobs = tuple(
            TokenLogprob(
                entry.token_id,
                entry.token,
                entry.logprob,
                tuple(TopLogprob(alt.token_id, alt.token, alt.logprob) for alt in entry.top),
            )
            for entry in message.logprobs
        )
    if not finish:
        return Chunk(message.request_id, message.text, tuple(message.token_ids), logprobs)
    return Chunk(
        message.request_id,
        message.text,
        tuple(message.token_ids),
        logprobs,
        _FINISH_REASONS.get(finish, "error"),
        message.error or None,
        Usage(message.usage.prompt_tokens, message.usage.completion_tokens),
        Timings(message.timings.queued_s, message.timings.ttft_s, message.timings.total_s),
    )


def model_card_from_message(message: pb2.Model) -> ModelCard:
    quantization = None
    if message.HasField("quantization"):
        q = message.quantization
        quantization = {f.name: getattr(q, f.name) for f in q.DESCRIPTOR.fields}
    return ModelCard(
        message.name,
        message.context_length,
        message.vocab_size,
        quantization,
        tuple(message.eos_token_ids),
        message.tool_call_format,
    )


_HEALTH_STATUS_NAMES = {
    value: name for name, value in health_pb2.HealthCheckResponse.ServingStatus.items()
}


def _channel_options(
    max_message_bytes: int, extra: Sequence[tuple[str, Any]]
) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        *extra,
    ]


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


# ----------------------------------------------------------------------------- sync client


class ChunkStream(Iterator[Chunk]):
    """The chunks of one Generate call. `close()` (or garbage collection) cancels the call."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> ChunkStream:
        return self

    def __next__(self) -> Chunk:
        try:
            message = next(self._call)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return chunk_from_message(message)

    def close(self) -> None:
        self._call.cancel()

    cancel = close

    def __enter__(self) -> ChunkStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        call = getattr(self, "_call", None)
        if call is not None:
            call.cancel()


class GatewayClient:
    """Blocking client; thread-safe (one channel, many calls). `timeout` (seconds) is the default
    deadline of every call; each method takes `timeout=` to override it."""

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        timeout: float | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        channel_options = _channel_options(max_message_bytes, options)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        self._stub = pb2_grpc.GatewayStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = _metadata(api_key)
        self.timeout = timeout

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def generate(
        self,
        prompt: str | None = None,
        messages: Sequence[Message] | None = None,
        token_ids: Sequence[int] | None = None,
        *,
        model: str = "",
        request_id: str = "",
        timeout: float | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **sampling: Any,
    ) -> ChunkStream:
        request = generate_request(
            prompt, messages, token_ids, model=model, request_id=request_id, tools=tools, **sampling
        )
        call = self._stub.Generate(
            request, timeout=self._deadline(timeout), metadata=self._metadata
        )
        return ChunkStream(call)

    def tokenize(
        self,
        text: str | None = None,
        messages: Sequence[Message] | None = None,
        *,
        model: str = "",
        timeout: float | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool | None = None,
    ) -> list[int]:
        request = tokenize_request(
            text, messages, model=model, tools=tools, add_generation_prompt=add_generation_prompt
        )
        reply = self._unary(self._stub.Tokenize, request, timeout)
        return list(reply.token_ids)

    def detokenize(
        self,
        token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = False,
        model: str = "",
        timeout: float | None = None,
    ) -> str:
        request = pb2.DetokenizeRequest(
            model=model, token_ids=list(token_ids), skip_special_tokens=skip_special_tokens
        )
        return self._unary(self._stub.Detokenize, request, timeout).text

    def list_models(self, *, timeout: float | None = None) -> list[ModelCard]:
        reply = self._unary(self._stub.ListModels, pb2.ListModelsRequest(), timeout)
        return [model_card_from_message(m) for m in reply.models]

    def model_info(self, model: str = "", *, timeout: float | None = None) -> ModelCard:
        reply = self._unary(self._stub.ModelInfo, pb2.ModelInfoRequest(model=model), timeout)
        return model_card_from_message(reply)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The health status, e.g. SERVING or NOT_SERVING (grpc.health.v1; no API key needed)."""
        request = health_pb2.HealthCheckRequest(service=service)
        reply = self._unary(self._health.Check, request, timeout)
        return _HEALTH_STATUS_NAMES.get(reply.status, "UNKNOWN")

    def wait_until_serving(self, timeout: float = 300.0, poll_s: float = 0.2) -> None:
        """Block until health says SERVING; UnavailableError with the last state after `timeout`."""
        deadline = time.monotonic() + timeout
        last = "UNREACHABLE"
        while time.monotonic() < deadline:
            try:
                last = self.health(timeout=max(poll_s, 1.0))
            except GatewayError as exc:
                last = exc.code.name
            if last == "SERVING":
                return
            time.sleep(poll_s)
        raise UnavailableError(
            grpc.StatusCode.UNAVAILABLE, f"not SERVING after {timeout:g} s (last: {last})"
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- asyncio client


class AsyncChunkStream:
    """The chunks of one Generate call, for `async for`. `cancel()`/`aclose()`, leaving an
    `async with`, or dropping the stream (breaking out of the loop) cancels the call."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call

    def __aiter__(self) -> AsyncChunkStream:
        return self

    async def __anext__(self) -> Chunk:
        try:
            message = await self._call.read()
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        except asyncio.CancelledError:
            self._call.cancel()
            raise
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        return chunk_from_message(message)

    def cancel(self) -> None:
        self._call.cancel()

    async def aclose(self) -> None:
        self._call.cancel()

    async def __aenter__(self) -> AsyncChunkStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._call.cancel()

    def __del__(self) -> None:
        call = getattr(self, "_call", None)
        if call is not None and not call.done():
            call.cancel()

    async def collect(self) -> list[Chunk]:
        """All chunks (convenience for callers that do not stream)."""
        return [chunk async for chunk in self]


class AsyncGatewayClient:
    """asyncio client (grpc.aio). Create it inside the event loop that uses it."""

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        timeout: float | None = None,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        channel_options = _channel_options(max_message_bytes, options)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=channel_options)
        self._stub = pb2_grpc.GatewayStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = _metadata(api_key)
        self.timeout = timeout

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def generate(
        self,
        prompt: str | None = None,
        messages: Sequence[Message] | None = None,
        token_ids: Sequence[int] | None = None,
        *,
        model: str = "",
        request_id: str = "",
        timeout: float | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **sampling: Any,
    ) -> AsyncChunkStream:
        request = generate_request(
            prompt, messages, token_ids, model=model, request_id=request_id, tools=tools, **sampling
        )
        call = self._stub.Generate(
            request, timeout=self._deadline(timeout), metadata=self._metadata
        )
        return AsyncChunkStream(call)

    async def tokenize(
        self,
        text: str | None = None,
        messages: Sequence[Message] | None = None,
        *,
        model: str = "",
        timeout: float | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool | None = None,
    ) -> list[int]:
        request = tokenize_request(
            text, messages, model=model, tools=tools, add_generation_prompt=add_generation_prompt
        )
        return list((await self._unary(self._stub.Tokenize, request, timeout)).token_ids)

    async def detokenize(
        self,
        token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = False,
        model: str = "",
        timeout: float | None = None,
    ) -> str:
        request = pb2.DetokenizeRequest(
            model=model, token_ids=list(token_ids), skip_special_tokens=skip_special_tokens
        )
        return (await self._unary(self._stub.Detokenize, request, timeout)).text

    async def list_models(self, *, timeout: float | None = None) -> list[ModelCard]:
        reply = await self._unary(self._stub.ListModels, pb2.ListModelsRequest(), timeout)
        return [model_card_from_message(m) for m in reply.models]

    async def model_info(self, model: str = "", *, timeout: float | None = None) -> ModelCard:
        reply = await self._unary(self._stub.ModelInfo, pb2.ModelInfoRequest(model=model), timeout)
        return model_card_from_message(reply)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        reply = await self._unary(self._health.Check, request, timeout)
        return _HEALTH_STATUS_NAMES.get(reply.status, "UNKNOWN")

    async def wait_until_serving(self, timeout: float = 300.0, poll_s: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        last = "UNREACHABLE"
        while time.monotonic() < deadline:
            try:
                last = await self.health(timeout=max(poll_s, 1.0))
            except GatewayError as exc:
                last = exc.code.name
            if last == "SERVING":
                return
            await asyncio.sleep(poll_s)
        raise UnavailableError(
            grpc.StatusCode.UNAVAILABLE, f"not SERVING after {timeout:g} s (last: {last})"
        )

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncGatewayClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


__all__ = [
    "SAMPLING_PARAMETERS",
    "AsyncChunkStream",
    "AsyncGatewayClient",
    "Chunk",
    "ChunkStream",
    "ContextLengthExceededError",
    "DeadlineExceededError",
    "GatewayClient",
    "GatewayError",
    "InternalError",
    "InvalidArgumentError",
    "ModelCard",
    "ModelNotFoundError",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "RequestCancelledError",
    "Timings",
    "TokenLogprob",
    "TopLogprob",
    "UnauthenticatedError",
    "UnavailableError",
    "Usage",
    "error_from_rpc",
    "generate_request",
]
