"""Tool calling and /v1/tokenize, /v1/detokenize end to end with the official `openai` package:
a real `gptq-gateway serve` process and a real `gptq-gateway openai` process in front of it.

SmolLM2-135M-Instruct's own chat template has no tool support, so the server here serves a copy
of the 4-bit checkpoint with a small Hermes-style template (tests/tool_chat_template.jinja).
The model is far too small to choose tools by itself; a history of earlier calls makes greedy
decoding copy the <tool_call> format, which is enough to check parsing, streaming and the
history's rendering. `tool_choice="required"` and named functions rest on guided decoding
(the engine's grammar masks): those tests are marked `needs_guided`.

The model without tool support (the plain checkpoint) is tested in test_openai_sdk.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema_rs
import openai
import pytest
from fixtures_grpc import ServedGateway, start_gateway
from fixtures_openai import ServedShim, shim_in_front

from gateway.client import GatewayError
from gateway.openai_api.tool_parsers import parse_tool_calls

pytestmark = pytest.mark.slow

MODEL = "smollm2-tools"
TEMPLATE = Path(__file__).with_name("tool_chat_template.jinja")
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}
QUESTION = {"role": "user", "content": "What is the weather in Berlin?"}

# guided decoding (issue 14 part A) constrains the output for "required" and named functions.
needs_guided = pytest.mark.skipif(
    importlib.util.find_spec("gateway.engine.grammar") is None,
    reason="needs guided decoding in the engine (gateway/engine/grammar.py)",
)


def _call_turn(call_id: str, city: str) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
            }
        ],
    }


# Earlier turns in which the assistant answered weather questions with a call: SmolLM2 copies
# the pattern for the next question (greedy), so that the output holds a real <tool_call>.
COPIED_CALLS = [
    {"role": "user", "content": "What is the weather in Paris?"},
    _call_turn("call_paris", "Paris"),
    {"role": "user", "content": "What is the weather in Rome?"},
    _call_turn("call_rome", "Rome"),
    QUESTION,
]
# A whole exchange: a call, its result, the answer; then a new question.
WITH_RESULTS = [
    {"role": "user", "content": "What is the weather in Paris?"},
    _call_turn("call_paris", "Paris"),
    {"role": "tool", "tool_call_id": "call_paris", "content": '{"sky": "sunny", "celsius": 24}'},
    {"role": "assistant", "content": "It is sunny and 24 degrees in Paris."},
    {"role": "user", "content": "And is that warm?"},
]


@pytest.fixture(scope="module")
def tool_checkpoint(smollm2_w4_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared 4-bit SmolLM2 checkpoint (files linked, not copied) with the tool template."""
    out = tmp_path_factory.mktemp("tool-checkpoint") / "checkpoint"
    out.mkdir()
    for item in smollm2_w4_checkpoint.iterdir():
        if item.name != "chat_template.jinja":
            (out / item.name).symlink_to(item.resolve())
    shutil.copyfile(TEMPLATE, out / "chat_template.jinja")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" not in config, "the template would not come from chat_template.jinja"
    return out


@pytest.fixture(scope="module")
def gateway(
    tool_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedGateway]:
    served = start_gateway(
        tool_checkpoint,
        tmp_path_factory.mktemp("tools-grpc"),
        extra_args=["--max-model-len", "1024", "--model-name", MODEL, "--max-num-seqs", "4"],
    )
    yield served
    served.stop()


@pytest.fixture(scope="module")
def shim(gateway: ServedGateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedShim]:
    yield from shim_in_front(gateway, tmp_path_factory.mktemp("tools-shim"))


@pytest.fixture(scope="module")
def client(shim: ServedShim) -> Iterator[openai.OpenAI]:
    with shim.openai_client() as sdk:
        yield sdk


def post(shim: ServedShim, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, _, raw = shim.request("POST", path, body)
    return status, json.loads(raw)


def assert_valid_call(call: Any) -> dict[str, Any]:
    """An SDK tool call whose arguments parse and validate against its function's schema."""
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema_rs.validate(SCHEMAS[call.function.name], arguments)
    return arguments


def reassemble(stream: Any) -> tuple[str, list[dict[str, str]], str | None]:
    """Content, calls and finish reason of a streamed answer, from its deltas (OpenAI's rules:
    a call's first delta has its id and name, later ones add to its arguments by index)."""
    content, calls, reason = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for part in delta.tool_calls or ():
                slot = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] += part.id or ""
                if part.function is not None:
                    slot["name"] += part.function.name or ""
                    slot["arguments"] += part.function.arguments or ""
            reason = choice.finish_reason or reason
    return content, [calls[i] for i in sorted(calls)], reason


# ----------------------------------------------------------------------------- rendering


