"""What the endpoints do: upstream calls for a request, then one JSON response or an SSE stream.

`Shim` owns the one asyncio gRPC client (one HTTP/2 channel to the server, shared by every
request) and a cached copy of the served model's card (name, context length, EOS ids).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.client import AsyncGatewayClient, Chunk, GatewayError, ModelCard, TokenLogprob
from gateway.openai_api import builders
from gateway.openai_api.builders import DONE_EVENT, ResponseHead
from gateway.openai_api.errors import (
    INVALID_REQUEST,
    SERVER_ERROR,
    OpenAIError,
    from_gateway_error,
)
from gateway.openai_api.metrics import ShimMetrics
from gateway.openai_api.schemas import ChatCompletionRequest, CompletionRequest
from gateway.openai_api.sse import DisconnectGuard, EventStreamResponse
from gateway.openai_api.tokenize import (
    DETOKENIZE_PARAMS,
    TOKENIZE_PARAMS,
    DetokenizeRequest,
    TokenizeRequest,
)
from gateway.openai_api.tool_choice import NO_TOOLS, ToolPlan, plan_tools, tools_not_supported
from gateway.openai_api.tool_parsers import Content, Piece, ToolCallParser, parse_tool_calls
from gateway.openai_api.translate import (
    chat_calls,
    chat_messages,
    chat_param_names,
    completion_calls,
    completion_param_names,
    message_turns,
)
from gateway.openai_api.upstream import ChoiceStreams, UpstreamCall

log = logging.getLogger("gateway.openai")
MODEL_CARD_TTL_S = 30.0  # the server behind the address may be restarted with another model
UNARY_TIMEOUT_S = 30.0
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first"; never seen by it


@dataclass
class _CachedCard:
    card: ModelCard
    fetched_at: float


class Shim:
    def __init__(
        self,
        client: AsyncGatewayClient,
        metrics: ShimMetrics,
        default_max_tokens: int | None = None,
    ) -> None:
        self.client = client
        self.metrics = metrics
        # A chat request without max_tokens gets at most this many (None: OpenAI's default,
        # the room left in the context).
        self.default_max_tokens = default_max_tokens
        self.started_at = int(time.time())
        self._card: _CachedCard | None = None
        self._card_lock = asyncio.Lock()

    # ------------------------------------------------------------------ model card

    async def model_card(self) -> ModelCard:
        cached = self._card
        if cached is not None and time.monotonic() - cached.fetched_at < MODEL_CARD_TTL_S:
            return cached.card
        async with self._card_lock:
            cached = self._card
            if cached is None or time.monotonic() - cached.fetched_at >= MODEL_CARD_TTL_S:
                try:
                    card = await self.client.model_info(timeout=UNARY_TIMEOUT_S)
                except GatewayError as exc:
                    raise from_gateway_error(exc, {}) from None
                cached = self._card = _CachedCard(card, time.monotonic())
        return cached.card

    async def models(self) -> list[ModelCard]:
        try:
            return await self.client.list_models(timeout=UNARY_TIMEOUT_S)
        except GatewayError as exc:
            raise from_gateway_error(exc, {}) from None

    def _head(self, prefix: str, card: ModelCard) -> ResponseHead:
        return ResponseHead(
            id=f"{prefix}-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=card.name,
            system_fingerprint=fingerprint(card),
        )

    # ------------------------------------------------------------------ endpoints

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        started = time.perf_counter()
        card = await self.model_card()
        tools = plan_tools(body, card.tool_call_format)
        params = chat_param_names(body)
        if tools.guided_schema is not None:
            params["sampling.guided"] = "tool_choice"
        max_tokens = body.max_new_tokens()
        prompt_ids = None
        if max_tokens is None:
            # OpenAI's default is "up to the context length", which the upstream cannot be asked
            # for: count the prompt, then ask for exactly the room that is left.
            try:
                prompt_ids = await self.client.tokenize(
                    messages=chat_messages(body),
                    model=body.model,
                    timeout=UNARY_TIMEOUT_S,
                    tools=tools.tools,
                )
            except GatewayError as exc:
                raise from_gateway_error(exc, params) from None
            max_tokens = card.context_length - len(prompt_ids)
            if max_tokens < 1:
                raise OpenAIError(
                    400,
                    f"This model's maximum context length is {card.context_length} tokens; "
                    f"the messages are {len(prompt_ids)} tokens.",
                    INVALID_REQUEST,
                    "messages",
                    "context_length_exceeded",
                )
            if self.default_max_tokens is not None:
                max_tokens = min(max_tokens, self.default_max_tokens)
        head = self._head("chatcmpl", card)
        calls = chat_calls(body, max_tokens, prompt_ids, tools)
        chat_format = ChatFormat(
            head,
            bool(body.stream_options and body.stream_options.include_usage),
            bool(body.logprobs),
            frozenset(card.eos_token_ids),
            tools,
        )
        return await self._respond(request, head, calls, params, chat_format, body, started)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        started = time.perf_counter()
        card = await self.model_card()
        head = self._head("cmpl", card)
        completion_format = CompletionFormat(
            head,
            bool(body.stream_options and body.stream_options.include_usage),
            body.logprobs is not None,
            frozenset(card.eos_token_ids),
        )
        calls = completion_calls(body)
        params = completion_param_names(body)
        return await self._respond(request, head, calls, params, completion_format, body, started)

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        card = await self.model_card()
        if body.tools and not card.tool_call_format:
            raise tools_not_supported()
        try:
            if body.prompt is not None:
                ids = await self.client.tokenize(
                    text=body.prompt, model=body.model, timeout=UNARY_TIMEOUT_S
                )
            else:
                tools = [tool.model_dump(exclude_none=True) for tool in body.tools or ()]
                ids = await self.client.tokenize(
                    messages=message_turns(body.messages or ()),
                    model=body.model,
                    timeout=UNARY_TIMEOUT_S,
                    tools=tools or None,
                    add_generation_prompt=body.add_generation_prompt,
                )
        except GatewayError as exc:
            raise from_gateway_error(exc, TOKENIZE_PARAMS) from None
        return {"tokens": ids, "count": len(ids), "max_model_len": card.context_length}

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        try:
            text = await self.client.detokenize(
                body.tokens, model=body.model, skip_special_tokens=False, timeout=UNARY_TIMEOUT_S
            )
        except GatewayError as exc:
            raise from_gateway_error(exc, DETOKENIZE_PARAMS) from None
        return {"prompt": text}

    # ------------------------------------------------------------------ shared

    async def _respond(
        self,
        request: Request,
        head: ResponseHead,
        calls: Sequence[UpstreamCall],
        params: dict[str, str],
        response_format: ResponseFormat,
        body: ChatCompletionRequest | CompletionRequest,
        started: float,
    ) -> Response:
        streams = ChoiceStreams(self.client, body.model, head.id, calls)
        # Waiting for tokens (the queue, the prefill) can take long: a client that leaves
        # meanwhile must not keep the engine busy.
        guard = DisconnectGuard(request.receive)
        streamed = False
        try:
            if body.stream:
                first = await streams.open()
                events = self._events(streams, first, params, response_format, started)
                streamed = True  # from here on the response closes the guard
                return EventStreamResponse(events, guard, self.metrics.client_disconnects.inc)
            results = await streams.collect()
        except asyncio.CancelledError as exc:
            if not guard.caused(exc):
                raise
            self.metrics.client_disconnects.inc()
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except GatewayError as exc:
            raise from_gateway_error(exc, params) from None
        finally:
            if not streamed:
                guard.close()
        finals = [
            (call.prompt_index, chunks[-1].usage)
            for call, chunks in zip(calls, results, strict=True)
        ]
        usage = builders.total_usage(finals)
        self._count_tokens(usage)
        return JSONResponse(response_format.whole(results, usage))

    async def _events(
        self,
        streams: ChoiceStreams,
        first: list[Chunk],
        params: dict[str, str],
        response_format: ResponseFormat,
        started: float,
    ) -> AsyncGenerator[bytes, None]:
        metrics = self.metrics
        metrics.streams_open.inc()
        finals: list[tuple[int, Any]] = []
        calls = streams.calls
        try:
            for index, chunk in enumerate(first):
                for event in response_format.events(index, chunk):
                    yield event
                if chunk.finish_reason is not None:
                    finals.append((calls[index].prompt_index, chunk.usage))
            metrics.time_to_first_token.observe(time.perf_counter() - started)
            async for index, chunk in streams.chunks(first):
                for event in response_format.events(index, chunk):
                    yield event
                if chunk.finish_reason is not None:
                    finals.append((calls[index].prompt_index, chunk.usage))
            usage = builders.total_usage(finals)
            self._count_tokens(usage)
            if response_format.include_usage:
                yield response_format.usage_event(usage)
            yield DONE_EVENT
        except GatewayError as exc:
            log.warning("stream %s failed upstream: %s", streams.request_id, exc)
            yield from_gateway_error(exc, params).sse_event()
            yield DONE_EVENT  # the stream ends cleanly after its error event, as OpenAI's do
        except OpenAIError as exc:
            log.warning("stream %s failed: %s", streams.request_id, exc.message)
            yield exc.sse_event()
            yield DONE_EVENT
        finally:
            streams.cancel()
            metrics.streams_open.dec()

    def _count_tokens(self, usage: dict[str, int]) -> None:
        self.metrics.prompt_tokens.inc(usage["prompt_tokens"])
        self.metrics.completion_tokens.inc(usage["completion_tokens"])


def fingerprint(card: ModelCard) -> str:
    """Stable for one model and quantization: OpenAI's hint that outputs are comparable."""
    quantization = sorted((card.quantization or {}).items())
    digest = hashlib.sha256(f"{card.name}|{quantization}".encode()).hexdigest()
    return f"fp_{digest[:10]}"


