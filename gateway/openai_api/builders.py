"""OpenAI's response objects, from upstream chunks: whole responses, and SSE events for streams.

Streamed events are formatted from a prefix serialized once per response (id, object, created,
model, fingerprint) plus the per-event part, because this runs once per token per stream.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.client import Chunk, TokenLogprob, Usage

DONE_EVENT = b"data: [DONE]\n\n"
# OpenAI reports a token the model all but rules out with this logprob; JSON has no -Infinity.
FLOOR_LOGPROB = -9999.0
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass(frozen=True)
class ResponseHead:
    """What every object of one response repeats."""

    id: str
    created: int
    model: str
    system_fingerprint: str

    def fields(self, object_name: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
        }


def _logprob(value: float) -> float:
    return value if math.isfinite(value) and value > FLOOR_LOGPROB else FLOOR_LOGPROB


def visible_logprobs(
    chunk: Chunk, eos_token_ids: Collection[int]
) -> tuple[TokenLogprob, ...] | None:
    """The chunk's logprobs, less the end-of-sequence token's (its text is never shown)."""
    entries = chunk.logprobs
    if entries and chunk.finish_reason == "stop" and entries[-1].token_id in eos_token_ids:
        return entries[:-1]
    return entries


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def total_usage(finals: Sequence[tuple[int, Usage | None]]) -> dict[str, int]:
    """Usage of a request from each call's (prompt index, usage): a prompt's tokens count once
    however many choices continue it."""
    prompt_tokens: dict[int, int] = {}
    completion_tokens = 0
    for prompt_index, usage in finals:
        if usage is None:
            continue
        prompt_tokens.setdefault(prompt_index, usage.prompt_tokens)
        completion_tokens += usage.completion_tokens
    return usage_dict(sum(prompt_tokens.values()), completion_tokens)


# ----------------------------------------------------------------------------- chat


def chat_logprob_entries(entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    return [
        {
            "token": entry.token,
            "logprob": _logprob(entry.logprob),
            "bytes": list(entry.token.encode("utf-8")),
            "top_logprobs": [
                {
                    "token": alt.token,
                    "logprob": _logprob(alt.logprob),
                    "bytes": list(alt.token.encode("utf-8")),
                }
                for alt in entry.top
            ],
        }
        for entry in entries
    ]


def chat_completion(
    head: ResponseHead,
    choices: Sequence[tuple[str | None, str, list[dict[str, Any]] | None]],
    usage: dict[str, int],
    tool_calls: Sequence[Sequence[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """`choices`: (text, finish reason, logprob entries or None) in choice order; `tool_calls`:
    each choice's calls (OpenAI's tool_calls items), when tools were parsed."""
    out = []
    for index, (text, reason, logprobs) in enumerate(choices):
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if tool_calls is not None and tool_calls[index]:
            message["tool_calls"] = list(tool_calls[index])
        out.append(
            {
                "index": index,
                "message": message,
                "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                "finish_reason": reason,
            }
        )
    return {**head.fields("chat.completion"), "choices": out, "usage": usage}


class ChatEvents:
    """SSE events of one streamed chat completion."""

    def __init__(self, head: ResponseHead, include_usage: bool) -> None:
        fields = head.fields("chat.completion.chunk")
        self._prefix = b"data: " + _dumps(fields)[:-1].encode() + b',"choices":['
        self._suffix = (b'],"usage":null}' if include_usage else b"]}") + b"\n\n"
        self._head = head
        self._started: set[int] = set()

    def content(self, index: int, text: str, logprobs: Sequence[TokenLogprob] | None) -> bytes:
        role = "" if index in self._started else '"role":"assistant",'
        self._started.add(index)
        lp = "null"
        if logprobs is not None:
            lp = _dumps({"content": chat_logprob_entries(logprobs), "refusal": None})
        choice = (
            f'{{"index":{index},"delta":{{{role}"content":{_dumps(text)}}},'
            f'"logprobs":{lp},"finish_reason":null}}'
        )
        return self._prefix + choice.encode() + self._suffix

    def tool_call(
        self, index: int, position: int, call_id: str, name: str, arguments: str
    ) -> bytes:
        """One call as OpenAI streams it: its id, type and name (arguments ""), then its
        arguments, in one event each; `position` is the call's index within the choice."""
        role = "" if index in self._started else '"role":"assistant","content":null,'
        self._started.add(index)
        head = {
            "index": position,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        rest = {"index": position, "function": {"arguments": arguments}}
        events = []
        for delta, tail in ((head, role), (rest, "")):
            choice = (
                f'{{"index":{index},"delta":{{{tail}"tool_calls":[{_dumps(delta)}]}},'
                f'"logprobs":null,"finish_reason":null}}'
            )
            events.append(self._prefix + choice.encode() + self._suffix)
        return b"".join(events)

    def finish(self, index: int, reason: str) -> bytes:
        delta = "{}" if index in self._started else '{"role":"assistant","content":""}'
        self._started.add(index)
        choice = f'{{"index":{index},"delta":{delta},"logprobs":null,"finish_reason":"{reason}"}}'
        return self._prefix + choice.encode() + self._suffix

    def usage(self, usage: dict[str, int]) -> bytes:
        body = {**self._head.fields("chat.completion.chunk"), "choices": [], "usage": usage}
        return b"data: " + _dumps(body).encode() + b"\n\n"


# ----------------------------------------------------------------------------- completions


class CompletionLogprobs:
    """OpenAI's legacy logprobs object, accumulated token by token (offsets into the output)."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[dict[str, float]] = []
        self.text_offset: list[int] = []
        self._offset = 0

    def add(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        """Append these tokens; returns the object for just them (one streamed event's)."""
        part = CompletionLogprobs()
        part._offset = self._offset
        for entry in entries:
            for target in (self, part):
                target.tokens.append(entry.token)
                target.token_logprobs.append(_logprob(entry.logprob))
                target.top_logprobs.append({alt.token: _logprob(alt.logprob) for alt in entry.top})
                target.text_offset.append(target._offset)
                target._offset += len(entry.token)
        return part.as_dict()

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def completion(
    head: ResponseHead,
    choices: Sequence[tuple[str, str, dict[str, Any] | None]],
    usage: dict[str, int],
) -> dict[str, Any]:
    """`choices`: (text, finish reason, logprobs object or None) in choice order."""
    return {
        **head.fields("text_completion"),
        "choices": [
            {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
            for index, (text, reason, logprobs) in enumerate(choices)
        ],
        "usage": usage,
    }


class CompletionEvents:
    """SSE events of one streamed text completion."""

    def __init__(self, head: ResponseHead, include_usage: bool) -> None:
        fields = head.fields("text_completion")
        self._prefix = b"data: " + _dumps(fields)[:-1].encode() + b',"choices":['
        self._suffix = (b'],"usage":null}' if include_usage else b"]}") + b"\n\n"
        self._head = head

    def text(
        self, index: int, text: str, logprobs: dict[str, Any] | None, reason: str | None = None
    ) -> bytes:
        lp = "null" if logprobs is None else _dumps(logprobs)
        finish = "null" if reason is None else f'"{reason}"'
        choice = (
            f'{{"index":{index},"text":{_dumps(text)},"logprobs":{lp},"finish_reason":{finish}}}'
        )
        return self._prefix + choice.encode() + self._suffix

    def usage(self, usage: dict[str, int]) -> bytes:
        body = {**self._head.fields("text_completion"), "choices": [], "usage": usage}
        return b"data: " + _dumps(body).encode() + b"\n\n"
