"""Between protobuf messages and the engine's Python types, checking requests on the way in."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from gateway.proto import pb2
from gateway.server.errors import from_engine_error, invalid_argument

# SamplingParams fields that are `optional` in the proto: unset means the engine's default.
_OPTIONAL_SAMPLING_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
)
_FINISH_REASONS = {
    "stop": pb2.FINISH_REASON_STOP,
    "length": pb2.FINISH_REASON_LENGTH,
    "cancelled": pb2.FINISH_REASON_CANCELLED,
    "error": pb2.FINISH_REASON_ERROR,
}
_QUANTIZATION_FIELDS = tuple(pb2.QuantizationConfig.DESCRIPTOR.fields_by_name)
MAX_REQUEST_ID_CHARS = 128


class EngineTypes(NamedTuple):
    """The engine's request classes; passed in so the server never imports torch by itself."""

    SamplingParams: Callable[..., Any]
    GenerationRequest: Callable[..., Any]


def load_engine_types() -> EngineTypes:
    from gateway.engine import GenerationRequest, SamplingParams

    return EngineTypes(SamplingParams, GenerationRequest)


def check_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise invalid_argument("request_id", f"longer than {MAX_REQUEST_ID_CHARS} characters")
    if not request_id.isprintable():
        raise invalid_argument("request_id", "must be printable characters")
    return request_id


def sampling_kwargs(sampling: pb2.SamplingParams) -> dict[str, Any]:
    """Keyword arguments for the engine's SamplingParams: only what the client set."""
    kwargs: dict[str, Any] = {
        name: getattr(sampling, name)
        for name in _OPTIONAL_SAMPLING_FIELDS
        if sampling.HasField(name)
    }
    kwargs["stop"] = tuple(sampling.stop)
    kwargs["stop_token_ids"] = tuple(sampling.stop_token_ids)
    kwargs["ignore_eos"] = sampling.ignore_eos
    kwargs["min_tokens"] = sampling.min_tokens
    return kwargs


def chat_messages(messages: pb2.ChatMessages, field: str = "messages") -> list[dict[str, str]]:
    if not messages.messages:
        raise invalid_argument(field, "needs at least one message")
    turns = []
    for index, message in enumerate(messages.messages):
        if not message.role:
            raise invalid_argument(f"{field}[{index}].role", "is empty")
        turns.append({"role": message.role, "content": message.content})
    return turns


def check_token_ids(ids: Sequence[int], vocab_size: int, field: str) -> list[int]:
    if not ids:
        raise invalid_argument(field, "is empty")
    for index, token_id in enumerate(ids):
        if not 0 <= token_id < vocab_size:
            raise invalid_argument(
                f"{field}[{index}]", f"{token_id} is outside the vocabulary [0, {vocab_size})"
            )
    return list(ids)


async def prompt_token_ids(request: pb2.GenerateRequest, engine: Any, vocab_size: int) -> list[int]:
    """The prompt as token ids, whichever of the oneof `input` the client used.

    Tokenizing and templating run off the event loop (see `_off_loop`), so a huge prompt does not
    stall the other streams."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise invalid_argument("input", "one of prompt, messages or token_ids is required")
    if kind == "prompt":
        if not request.prompt:
            raise invalid_argument("prompt", "is empty")
        return await encode_text(engine, request.prompt)
    if kind == "messages":
        # 150k messages take a while to read, too.
        turns = await asyncio.to_thread(chat_messages, request.messages)
        return await encode_chat(engine, turns)
    return await asyncio.to_thread(check_token_ids, request.token_ids.ids, vocab_size, "token_ids")


async def _off_loop(engine: Any, method: str, argument: Any) -> list[int]:
    """engine.<method>_async(argument) (the engine's tokenizer thread), or, for an engine
    without it, engine.<method>(argument) in a worker thread."""
    run = getattr(engine, f"{method}_async", None)
    if run is not None:
        ids = await run(argument)
    else:
        ids = await asyncio.to_thread(getattr(engine, method), argument)
    return ids if isinstance(ids, list) else list(ids)  # no copy of ~1M ids on the loop


async def encode_text(engine: Any, text: str) -> list[int]:
    return await _off_loop(engine, "encode", text)


async def encode_chat(engine: Any, turns: list[dict[str, str]]) -> list[int]:
    try:
        return await _off_loop(engine, "apply_chat_template", turns)
    except (ValueError, KeyError, TypeError) as exc:
        # No chat template, or one that rejects these roles (e.g. two system turns).
        mapped = from_engine_error(exc, input_field="messages")
        if mapped is not None:
            raise mapped from exc
        raise invalid_argument("messages", f"the chat template refused them: {exc}") from exc


async def tokenize_input(request: pb2.TokenizeRequest, engine: Any) -> list[int]:
    kind = request.WhichOneof("input")
    if kind is None:
        raise invalid_argument("input", "one of text or messages is required")
    if kind == "text":
        return await encode_text(engine, request.text)
    turns = await asyncio.to_thread(chat_messages, request.messages)
    return await encode_chat(engine, turns)


def chunk(events: Sequence[Any], request_id: str) -> pb2.GenerateChunk:
    """One message for one or more consecutive events of one stream (see servicer.Generate).

    Texts are concatenated and token ids and logprobs appended in order, so a reader sees the
    same stream whichever way the events were grouped. Only the last event may be final; the
    finish reason, error, usage and timings come from it.
    """
    last = events[-1]
    if len(events) == 1:
        message = pb2.GenerateChunk(request_id=request_id, text=last.text, token_ids=last.token_ids)
    else:
        message = pb2.GenerateChunk(
            request_id=request_id,
            text="".join([event.text for event in events]),
            token_ids=[token for event in events for token in event.token_ids],
        )
    for event in events:
        if event.logprobs:
            message.logprobs.extend(token_logprob(entry) for entry in event.logprobs)
    if last.finish_reason is not None:
        message.finish_reason = _FINISH_REASONS.get(last.finish_reason, pb2.FINISH_REASON_ERROR)
        if last.error:
            message.error = last.error
        if last.usage is not None:
            message.usage.prompt_tokens = last.usage.prompt_tokens
            message.usage.completion_tokens = last.usage.completion_tokens
        if last.timings is not None:
            message.timings.queued_s = last.timings.queued_s or 0.0
            message.timings.ttft_s = last.timings.ttft_s or 0.0
            message.timings.total_s = last.timings.total_s or 0.0
    return message


def token_logprob(entry: Any) -> pb2.TokenLogprob:
    return pb2.TokenLogprob(
        token_id=entry.token_id,
        token=entry.token,
        logprob=entry.logprob,
        top=[
            pb2.TopLogprob(token_id=alt.token_id, token=alt.token, logprob=alt.logprob)
            for alt in (entry.top or ())
        ],
    )


def model_card(name: str, info: Any) -> pb2.Model:
    card = pb2.Model(
        name=name,
        context_length=int(info.context_length),
        vocab_size=int(info.vocab_size),
        eos_token_ids=[int(i) for i in (info.eos_token_ids or ())],
    )
    quantization = dict(info.quantization or {})
    if quantization:
        known = {
            k: v for k, v in quantization.items() if k in _QUANTIZATION_FIELDS and v is not None
        }
        card.quantization.CopyFrom(pb2.QuantizationConfig(**known))
    return card


def check_model(requested: str, served: str) -> None:
    if requested and requested != served:
        raise invalid_argument(
            "model",
            f"unknown model {requested!r}; this server serves {served!r}",
            error_code="model_not_found",
        )
