"""OpenAI request bodies -> the upstream Generate calls, and upstream field names -> request params.

A request fans out to one call per choice (n) and, for /v1/completions, per prompt; calls are in
choice order: prompt p, choice j is call p * n + j, which is also its `index` in the response.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.openai_api import response_format
from gateway.openai_api.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    _SamplingFields,
)
from gateway.openai_api.tool_choice import NO_TOOLS, ToolPlan
from gateway.openai_api.upstream import UpstreamCall, seed_for_choice


def sampling_kwargs(
    body: _SamplingFields, max_tokens: int | None, logprobs: int | None
) -> dict[str, Any]:
    """The upstream SamplingParams fields this request sets (None: the engine's default)."""
    stop = body.stop
    top_k = body.top_k
    return {
        "max_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": 0 if top_k == -1 else top_k,  # vLLM spells "off" as -1
        "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "stop": [stop] if isinstance(stop, str) else stop,
        "logprobs": logprobs,
        "min_tokens": body.min_tokens,
        "ignore_eos": body.ignore_eos,
        "guided": response_format.guided(getattr(body, "response_format", None)),
    }


def _fan_out(
    body: _SamplingFields, inputs: list[dict[str, Any]], sampling: dict[str, Any]
) -> list[UpstreamCall]:
    n = body.n or 1
    calls = []
    for prompt_index, given in enumerate(inputs):
        for choice in range(n):
            seed = seed_for_choice(body.seed, choice)
            calls.append(
                UpstreamCall(
                    choice=prompt_index * n + choice,
                    prompt_index=prompt_index,
                    sampling={**sampling, "seed": seed},
                    **given,
                )
            )
    return calls


def chat_messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    return message_turns(body.messages)


def message_turns(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The turns for the upstream client (gateway.client.chat_messages' shape)."""
    turns: list[dict[str, Any]] = []
    for m in messages:
        turn: dict[str, Any] = {"role": m.template_role(), "content": m.text()}
        if m.tool_calls:
            turn["tool_calls"] = [
                {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                for c in m.tool_calls
            ]
        if m.tool_call_id:
            turn["tool_call_id"] = m.tool_call_id
        turns.append(turn)
    return turns


def chat_calls(
    body: ChatCompletionRequest,
    max_tokens: int,
    prompt_ids: list[int] | None = None,
    tools: ToolPlan = NO_TOOLS,
) -> list[UpstreamCall]:
    """`prompt_ids`: the messages already tokenized (when the shim had to count them to fill the
    context), sent as token ids so that the server does not apply the template twice."""
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    sampling = sampling_kwargs(body, max_tokens, logprobs)
    if tools.guided_schema is not None:  # tool_choice "required" or named (tool_choice.py)
        sampling["guided"] = tools.guided()
    given: dict[str, Any] = (
        {"messages": chat_messages(body), "tools": tools.tools}
        if prompt_ids is None
        else {"token_ids": prompt_ids}
    )
    return _fan_out(body, [given], sampling)


def completion_calls(body: CompletionRequest) -> list[UpstreamCall]:
    sampling = sampling_kwargs(body, body.max_tokens, body.logprobs)
    inputs = [
        {"prompt": prompt} if isinstance(prompt, str) else {"token_ids": prompt}
        for prompt in body.prompt_list()
    ]
    return _fan_out(body, inputs, sampling)


def chat_param_names(body: ChatCompletionRequest) -> dict[str, str]:
    """Upstream field -> this request's parameter, for error messages."""
    max_tokens = body.max_tokens_param() if body.max_new_tokens() is not None else "messages"
    return {
        "sampling.max_tokens": max_tokens,
        "sampling.logprobs": "top_logprobs",
        "messages": "messages",
        "token_ids": "messages",
        "prompt": "messages",
        "input": "messages",
        "messages.tools_json": "tools",
        **_guided_param(body),
    }


def completion_param_names(body: CompletionRequest) -> dict[str, str]:
    return {
        "sampling.max_tokens": "max_tokens",
        "sampling.logprobs": "logprobs",
        "prompt": "prompt",
        "token_ids": "prompt",
        "input": "prompt",
        **_guided_param(body),
    }


def _guided_param(body: _SamplingFields) -> dict[str, str]:
    """The upstream's complaints about `sampling.guided` are about response_format's schema."""
    if response_format.is_constrained(getattr(body, "response_format", None)):
        return {"sampling.guided": "response_format"}
    return {}