def finish_reason(chunk: Chunk) -> str:
    """The last chunk's finish reason, as OpenAI names it; an error for a call that failed."""
    reason = chunk.finish_reason
    if reason in ("stop", "length"):
        return reason  # type: ignore[return-value]
    if reason == "cancelled":
        raise OpenAIError(
            503,
            "The model server cancelled the generation (it is shutting down); retry.",
            SERVER_ERROR,
            None,
            "generation_cancelled",
        )
    raise OpenAIError(
        500,
        f"The model failed on this request: {chunk.error or 'unknown error'}",
        SERVER_ERROR,
        None,
        "generation_failed",
    )


class ResponseFormat(Protocol):
    include_usage: bool

    def events(self, index: int, chunk: Chunk) -> list[bytes]: ...

    def usage_event(self, usage: dict[str, int]) -> bytes: ...

    def whole(self, results: list[list[Chunk]], usage: dict[str, int]) -> dict[str, Any]: ...


class ChatFormat:
    def __init__(
        self,
        head: ResponseHead,
        include_usage: bool,
        logprobs: bool,
        eos_token_ids: frozenset[int],
        tools: ToolPlan = NO_TOOLS,
    ) -> None:
        self.include_usage = include_usage
        self._logprobs = logprobs
        self._eos = eos_token_ids
        self._events = builders.ChatEvents(head, include_usage)
        self._head = head
        self._tools = tools
        self._parsers: dict[int, ToolCallParser] = {}  # streamed choices, while tools are parsed
        self._calls_sent: dict[int, int] = {}

    def _parser(self, index: int) -> ToolCallParser | None:
        tools = self._tools
        if tools.parse is None:
            return None
        parser = self._parsers.get(index)
        if parser is None:
            parser = ToolCallParser(tools.parse, tools.names, tools.function)
            self._parsers[index] = parser
        return parser

    def events(self, index: int, chunk: Chunk) -> list[bytes]:
        out = []
        logprobs = builders.visible_logprobs(chunk, self._eos) if self._logprobs else None
        parser = self._parser(index)
        if parser is None:
            if chunk.text or logprobs:
                out.append(self._events.content(index, chunk.text, logprobs))
        else:
            pieces = parser.feed(chunk.text)
            if chunk.finish_reason is not None:
                pieces += parser.finish()
            out += self._pieces(index, pieces, logprobs)
        if chunk.finish_reason is not None:
            reason = finish_reason(chunk)
            if parser is not None and parser.calls and reason == "stop":
                reason = "tool_calls"
            out.append(self._events.finish(index, reason))
        return out

    def _pieces(
        self, index: int, pieces: list[Piece], logprobs: Sequence[TokenLogprob] | None
    ) -> list[bytes]:
        """Events for what the parser let through; the chunk's logprobs go with its first
        content event, or with an empty one when its text is held back or became a call."""
        out = []
        for piece in pieces:
            if isinstance(piece, Content):
                out.append(self._events.content(index, piece.text, logprobs))
                logprobs = None
            else:
                position = self._calls_sent.get(index, 0)  # the call's index in its choice
                self._calls_sent[index] = position + 1
                out.append(
                    self._events.tool_call(index, position, piece.id, piece.name, piece.arguments)
                )
        if logprobs:
            out.insert(0, self._events.content(index, "", logprobs))
        return out

    def usage_event(self, usage: dict[str, int]) -> bytes:
        return self._events.usage(usage)

    def whole(self, results: list[list[Chunk]], usage: dict[str, int]) -> dict[str, Any]:
        choices = []
        calls: list[list[dict[str, Any]]] = []
        tools = self._tools
        for chunks in results:
            reason = finish_reason(chunks[-1])
            text: str | None = "".join(chunk.text for chunk in chunks)
            if tools.parse is not None:
                text, parsed = parse_tool_calls(
                    text or "", tools.parse, tools.names, tools.function
                )
                calls.append([call.as_openai() for call in parsed])
                if parsed and reason == "stop":
                    reason = "tool_calls"
            entries = None
            if self._logprobs:
                entries = []
                for chunk in chunks:
                    entries.extend(
                        builders.chat_logprob_entries(
                            builders.visible_logprobs(chunk, self._eos) or ()
                        )
                    )
            choices.append((text, reason, entries))
        return builders.chat_completion(
            self._head, choices, usage, calls if tools.parse is not None else None
        )