def test_model_card_and_tools_reach_the_template(shim: ServedShim, gateway: ServedGateway) -> None:
    with gateway.client() as grpc_client:
        assert grpc_client.model_info().tool_call_format == "hermes"
    messages = [QUESTION]
    status, bare = post(shim, "/v1/tokenize", {"model": MODEL, "messages": messages})
    assert status == 200, bare
    status, with_tools = post(
        shim, "/v1/tokenize", {"model": MODEL, "messages": messages, "tools": [WEATHER, TIME]}
    )
    assert status == 200, with_tools
    assert with_tools["count"] == len(with_tools["tokens"]) > bare["count"]
    assert with_tools["max_model_len"] == 1024
    status, text = post(shim, "/v1/detokenize", {"model": MODEL, "tokens": with_tools["tokens"]})
    assert status == 200
    rendered = text["prompt"]
    assert "<tools>" in rendered and json.dumps(WEATHER["function"]["parameters"]) in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    with gateway.client() as grpc_client:  # the same render through the gRPC client
        ids = grpc_client.tokenize(messages=messages, tools=[WEATHER, TIME], model=MODEL)
    assert ids == with_tools["tokens"]


def test_tool_results_round_trip_in_the_history(client: openai.OpenAI, shim: ServedShim) -> None:
    status, rendered = post(
        shim, "/v1/tokenize", {"model": MODEL, "messages": WITH_RESULTS, "tools": [WEATHER]}
    )
    assert status == 200
    status, text = post(shim, "/v1/detokenize", {"model": MODEL, "tokens": rendered["tokens"]})
    prompt = text["prompt"]
    # The call as the template writes it (arguments as an object), then its result.
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert call in prompt
    assert '<tool_response>\n{"sky": "sunny", "celsius": 24}\n</tool_response>' in prompt
    assert prompt.index(call) < prompt.index("<tool_response>") < prompt.index("And is that")

    reply = client.chat.completions.create(
        model=MODEL, messages=WITH_RESULTS, tools=[WEATHER], max_tokens=8, temperature=0
    )
    assert reply.usage.prompt_tokens == rendered["count"]
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_auto_parses_the_models_call(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=COPIED_CALLS, tools=[WEATHER, TIME], max_tokens=40, temperature=0
    )
    [choice] = reply.choices
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert assert_valid_call(call) == {"city": "Berlin"}


def test_streamed_call_deltas_reassemble_to_the_whole_answer(client: openai.OpenAI) -> None:
    request = {"model": MODEL, "messages": COPIED_CALLS, "tools": [WEATHER, TIME], "seed": 3,
               "max_tokens": 40, "temperature": 0}  # fmt: skip
    whole = client.chat.completions.create(**request).choices[0]
    content, calls, reason = reassemble(client.chat.completions.create(**request, stream=True))
    assert reason == whole.finish_reason == "tool_calls"
    assert content == (whole.message.content or "")
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    assert all(c["id"].startswith("call_") for c in calls)


def test_tool_choice_none_renders_but_does_not_parse(client: openai.OpenAI) -> None:
    request = {"model": MODEL, "messages": COPIED_CALLS, "tools": [WEATHER], "max_tokens": 40,
               "temperature": 0}  # fmt: skip
    auto = client.chat.completions.create(**request).choices[0]
    none = client.chat.completions.create(**request, tool_choice="none").choices[0]
    assert none.message.tool_calls is None and none.finish_reason == "stop"
    # The same output, left as text: parsed, it is auto's call.
    content, [call] = parse_tool_calls(none.message.content, "hermes")
    assert content is None and call.name == auto.message.tool_calls[0].function.name
    assert call.arguments == auto.message.tool_calls[0].function.arguments


def test_plain_answers_stream_as_content(client: openai.OpenAI) -> None:
    request = {"model": MODEL, "messages": [QUESTION], "tools": [WEATHER], "max_tokens": 10,
               "temperature": 0}  # fmt: skip
    whole = client.chat.completions.create(**request).choices[0]
    stream = list(client.chat.completions.create(**request, stream=True))
    content, calls, reason = reassemble(stream)
    assert not calls and whole.message.tool_calls is None
    assert content == whole.message.content and reason == whole.finish_reason
    with_text = [c for c in stream if c.choices and c.choices[0].delta.content]
    assert len(with_text) > 1  # streamed piece by piece, not held to the end


# ----------------------------------------------------------------------------- constrained


@needs_guided
@pytest.mark.parametrize("parallel", [True, False])
def test_required_yields_calls_that_validate(client: openai.OpenAI, parallel: bool) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What time is it in Paris?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=parallel,
        max_tokens=60,
        temperature=0,
    )
    [choice] = reply.choices
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert_valid_call(call)
    if not parallel:
        assert len(choice.message.tool_calls) == 1


@needs_guided
def test_named_function_yields_that_call(client: openai.OpenAI) -> None:
    request = {
        "model": MODEL,
        "messages": [QUESTION],
        "tools": [WEATHER, TIME],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "max_tokens": 40,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**request).choices[0]
    [call] = whole.message.tool_calls
    assert call.function.name == "get_time" and whole.finish_reason == "tool_calls"
    assert_valid_call(call)
    content, calls, reason = reassemble(client.chat.completions.create(**request, stream=True))
    assert reason == "tool_calls" and not content
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_time", call.function.arguments)]


@needs_guided
def test_required_with_sampling_still_validates(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[QUESTION],
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=60,
        temperature=1.0,
        seed=11,
        n=2,
    )
    for choice in reply.choices:
        # Sampled, the list of calls may run to max_tokens: its complete calls still count.
        assert choice.message.tool_calls, choice.message
        assert choice.finish_reason in ("tool_calls", "length")
        for call in choice.message.tool_calls:
            assert_valid_call(call)


# ----------------------------------------------------------------------------- tokenize


def test_tokenize_and_detokenize_round_trip(shim: ServedShim, gateway: ServedGateway) -> None:
    text = "Tokens, and back: ünïcödé 🙂 <b>"
    status, tokens = post(shim, "/v1/tokenize", {"model": MODEL, "prompt": text})
    assert status == 200 and tokens["count"] == len(tokens["tokens"]) > 0
    with gateway.client() as grpc_client:
        assert tokens["tokens"] == grpc_client.tokenize(text, model=MODEL)
    status, back = post(shim, "/v1/detokenize", {"model": MODEL, "tokens": tokens["tokens"]})
    assert status == 200 and back == {"prompt": text}
    assert post(shim, "/v1/detokenize", {"model": MODEL, "tokens": []}) == (200, {"prompt": ""})
    # Messages: the same ids a chat request is counted by.
    status, chat = post(
        shim,
        "/v1/tokenize",
        {"model": MODEL, "messages": [QUESTION], "add_generation_prompt": True},
    )
    with gateway.client() as grpc_client:
        assert chat["tokens"] == grpc_client.tokenize(messages=[QUESTION], model=MODEL)
        # Without the generation prompt: the same turns, minus the assistant header at the end.
        bare = grpc_client.tokenize(messages=[QUESTION], model=MODEL, add_generation_prompt=False)
        with pytest.raises(GatewayError) as caught:
            grpc_client.tokenize("a", model=MODEL, add_generation_prompt=True)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "add_generation_prompt" in caught.value.message
    status, rest = post(
        shim,
        "/v1/tokenize",
        {"model": MODEL, "messages": [QUESTION], "add_generation_prompt": False},
    )
    assert status == 200 and rest["tokens"] == bare
    assert len(bare) < len(chat["tokens"]) and chat["tokens"][: len(bare)] == bare


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
         "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]},
         "tools[0].function.name"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters":
          {"type": "array"}}}]}, "tools[0].function.parameters"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function",
                                               "function": {"name": "get_time"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "parallel_tool_calls": "sometimes"}, "parallel_tool_calls"),
        ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c",
          "type": "function", "function": {"name": "f", "arguments": "not json"}}]}]},
         "messages[0].tool_calls[0].function.arguments"),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
         "messages[0].tool_calls"),
    ],
)  # fmt: skip
def test_bad_tool_inputs_are_400_naming_the_field(
    client: openai.OpenAI, kwargs: dict[str, Any], param: str
) -> None:
    request = {"model": MODEL, "messages": [QUESTION], "max_tokens": 2, **kwargs}
    # The SDK types some of these fields; extra_body sends them as they are.
    typed = {k: request.pop(k) for k in ("model", "messages", "max_tokens")}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**typed, extra_body=request)
    assert caught.value.status_code == 400
    assert caught.value.param == param, caught.value.message


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/tokenize", {"model": MODEL}, 400, "prompt"),
        ("/v1/tokenize", {"model": MODEL, "prompt": "a", "messages": [QUESTION]}, 400, "messages"),
        ("/v1/tokenize", {"model": MODEL, "prompt": 7}, 400, "prompt"),
        ("/v1/tokenize", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400,
         "messages[0].tool_call_id"),
        ("/v1/tokenize", {"model": "other", "prompt": "a"}, 404, "model"),
        ("/v1/detokenize", {"model": MODEL, "tokens": [1, 10**9]}, 400, "tokens[1]"),
        ("/v1/detokenize", {"model": MODEL, "tokens": [-1]}, 400, "tokens[0]"),
        ("/v1/detokenize", {"model": MODEL}, 400, "tokens"),
        ("/v1/detokenize", {"model": "other", "tokens": [1]}, 404, "model"),
    ],
)  # fmt: skip
def test_bad_tokenize_inputs_name_the_field(
    shim: ServedShim, path: str, body: dict[str, Any], status: int, param: str
) -> None:
    got_status, reply = post(shim, path, body)
    assert (got_status, reply["error"]["param"]) == (status, param), reply
