"""What a chat request's tool fields ask of the upstream and of the response: `ToolPlan`.

- tools rendered: every declared tool, whatever tool_choice is (OpenAI renders them for "none"
  too), through the model's chat template, upstream;
- output constrained: with tool_choice "required" or a named function, a JSON schema for guided
  decoding (gptqgw.v1 SamplingParams.guided). The output is then bare JSON, not the template's
  call format: for "required", a list of `{"name": <a declared name>, "arguments": <its
  parameters>}` objects (exactly one with parallel_tool_calls false); for a named function, just
  its arguments object, which the shim wraps in a call to that function. Constraining the whole
  call, name included, is what makes it always parse, and the bare JSON needs no template marker;
- output parsed: by the model's own format for "auto" (tool_parsers.py), by the guided shape for
  "required" and named, not at all for "none".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.openai_api.errors import OpenAIError
from gateway.openai_api.schemas import ChatCompletionRequest, NamedToolChoice
from gateway.openai_api.tool_parsers import NAMED, REQUIRED

EMPTY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]] | None = None  # for the chat template; None: no tools
    parse: str | None = None  # tool_parsers format of the output; None: plain text
    function: str | None = None  # NAMED: the function the output is the arguments of
    names: frozenset[str] = frozenset()  # declared functions: calls to others are text
    guided_schema: str | None = None  # JSON Schema text the output is constrained to

    def guided(self) -> dict[str, str] | None:
        """The upstream SamplingParams.guided value."""
        return None if self.guided_schema is None else {"json_schema": self.guided_schema}


NO_TOOLS = ToolPlan()


def plan_tools(body: ChatCompletionRequest, tool_call_format: str) -> ToolPlan:
    """The plan for this request on a model whose template writes `tool_call_format` calls
    ("" when it has no tool support: a request with tools is a 400 then)."""
    if not body.tools:
        return NO_TOOLS
    if not tool_call_format:
        raise tools_not_supported()
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    names = frozenset(tool.function.name for tool in body.tools)
    choice = body.tool_choice or "auto"
    if choice == "none":
        return ToolPlan(tools=tools, names=names)
    if choice == "auto":
        return ToolPlan(tools=tools, parse=tool_call_format, names=names)
    single = body.parallel_tool_calls is False
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        schema = _parameters(body, name)
        return ToolPlan(tools, NAMED, name, names, json.dumps(schema, ensure_ascii=False))
    return ToolPlan(tools, REQUIRED, None, names, required_schema(body, single))


def tools_not_supported() -> OpenAIError:
    return OpenAIError(
        400,
        "This model's chat template has no tool support, so it cannot be given tools.",
        param="tools",
        code="tools_not_supported",
    )


def _parameters(body: ChatCompletionRequest, name: str) -> dict[str, Any]:
    for tool in body.tools or ():
        if tool.function.name == name:
            return tool.function.parameters or EMPTY_OBJECT_SCHEMA
    raise AssertionError(f"{name!r} was checked to be declared")  # pragma: no cover


def required_schema(body: ChatCompletionRequest, single: bool) -> str:
    """A non-empty list of calls, each a declared function's name with matching arguments."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool.function.name},
                "arguments": tool.function.parameters or EMPTY_OBJECT_SCHEMA,
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in body.tools or ()
    ]
    schema: dict[str, Any] = {
        "type": "array",
        "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
        "minItems": 1,
    }
    if single:
        schema["maxItems"] = 1
    return json.dumps(schema, ensure_ascii=False)
