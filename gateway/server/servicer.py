"""The `gptqgw.v1.Gateway` service: requests in, engine calls, chunks out, one status per call."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from gateway.proto import pb2, pb2_grpc
from gateway.server import convert
from gateway.server.errors import RequestError, from_engine_error, unavailable
from gateway.server.logs import printable, request_id_var
from gateway.server.metrics import GatewayMetrics

log = logging.getLogger("gateway.server")
T = TypeVar("T")
DEADLINE_SLACK_S = 0.1


@dataclass
class ServingState:
    """What the servicer and the server's lifecycle share: the engine once loaded, and admission."""

    model_name: str
    engine: Any | None = None  # set when loaded and warmed up
    engine_types: convert.EngineTypes | None = None
    draining: bool = False
    open_calls: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    def enter(self) -> None:
        self.open_calls += 1
        self.idle.clear()

    def leave(self) -> None:
        self.open_calls -= 1
        if self.open_calls == 0:
            self.idle.set()


DEFAULT_MAX_TOKENS_PER_CHUNK = 64


class GatewayServicer(pb2_grpc.GatewayServicer):
    """`max_tokens_per_chunk` bounds how many tokens one `GenerateChunk` may carry when events
    piled up behind a slow reader or a busy server (1: one message per engine event)."""

    def __init__(
        self,
        state: ServingState,
        metrics: GatewayMetrics,
        max_tokens_per_chunk: int = DEFAULT_MAX_TOKENS_PER_CHUNK,
    ) -> None:
        if max_tokens_per_chunk < 1:
            raise ValueError(f"max_tokens_per_chunk must be at least 1, got {max_tokens_per_chunk}")
        self._state = state
        self._metrics = metrics
        self._max_tokens_per_chunk = max_tokens_per_chunk
        # Bound once: these run per chunk.
        self._observe_ttft = metrics.time_to_first_token.observe
        self._observe_itl = metrics.inter_token_latency.observe

    def _admit(self, model: str) -> Any:
        """The engine, if this call may use it now (raises RequestError otherwise)."""
        state = self._state
        if state.draining:
            raise unavailable("the server is shutting down and takes no new calls", "draining")
        if state.engine is None:
            raise unavailable("the model is still loading; retry when health is SERVING", "loading")
        convert.check_model(model, state.model_name)
        return state.engine

    async def Generate(
        self, request: pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb2.GenerateChunk]:
        arrived = time.perf_counter()
        request_id, bad_request_id = _call_request_id(request.request_id)
        request_id_var.set(request_id)
        metrics = self._metrics
        self._state.enter()
        metrics.streams_open.inc()
        status = grpc.StatusCode.OK
        failure: RequestError | None = None
        engine: Any = None
        stream: Any = None
        finish_reason: str | None = None
        prompt_tokens = completion_tokens = 0
        first_token_at: float | None = None
        try:
            engine = self._admit(request.model)
            if bad_request_id is not None:
                raise bad_request_id
            vocab_size = int(engine.model_info.vocab_size)
            prompt_ids = await convert.prompt_token_ids(request, engine, vocab_size)
            prompt_tokens = len(prompt_ids)
            types = self._state.engine_types
            assert types is not None, "engine_types is set together with engine"
            params = types.SamplingParams(
                **convert.sampling_kwargs(request.sampling, types.GuidedDecoding)
            )
            prepare = getattr(engine, "prepare_guided", None)
            if params.guided is not None and prepare is not None:
                # Compiled off the event loop; a bad spec is INVALID_ARGUMENT before any chunk.
                params.validate(vocab_size)
                await prepare(params.guided)
            stream = engine.generate(types.GenerationRequest(request_id, prompt_ids, params))
            last = arrived
            observe_itl = self._observe_itl
            limit = self._max_tokens_per_chunk
            async for event in stream:
                # Coalescing: whatever else the engine has already delivered goes out in this
                # message too. Only what is ready now: a lone event is never held back to wait
                # for company, so a reader that keeps up gets one message per event.
                events = [event]
                new_tokens = len(event.token_ids)
                if event.finish_reason is None and new_tokens < limit:
                    events += stream.take_ready(limit - new_tokens)
                    if len(events) > 1:
                        event = events[-1]
                        new_tokens = sum(len(e.token_ids) for e in events)
                if new_tokens:
                    now = time.perf_counter()
                    if first_token_at is None:
                        first_token_at = now
                        self._observe_ttft(now - arrived)
                    else:
                        gap = (now - last) / new_tokens
                        for _ in range(new_tokens):
                            observe_itl(gap)
                    last = now
                    completion_tokens += new_tokens
                if event.finish_reason is not None:
                    finish_reason = event.finish_reason
                yield convert.chunk(events, request_id)
        except RequestError as exc:
            failure = exc
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away or the deadline passed: grpc cancels the handler's task, or
            # closes this generator between two chunks.
            status = _ended_early_status(context)
            raise
        except Exception as exc:
            failure = self._unexpected(exc, input_field=request.WhichOneof("input") or "input")
        finally:
            if stream is not None and finish_reason is None:
                await _abandon(stream, engine, request_id)
            if failure is not None:
                status = failure.status
            elif finish_reason is None and status == grpc.StatusCode.OK:
                status = grpc.StatusCode.CANCELLED
            reason = finish_reason or ("cancelled" if failure is None else None)
            self._account(
                request_id,
                status,
                reason,
                arrived,
                first_token_at,
                prompt_tokens,
                completion_tokens,
            )
        if failure is not None:
            await context.abort(failure.status, failure.message, failure.trailing_metadata())

    def _account(
        self,
        request_id: str,
        status: grpc.StatusCode,
        finish_reason: str | None,
        arrived: float,
        first_token_at: float | None,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        metrics = self._metrics
        elapsed = time.perf_counter() - arrived
        metrics.streams_open.dec()
        self._state.leave()
        metrics.requests.labels("Generate", status.name.lower()).inc()
        if finish_reason is not None:
            metrics.finish_reasons.labels(finish_reason).inc()
        if status != grpc.StatusCode.INVALID_ARGUMENT:
            metrics.request_latency.observe(elapsed)
        log.info(
            "Generate %s",
            status.name.lower(),
            extra={
                "request_id": request_id,
                "finish_reason": finish_reason,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "ttft_s": None if first_token_at is None else round(first_token_at - arrived, 6),
                "total_s": round(elapsed, 6),
            },
        )

    def _unexpected(self, exc: Exception, input_field: str) -> RequestError:
        mapped = from_engine_error(exc, input_field=input_field)
        if mapped is not None:
            return mapped
        log.exception("internal error")
        return RequestError(
            grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", "internal"
        )

    async def _unary(
        self, method: str, context: grpc.aio.ServicerContext, handle: Callable[[], Awaitable[T]]
    ) -> T:
        """Admission, status accounting and error mapping shared by the unary methods."""
        self._state.enter()
        failure: RequestError | None = None
        status = grpc.StatusCode.OK
        try:
            return await handle()
        except RequestError as exc:
            failure = exc
        except asyncio.CancelledError:
            status = _ended_early_status(context)
            raise
        except Exception as exc:
            failure = self._unexpected(exc, input_field="input")
        finally:
            if failure is not None:
                status = failure.status
            self._metrics.requests.labels(method, status.name.lower()).inc()
            self._state.leave()
        await context.abort(failure.status, failure.message, failure.trailing_metadata())
        raise AssertionError("context.abort returned")  # pragma: no cover

    async def Tokenize(
        self, request: pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb2.TokenizeResponse:
        async def handle() -> pb2.TokenizeResponse:
            engine = self._admit(request.model)
            return pb2.TokenizeResponse(token_ids=await convert.tokenize_input(request, engine))

        return await self._unary("Tokenize", context, handle)

    async def Detokenize(
        self, request: pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb2.DetokenizeResponse:
        async def handle() -> pb2.DetokenizeResponse:
            engine = self._admit(request.model)
            vocab_size = int(engine.model_info.vocab_size)
            ids = list(request.token_ids)
            if ids:
                convert.check_token_ids(ids, vocab_size, "token_ids")
            skip = request.skip_special_tokens
            if hasattr(engine, "decode_async"):  # on the engine's tokenizer thread
                text = await engine.decode_async(ids, skip_special_tokens=skip)
            else:
                decode = getattr(engine, "decode", None) or engine.tokenizer.decode
                text = await asyncio.to_thread(decode, ids, skip_special_tokens=skip)
            return pb2.DetokenizeResponse(text=text)

        return await self._unary("Detokenize", context, handle)

    async def ListModels(
        self, request: pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb2.ListModelsResponse:
        async def handle() -> pb2.ListModelsResponse:
            engine = self._admit("")
            card = convert.model_card(self._state.model_name, engine.model_info)
            return pb2.ListModelsResponse(models=[card])

        return await self._unary("ListModels", context, handle)

    async def ModelInfo(
        self, request: pb2.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb2.Model:
        async def handle() -> pb2.Model:
            engine = self._admit(request.model)
            return convert.model_card(self._state.model_name, engine.model_info)

        return await self._unary("ModelInfo", context, handle)


def _call_request_id(given: str) -> tuple[str, RequestError | None]:
    """The id this call goes by, and the refusal of the client's id if it is not acceptable.

    A refused id never becomes the call's id: it would be logged on every line of the call
    (a 1 MB line, or a forged one through a newline and terminal escapes). The call gets a fresh
    id instead, and the refused value is logged once, escaped and cut."""
    if not given:
        return uuid.uuid4().hex, None
    try:
        convert.check_request_id(given)
    except RequestError as exc:
        own = uuid.uuid4().hex
        log.info(
            "refused the client's request_id",
            extra={"request_id": own, "refused_request_id": printable(given, 64)},
        )
        return own, exc
    return given, None


async def _abandon(stream: Any, engine: Any, request_id: str) -> None:
    """Cancel an unfinished request in the engine (its slot is freed at the next step).

    Closing the engine's stream is the one way to do it: it is idempotent, whereas a cancel by
    id on top of the stream's own clean-up would cancel the same request twice.
    """
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
    else:
        engine.cancel(request_id)


def _ended_early_status(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """DEADLINE_EXCEEDED or CANCELLED for a call that ended before its last chunk.

    The client's own deadline timer usually cancels the stream a moment before the server's
    fires, so a deadline about to expire counts as expired.
    """
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED
