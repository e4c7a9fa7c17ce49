"""Tool calling without a model: the template's format, the parsers (whole and streamed, on
handwritten outputs, malformed ones included), the request checks, the tool plan (rendering,
guided schema, parsing), the response shapes, the server's conversion of tool turns, and the
tokenize/detokenize bodies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from fixtures_openai import sse_events
from pydantic import ValidationError

from gateway.client import Chunk, Usage, chat_messages, generate_request
from gateway.engine.tool_format import detect_tool_call_format
from gateway.openai_api import builders
from gateway.openai_api.errors import OpenAIError, validation_error
from gateway.openai_api.schemas import ChatCompletionRequest
from gateway.openai_api.service import ChatFormat
from gateway.openai_api.tokenize import DetokenizeRequest, TokenizeRequest
from gateway.openai_api.tool_choice import plan_tools
from gateway.openai_api.tool_parsers import (
    NAMED,
    REQUIRED,
    Content,
    ToolCall,
    ToolCallParser,
    parse_tool_calls,
)
from gateway.openai_api.translate import chat_calls
from gateway.proto import pb2
from gateway.server import convert
from gateway.server.errors import RequestError

TEMPLATE = Path(__file__).with_name("tool_chat_template.jinja")
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}]}


def calls_of(pieces: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, json.loads(p.arguments)) for p in pieces if isinstance(p, ToolCall)]


def streamed(fmt: str, text: str, step: int, **kwargs: Any) -> tuple[str, list[Any]]:
    """Feed `text` in pieces of `step` characters: (content, calls)."""
    parser = ToolCallParser(fmt, **kwargs)
    pieces: list[Any] = []
    for start in range(0, len(text), step):
        pieces += parser.feed(text[start : start + step])
    pieces += parser.finish()
    content = "".join(p.text for p in pieces if isinstance(p, Content))
    return content, calls_of(pieces)


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (TEMPLATE.read_text(), "hermes"),
        ("{% for m in messages %}{{ m['content'] }}{% endfor %}", ""),  # SmolLM2-like
        ("{%- if tools %}<tool_call>{{ tools | tojson }}{% endif %}", "hermes"),
        ("{% if tools %}<|python_tag|>{{ tools }}{% endif %}<|eom_id|>", "llama3_json"),
        ('{% if tools is not none %}{"name": ..., "parameters": ...}{% endif %}', "llama3_json"),
        ("{% if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% endif %}", "mistral"),
        ("{% for t in tools %}{{ t }}{% endfor %}[TOOL_CALLS]", "mistral"),
        ("{% if tools %}{{ tools }}{% endif %}", ""),  # renders tools, but no known call format
        ("<tool_call> is mentioned, but the variable never is", ""),
        (None, ""),
        ({"default": "{{ x }}", "tool_use": "{% if tools %}<tool_call>{% endif %}"}, "hermes"),
    ],
)
def test_tool_call_format_from_the_template(template: Any, expected: str) -> None:
    assert detect_tool_call_format(template) == expected


# ----------------------------------------------------------------------------- parsers

HERMES = (
    "Let me look that up.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    '</tool_call>\n<tool_call>{"name": "get_time", "arguments": "{}"}</tool_call>'
)


@pytest.mark.parametrize(
    ("fmt", "text", "content", "calls"),
    [
        ("hermes", HERMES, "Let me look that up.",
         [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {})]),
        ("hermes", 'x <tool_call>{"name": "f", "parameters": {"a": [1, 2]}}</tool_call> y',
         "x y", [("f", {"a": [1, 2]})]),
        ("hermes", '<tool_call>{"name": "f", "arguments": {}}', None, [("f", {})]),  # unclosed
        ("llama3_json", '{"name": "f", "parameters": {"a": 1}}', None, [("f", {"a": 1})]),
        ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", '
         '"arguments": {"b": "x"}}', None, [("f", {}), ("g", {"b": "x"})]),
        ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}]', None, [("f", {"a": 1})]),
        ("mistral", 'Sure. [TOOL_CALLS] [{"name": "f", "arguments": {}}, {"name": "g", '
         '"arguments": {"z": null}}]', "Sure.", [("f", {}), ("g", {"z": None})]),
        # [TOOL_CALLS] is a control token the detokenizer drops: a leading call list counts.
        ("mistral", ' [{"name": "f", "arguments": {"a": 1}}]', None, [("f", {"a": 1})]),
        ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{}', None,
         [("f", {"a": 1}), ("g", {})]),
        (REQUIRED, '[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]', None,
         [("f", {"a": 1}), ("g", {})]),
    ],
)  # fmt: skip
def test_parsers_find_calls_whole_and_streamed(
    fmt: str, text: str, content: str | None, calls: list[Any]
) -> None:
    got_content, got_calls = parse_tool_calls(text, fmt)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    if fmt == "mistral":  # its templates take back only 9-character ids
        assert all(len(c.id) == 9 and c.id.isalnum() for c in got_calls)
    else:
        assert all(c.id.startswith("call_") and len(c.id) > 10 for c in got_calls)
    for step in (1, 2, 3, 7, len(text)):  # every split of the text, markers cut in two included
        assert streamed(fmt, text, step) == (content or "", calls), step


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("hermes", "Plain answer, no calls.\n"),
        ("hermes", "a <tool that is not a marker> and <tool_cal"),  # a marker cut by max_tokens
        ("hermes", "<tool_call>{not json}</tool_call>"),
        ("hermes", '<tool_call>{"name": "f", "arguments": [1]}</tool_call>'),  # not an object
        ("hermes", '<tool_call>{"arguments": {}}</tool_call>'),  # no name
        ("hermes", '<tool_call>{"name": "f", "arguments": {"a": '),  # cut off
        ("hermes", '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>'),
        ("llama3_json", "The answer is 42."),
        ("llama3_json", '{"answer": 42}'),  # JSON, but no call
        ("llama3_json", '{"name": "f", "parameters": {}} trailing words'),
        ("llama3_json", '{"name": "f", "parameters": {}'),
        ("mistral", "[1] a numbered list"),
        ("mistral", "[TOOL_CALLS] not a list"),
        ("mistral", '[TOOL_CALLS][{"name": "f"}, 3]'),
        ("mistral", "[TOOL_CALLS]f[ARGS]{bad"),
        (REQUIRED, "I would rather not."),
        (REQUIRED, "[]"),
        (REQUIRED, '{"name": "f", "arguments": {}}'),  # an object, not the list
        (REQUIRED, '[{"name": "f", "arguments": {"a": '),  # cut off before any whole call
        (NAMED, "[1, 2]"),
        (NAMED, '{"a": '),
        ("hermes", "<tool_call>" + "[" * 100_000 + "</tool_call>"),  # too deep for json
        ("hermes", '<tool_call>{"name": "f", "arguments": "' + "[" * 100_000 + '"}</tool_call>'),
        (REQUIRED, "[" * 100_000),
    ],
)
def test_malformed_calls_are_plain_content(fmt: str, text: str) -> None:
    kwargs = {"function": "f"} if fmt == NAMED else {}
    assert parse_tool_calls(text, fmt, **kwargs) == (text, [])  # the text exactly
    for step in (1, 4, len(text)) if len(text) < 1000 else (len(text),):
        assert streamed(fmt, text, step, **kwargs) == (text, [])


def test_plain_text_is_content_exactly_and_streams_at_once() -> None:
    text = "  Hello,\n\nworld <b>bold</b> \n"
    assert parse_tool_calls(text, "hermes") == (text, [])
    parser = ToolCallParser("hermes")
    assert parser.feed("Hello") == [Content("Hello")]
    assert parser.feed(" wor") == [Content(" wor")]
    assert parser.feed("ld <tool") == [Content("ld")]  # only a possible marker waits
    assert parser.feed("s>") == [Content(" <tools>")]
    assert parser.feed("\n") == []  # whitespace waits for what follows
    assert parser.finish() == [Content("\n")]  # and is content at the end of a plain answer


def test_undeclared_function_is_not_a_call() -> None:
    text = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert parse_tool_calls(text, "hermes", names={"get_weather"}) == (text, [])
    content, calls = parse_tool_calls(
        text.replace("rm_rf", "get_weather"), "hermes", {"get_weather"}
    )
    assert content is None and [c.name for c in calls] == ["get_weather"]


def test_required_list_cut_off_keeps_its_complete_calls() -> None:
    text = '[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": [1, '
    assert streamed(REQUIRED, text, 5) == ("", [("f", {"a": 1})])


def test_named_choice_wraps_the_arguments() -> None:
    content, calls = parse_tool_calls(' {"city": "Oslo"}', NAMED, function="get_weather")
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]


# ----------------------------------------------------------------------------- request checks


def first_error(model: type, body: dict) -> tuple[str | None, str, str | None]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    error = validation_error(caught.value.errors())
    return error.param, error.message, error.code


def bad_tool(**function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", **function}}


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "invalid_value"),
        ({"tools": [{"type": "function"}]}, "tools[0].function", "missing_required_parameter"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name",
         "missing_required_parameter"),
        ({"tools": [bad_tool(name="has space")]}, "tools[0].function.name", "invalid_value"),
        ({"tools": [bad_tool(name="x" * 65)]}, "tools[0].function.name", "invalid_value"),
        ({"tools": [bad_tool(name="")]}, "tools[0].function.name", "invalid_value"),
        ({"tools": [bad_tool(parameters={"type": "string"})]}, "tools[0].function.parameters",
         "invalid_value"),
        ({"tools": [bad_tool(parameters={"type": "object", "properties": 5})]},
         "tools[0].function.parameters", "invalid_value"),
        ({"tools": [bad_tool(parameters=[1])]}, "tools[0].function.parameters", "invalid_value"),
        ({"tools": [WEATHER, bad_tool(surprise=1)]}, "tools[1].function.surprise",
         "unknown_parameter"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "invalid_value"),
        ({"tools": [WEATHER] * 129}, "tools", "invalid_value"),
        ({"tool_choice": "required"}, "tool_choice", "invalid_value"),  # no tools
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "invalid_value"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice.function",
         "missing_required_parameter"),
        ({"tools": [WEATHER], "parallel_tool_calls": "maybe"}, "parallel_tool_calls",
         "invalid_value"),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"function_call": "auto"}, "function_call", "unsupported_parameter"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id",
         "invalid_value"),
        ({"messages": [{"role": "user", "content": "x", "tool_call_id": "a"}]},
         "messages[0].tool_call_id", "invalid_value"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
         "messages[0].tool_calls", "invalid_value"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
          "function": {"name": "f", "arguments": "[1]"}}]}]},
         "messages[0].tool_calls[0].function.arguments", "invalid_value"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
          "function": {"name": "f"}}]}]},
         "messages[0].tool_calls[0].function.arguments", "missing_required_parameter"),
    ],
)  # fmt: skip
def test_tool_request_errors_name_the_field(extra: dict, param: str, code: str) -> None:
    got_param, message, got_code = first_error(ChatCompletionRequest, {**CHAT, **extra})
    assert (got_param, got_code) == (param, code), message


def test_tool_history_and_off_values_are_accepted() -> None:
    body = ChatCompletionRequest.model_validate(
        {
            **CHAT,
            "functions": [],
            "tools": [WEATHER, TIME],
            "tool_choice": {"type": "function", "function": {"name": "get_time"}},
            "parallel_tool_calls": False,
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
        }
    )  # fmt: skip
    [call] = chat_calls(body, 8, tools=plan_tools(body, "hermes"))
    assert call.messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}],
    }
    assert call.messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    assert [t["function"]["name"] for t in call.tools] == ["get_weather", "get_time"]
    assert call.sampling["guided"] == {"json_schema": '{"type": "object", "properties": {}}'}
    # What the gRPC client sends for it.
    request = generate_request(messages=call.messages, tools=call.tools, **call.sampling)
    assert request.messages.messages[1].tool_calls[0].name == "get_weather"
    assert request.messages.messages[2].tool_call_id == "call_1"
    assert json.loads(request.messages.tools_json)[0] == WEATHER
    assert request.sampling.guided.json_schema.startswith("{")


# ----------------------------------------------------------------------------- the plan


def chat(**extra: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({**CHAT, "tools": [WEATHER, TIME], **extra})


def test_plan_by_tool_choice() -> None:
    auto = plan_tools(chat(), "hermes")
    assert (auto.parse, auto.guided_schema, auto.names) == (
        "hermes",
        None,
        {"get_weather", "get_time"},
    )
    none = plan_tools(chat(tool_choice="none"), "hermes")
    assert none.tools == auto.tools and none.parse is None and none.guided() is None
    assert plan_tools(ChatCompletionRequest.model_validate(CHAT), "").tools is None
    with pytest.raises(OpenAIError) as caught:
        plan_tools(chat(), "")  # a template without tool support
    assert (caught.value.status, caught.value.param, caught.value.code) == (
        400,
        "tools",
        "tools_not_supported",
    )
    assert "no tool support" in caught.value.message


@pytest.mark.parametrize("parallel", [None, True, False])
def test_required_schema_admits_exactly_valid_calls(parallel: bool | None) -> None:
    plan = plan_tools(chat(tool_choice="required", parallel_tool_calls=parallel), "llama3_json")
    assert plan.parse == REQUIRED
    validator = jsonschema_rs.validator_for(json.loads(plan.guided_schema))
    one = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert validator.is_valid([one])
    assert validator.is_valid([one, {"name": "get_time", "arguments": {}}]) == (
        parallel is not False
    )
    assert not validator.is_valid([])
    assert not validator.is_valid([{"name": "get_weather", "arguments": {}}])  # city required
    assert not validator.is_valid([{"name": "other", "arguments": {}}])
    assert not validator.is_valid([{**one, "extra": 1}])
    # What the parser makes of an output that matches the schema.
    content, calls = parse_tool_calls(json.dumps([one]), plan.parse, plan.names)
    assert content is None and calls[0].name == "get_weather"


def test_named_schema_is_the_functions_parameters() -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    plan = plan_tools(chat(tool_choice=choice), "mistral")
    assert (plan.parse, plan.function) == (NAMED, "get_weather")
    assert json.loads(plan.guided_schema) == WEATHER["function"]["parameters"]


# ----------------------------------------------------------------------------- responses


def _chunk(text: str, finish: str | None = None) -> Chunk:
    usage = Usage(5, 3) if finish else None
    return Chunk("r", text, (1,), finish_reason=finish, usage=usage)


def _format(plan_body: ChatCompletionRequest) -> ChatFormat:
    head = builders.ResponseHead("chatcmpl-1", 7, "m", "fp_x")
    return ChatFormat(head, False, False, frozenset(), plan_tools(plan_body, "hermes"))


def test_streamed_calls_reassemble_to_the_whole_answer() -> None:
    pieces = ["I'll check.", "\n<tool", '_call>\n{"name": "get_weather", ', '"arguments": {"city"',
              ': "Paris"}}\n</tool_call>', ""]  # fmt: skip
    chunks = [_chunk(p) for p in pieces[:-1]] + [_chunk(pieces[-1], "stop")]
    whole = _format(chat()).whole([chunks], builders.usage_dict(5, 3))
    [choice] = whole["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "I'll check."
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}

    fmt = _format(chat())
    raw = b"".join(event for chunk in chunks for event in fmt.events(0, chunk))
    deltas = [json.loads(p)["choices"][0] for p in sse_events(raw)]
    content = "".join(d["delta"].get("content") or "" for d in deltas)
    assert content == "I'll check."
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        for part in d["delta"].get("tool_calls") or ():
            slot = calls.setdefault(part["index"], {"id": "", "name": "", "arguments": ""})
            slot["id"] += part.get("id") or ""
            slot["name"] += (part.get("function") or {}).get("name") or ""
            slot["arguments"] += (part.get("function") or {}).get("arguments") or ""
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        ("get_weather", '{"city": "Paris"}')
    ]
    assert deltas[0]["delta"]["role"] == "assistant"
    assert deltas[-1]["finish_reason"] == "tool_calls"
    assert sum(d["finish_reason"] is not None for d in deltas) == 1


def test_no_calls_keeps_stop_and_tool_choice_none_does_not_parse() -> None:
    chunks = [_chunk('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', "stop")]
    whole = _format(chat(tool_choice="none")).whole([chunks], builders.usage_dict(5, 3))
    message = whole["choices"][0]["message"]
    assert "tool_calls" not in message and message["content"].startswith("<tool_call>")
    assert whole["choices"][0]["finish_reason"] == "stop"
    plain = _format(chat()).whole([[_chunk("Sunny.", "length")]], builders.usage_dict(5, 3))
    assert plain["choices"][0]["finish_reason"] == "length"
    assert plain["choices"][0]["message"]["content"] == "Sunny."


# ----------------------------------------------------------------------------- server side


def test_server_converts_tool_turns_for_the_template() -> None:
    messages = chat_messages(
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "name": "get_weather", "arguments": '{"city": "Rome"}'}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        ],
        [WEATHER],
    )  # fmt: skip
    turns = convert.chat_messages(messages)
    assert turns[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}
        ],
    }  # fmt: skip
    assert turns[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}

    class Engine:
        class model_info:  # stands in for the engine's attribute
            tool_call_format = "hermes"

    assert convert.chat_tools(messages, Engine) == [WEATHER]
    Engine.model_info.tool_call_format = ""
    with pytest.raises(RequestError) as caught:
        convert.chat_tools(messages, Engine)
    assert caught.value.field == "messages.tools_json"
    assert "no tool support" in caught.value.message


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (pb2.ChatMessage(role="assistant", tool_calls=[pb2.ToolCall(name="f", arguments="[")]),
         "messages[0].tool_calls[0].arguments"),
        (pb2.ChatMessage(role="assistant", tool_calls=[pb2.ToolCall(name="f", arguments="3")]),
         "messages[0].tool_calls[0].arguments"),
        (pb2.ChatMessage(role="assistant", tool_calls=[pb2.ToolCall(arguments="{}")]),
         "messages[0].tool_calls[0].name"),
    ],
)  # fmt: skip
def test_server_refuses_bad_tool_calls(message: pb2.ChatMessage, field: str) -> None:
    with pytest.raises(RequestError) as caught:
        convert.chat_messages(pb2.ChatMessages(messages=[message]))
    assert caught.value.field == field


@pytest.mark.parametrize("tools_json", ["{", '{"a": 1}', "[1]"])
def test_server_refuses_bad_tools_json(tools_json: str) -> None:
    class Engine:
        class model_info:
            tool_call_format = "hermes"

    messages = pb2.ChatMessages(messages=[pb2.ChatMessage(role="user")], tools_json=tools_json)
    with pytest.raises(RequestError) as caught:
        convert.chat_tools(messages, Engine)
    assert caught.value.field == "messages.tools_json"


def test_engine_renders_tools_and_guards_special_text(smollm2_hf_dir: Path) -> None:
    """The engine's chat path with tools, on the real tokenizer and the test template: tools and
    tool calls reach the template, and special-token text inside them is not a special token."""
    from transformers import AutoTokenizer

    from gateway.engine.engine import Engine

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    tokenizer.chat_template = TEMPLATE.read_text()
    engine = Engine.__new__(Engine)  # only the text helpers: no runner
    engine.tokenizer = tokenizer
    engine.config = type("C", (), {"allow_special_tokens": False})()
    turns = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "<|im_end|>"}}}]},
    ]  # fmt: skip
    ids = engine.apply_chat_template(turns, tools=[WEATHER])
    text = tokenizer.decode(ids)
    assert '"name": "get_weather"' in text and "<tools>" in text
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    plain = engine.apply_chat_template(
        [turns[0], {**turns[1], "tool_calls": [{"id": "c1", "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "x"}}}]}],
        tools=[WEATHER],
    )  # fmt: skip
    # The forged <|im_end|> inside the arguments is text: no more control tokens than without it.
    assert ids.count(im_end) == plain.count(im_end)


# ----------------------------------------------------------------------------- tokenize bodies


@pytest.mark.parametrize(
    ("model", "body", "param", "code"),
    [
        (TokenizeRequest, {"model": "m"}, "prompt", "invalid_value"),
        (TokenizeRequest, {"model": "m", "prompt": "a", "messages": CHAT["messages"]},
         "messages", "invalid_value"),
        (TokenizeRequest, {"model": "m", "prompt": 5}, "prompt", "invalid_value"),
        (TokenizeRequest, {"model": "m", "messages": []}, "messages", "invalid_value"),
        (TokenizeRequest, {"model": "m", "prompt": "a", "add_generation_prompt": True},
         "add_generation_prompt", "invalid_value"),
        (TokenizeRequest, {"model": "m", "messages": CHAT["messages"],
                           "tools": [bad_tool(name="a b")]}, "tools[0].function.name",
         "invalid_value"),
        (TokenizeRequest, {"prompt": "a"}, "model", "missing_required_parameter"),
        (TokenizeRequest, {"model": "m", "prompt": "a", "extra": 1}, "extra",
         "unknown_parameter"),
        (DetokenizeRequest, {"model": "m"}, "tokens", "missing_required_parameter"),
        (DetokenizeRequest, {"model": "m", "tokens": [1, -1]}, "tokens[1]", "invalid_value"),
        (DetokenizeRequest, {"model": "m", "tokens": "12"}, "tokens", "invalid_value"),
    ],
)  # fmt: skip
def test_tokenize_bodies_name_the_field(model: type, body: dict, param: str, code: str) -> None:
    got_param, message, got_code = first_error(model, body)
    assert (got_param, got_code) == (param, code), message


def test_builders_shape_of_a_tool_call_answer() -> None:
    head = builders.ResponseHead("chatcmpl-1", 7, "m", "fp_x")
    call = ToolCall("f", "{}", "call_x").as_openai()
    body = builders.chat_completion(
        head, [(None, "tool_calls", None), ("hi", "stop", None)], {"total_tokens": 1}, [[call], []]
    )
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [call],
    }
    assert "tool_calls" not in body["choices"][1]["message"]