class CompletionFormat:
    def __init__(
        self, head: ResponseHead, include_usage: bool, logprobs: bool, eos_token_ids: frozenset[int]
    ) -> None:
        self.include_usage = include_usage
        self._logprobs = logprobs
        self._eos = eos_token_ids
        self._events = builders.CompletionEvents(head, include_usage)
        self._head = head
        self._accumulated: dict[int, builders.CompletionLogprobs] = {}

    def _logprobs_part(self, index: int, chunk: Chunk) -> dict[str, Any] | None:
        if not self._logprobs:
            return None
        accumulated = self._accumulated.setdefault(index, builders.CompletionLogprobs())
        return accumulated.add(builders.visible_logprobs(chunk, self._eos) or ())

    def events(self, index: int, chunk: Chunk) -> list[bytes]:
        reason = None if chunk.finish_reason is None else finish_reason(chunk)
        logprobs = self._logprobs_part(index, chunk)
        if not chunk.text and reason is None and not (logprobs and logprobs["tokens"]):
            return []
        return [self._events.text(index, chunk.text, logprobs, reason)]

    def usage_event(self, usage: dict[str, int]) -> bytes:
        return self._events.usage(usage)

    def whole(self, results: list[list[Chunk]], usage: dict[str, int]) -> dict[str, Any]:
        choices = []
        for index, chunks in enumerate(results):
            reason = finish_reason(chunks[-1])
            text = "".join(chunk.text for chunk in chunks)
            logprobs = None
            if self._logprobs:
                for chunk in chunks:
                    self._logprobs_part(index, chunk)
                logprobs = self._accumulated.get(index, builders.CompletionLogprobs()).as_dict()
            choices.append((text, reason, logprobs))
        return builders.completion(self._head, choices, usage)
