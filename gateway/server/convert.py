"""Between protobuf messages and the engine's Python types, checking requests on the way in."""

from __future__ import annotations

import asyncio
import json
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
    """The engine's request classes; passed in so the server never imports torch by itself.
    Without `GuidedDecoding` (an engine that has no guided decoding) `sampling.guided` is
    INVALID_ARGUMENT."""

    SamplingParams: Callable[..., Any]
    GenerationRequest: Callable[..., Any]
    GuidedDecoding: Callable[..., Any] | None = None


def load_engine_types() -> EngineTypes:
    from gateway.engine import GenerationRequest, SamplingParams
    from gateway.engine.params import GuidedDecoding

    return EngineTypes(SamplingParams, GenerationRequest, GuidedDecoding)


def check_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise invalid_argument("request_id", f"longer than {MAX_REQUEST_ID_CHARS} characters")
    if not request_id.isprintable():
        raise invalid_argument("request_id", "must be printable characters")
    return request_id


def sampling_kwargs(
    sampling: pb2.SamplingParams, guided_type: Callable[..., Any] | None = None
) -> dict[str, Any]:
    """Keyword arguments for the engine's SamplingParams: only what the client set.
    `guided_type` builds the engine's GuidedDecoding(kind, spec) from `sampling.guided`."""
    kwargs: dict[str, Any] = {
        name: getattr(sampling, name)
        for name in _OPTIONAL_SAMPLING_FIELDS
        if sampling.HasField(name)
    }
    kwargs["stop"] = tuple(sampling.stop)
    kwargs["stop_token_ids"] = tuple(sampling.stop_token_ids)
    kwargs["ignore_eos"] = sampling.ignore_eos
    kwargs["min_tokens"] = sampling.min_tokens
    if sampling.HasField("guided"):
        kwargs["guided"] = guided_decoding(sampling.guided, guided_type)
    return kwargs


def guided_decoding(guided: pb2.GuidedDecoding, guided_type: Callable[..., Any] | None) -> Any:
    kind = guided.WhichOneof("kind")
    if kind is None:
        raise invalid_argument(
            "sampling.guided", "set one of json_schema, json_object, regex or grammar"
        )
    if guided_type is None:
        raise invalid_argument("sampling.guided", "this server has no guided decoding")
    if kind == "json_object":
        if not guided.json_object:
            raise invalid_argument("sampling.guided", "json_object must be true when set")
        return guided_type("json_object", "")
    return guided_type(kind, getattr(guided, kind))


def chat_messages(messages: pb2.ChatMessages, field: str = "messages") -> list[dict[str, Any]]:
    """The turns in transformers' chat format: an assistant turn's calls as `tool_calls:
    [{"id", "type": "function", "function": {"name", "arguments": dict}}]` (templates iterate the
    arguments as a mapping), a tool turn's `tool_call_id`; optional keys only when set."""
    if not messages.messages:
        raise invalid_argument(field, "needs at least one message")
    turns = []
    for index, message in enumerate(messages.messages):
        if not message.role:
            raise invalid_argument(f"{field}[{index}].role", "is empty")
        turn: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            turn["tool_calls"] = [
                _tool_call(call, f"{field}[{index}].tool_calls[{position}]")
                for position, call in enumerate(message.tool_calls)
            ]
        if message.tool_call_id:
            turn["tool_call_id"] = message.tool_call_id
        if message.name:
            turn["name"] = message.name
        turns.append(turn)
    return turns


def _tool_call(call: pb2.ToolCall, field: str) -> dict[str, Any]:
    if not call.name:
        raise invalid_argument(f"{field}.name", "is empty")
    try:
        arguments = json.loads(call.arguments) if call.arguments else {}
    except (ValueError, RecursionError):
        raise invalid_argument(f"{field}.arguments", "is not valid JSON") from None
    if not isinstance(arguments, dict):
        raise invalid_argument(f"{field}.arguments", "must be a JSON object")
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": arguments},
    }


def chat_input(
    messages: pb2.ChatMessages, engine: Any
) -> tuple[list[dict[str, Any]], list[Any] | None]:
    return chat_messages(messages), chat_tools(messages, engine)


def chat_tools(
    messages: pb2.ChatMessages, engine: Any, field: str = "messages"
) -> list[Any] | None:
    """The OpenAI `tools` list from tools_json (None when empty), for a template that renders
    them; a model whose template has no tool support refuses them rather than ignoring them."""
    if not messages.tools_json:
        return None
    where = f"{field}.tools_json"
    try:
        tools = json.loads(messages.tools_json)
    except (ValueError, RecursionError):
        raise invalid_argument(where, "is not valid JSON") from None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise invalid_argument(where, "must be a JSON list of tool objects")
    if not tools:
        return None
    if not getattr(engine.model_info, "tool_call_format", ""):
        raise invalid_argument(
            where,
            "this model's chat template has no tool support, so it cannot be given tools",
            "tools_not_supported",
        )
    return tools


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
        # 150k messages (or a large tool list) take a while to read, too.
        turns, tools = await asyncio.to_thread(chat_input, request.messages, engine)
        return await encode_chat(engine, turns, tools)
    return await asyncio.to_thread(check_token_ids, request.token_ids.ids, vocab_size, "token_ids")


async def _off_loop(engine: Any, method: str, argument: Any, **kwargs: Any) -> list[int]:
    """engine.<method>_async(argument) (the engine's tokenizer thread), or, for an engine
    without it, engine.<method>(argument) in a worker thread."""
    run = getattr(engine, f"{method}_async", None)
    if run is not None:
        ids = await run(argument, **kwargs)
    else:
        ids = await asyncio.to_thread(getattr(engine, method), argument, **kwargs)
    return ids if isinstance(ids, list) else list(ids)  # no copy of ~1M ids on the loop


async def encode_text(engine: Any, text: str) -> list[int]:
    return await _off_loop(engine, "encode", text)


async def encode_chat(
    engine: Any,
    turns: list[dict[str, Any]],
    tools: list[Any] | None = None,
    *,
    add_generation_prompt: bool = True,
) -> list[int]:
    # Only what differs from the defaults is passed, so engines without these options still work.
    kwargs: dict[str, Any] = {} if tools is None else {"tools": tools}
    if not add_generation_prompt:
        kwargs["add_generation_prompt"] = False
    try:
        return await _off_loop(engine, "apply_chat_template", turns, **kwargs)
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
    has_generation_prompt = request.HasField("add_generation_prompt")
    if kind == "text":
        if has_generation_prompt:
            raise invalid_argument("add_generation_prompt", "is only allowed with messages")
        return await encode_text(engine, request.text)
    turns, tools = await asyncio.to_thread(chat_input, request.messages, engine)
    generation_prompt = request.add_generation_prompt if has_generation_prompt else True
    return await encode_chat(engine, turns, tools, add_generation_prompt=generation_prompt)


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
        tool_call_format=str(getattr(info, "tool_call_format", "") or ""),
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
