"""Request bodies of the OpenAI-compatible endpoints, and the response shapes the schema documents.

The request models are what FastAPI validates against (a failure becomes a 400 naming the field,
see errors.py) and what the served OpenAPI schema describes, so the two never disagree. Unknown
fields are refused rather than ignored: a caller who sends a field this server does not know must
learn that it is not honoured. Fields OpenAI clients commonly send that change nothing about
the tokens (user, metadata, store, ...) are accepted and ignored; so are the "off" values of the
unsupported features (`logit_bias: {}`). `response_format` is response_format.py's.

Responses are built as plain dicts on the hot path (builders.py); the response models here only
document them in the OpenAPI schema.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.openai_api.response_format import ResponseFormat

# Limits of the upstream engine (gateway/engine/params.py) and of protobuf's int64 seed.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 512
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 20
MAX_CHOICES = 16  # n
MAX_FAN_OUT = 64  # n x prompts: upstream calls one request may open
SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1
MAX_TOKENS_LIMIT = 2**31 - 1  # the proto's int32
# Model names are short (Hugging Face ids are at most 96); a longer one can never be served, and
# the server's "unknown model" error would not fit in gRPC's metadata limit.
MAX_MODEL_NAME_CHARS = 256

PositiveTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = Field(
        default=None, description="Send a last chunk (with no choices) that carries the usage."
    )


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


# OpenAI's rule for function names; a tool list longer than OpenAI's limit is refused too.
FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_TOOLS = 128


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="A JSON Schema of an object (type 'object'); none: no arguments.",
    )
    strict: bool | None = Field(
        default=None,
        description="Accepted; with tool_choice 'required' or a named function the arguments "
        "are always constrained by the schema, otherwise never.",
    )


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionName


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    arguments: str = Field(description="JSON text of an object.")


class ToolCall(BaseModel):
    """A call the assistant made (request history and responses)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(BaseModel):
    """One turn. `developer` is passed to the chat template as `system`; content given as text
    parts is joined. An assistant turn may carry the `tool_calls` it made (content null), and a
    `tool` turn answers one of them by `tool_call_id`. Images and audio are not supported."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = Field(default=None, description="Accepted and ignored.")
    refusal: str | None = Field(default=None, description="Accepted and ignored.")
    tool_calls: list[ToolCall] | None = Field(default=None, description="Assistant turns only.")
    tool_call_id: str | None = Field(
        default=None, description="Tool turns: the call this answers (required)."
    )

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class _AcceptedOffValues(BaseModel):
    """Fields OpenAI clients send that this server ignores, or accepts only in their "off" form
    (anything else is refused with 400 naming the field, see `_refuse_unsupported`)."""

    user: str | None = Field(default=None, description="Accepted and ignored.")
    metadata: dict[str, str] | None = Field(default=None, description="Accepted and ignored.")
    store: bool | None = Field(default=None, description="Accepted and ignored.")
    service_tier: str | None = Field(default=None, description="Accepted and ignored.")
    safety_identifier: str | None = Field(default=None, description="Accepted and ignored.")
    prompt_cache_key: str | None = Field(default=None, description="Accepted and ignored.")
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Not supported: only null or {} is accepted."
    )


class _SamplingFields(_AcceptedOffValues):
    model: str = Field(
        max_length=MAX_MODEL_NAME_CHARS,
        description="The served model's name (GET /v1/models lists it).",
    )
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES, description="Choices to generate.")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Stop | None = Field(
        default=None,
        description=f"Up to {MAX_STOP_STRINGS} strings; generation stops before any of them and "
        "the stop text is never part of the output.",
    )
    seed: int | None = Field(
        default=None,
        ge=SEED_MIN,
        le=SEED_MAX,
        description="Makes sampling reproducible; choice i of n uses seed + i.",
    )
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # Extensions (vLLM's names).
    top_k: int | None = Field(
        default=None, ge=-1, le=MAX_TOKENS_LIMIT, description="Extension: 0 or -1 turns it off."
    )
    # Bounded below: dividing logits by a penalty near 0 overflows them to inf in the engine.
    repetition_penalty: float | None = Field(
        default=None, ge=0.01, le=100.0, allow_inf_nan=False, description="Extension (HF's)."
    )
    min_tokens: int | None = Field(
        default=None, ge=0, le=MAX_TOKENS_LIMIT, description="Extension: no EOS before this many."
    )
    ignore_eos: bool | None = Field(default=None, description="Extension: keep going past EOS.")

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise _field_error("stream_options", "is only allowed when stream is true")
        return self


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: PositiveTokens | None = Field(
        default=None, description="Deprecated by OpenAI in favour of max_completion_tokens."
    )
    max_completion_tokens: PositiveTokens | None = Field(
        default=None,
        description="New tokens at most; when neither this nor max_tokens is given, up to the "
        "model's context length.",
    )
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    tools: Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS)] | None = Field(
        default=None,
        description="Functions the model may call, rendered by the model's chat template (a "
        "model whose template has no tool support refuses them).",
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None,
        description="'auto' (the default with tools): the model decides; 'none': tools are "
        "rendered but no call is parsed; 'required' or a named function: the output is "
        "constrained to calls whose arguments match the function's schema.",
    )
    parallel_tool_calls: bool | None = Field(
        default=None,
        description="false: with 'required' or a named function, exactly one call [true].",
    )
    # OpenAI's deprecated function calling: off values only (tools replace it).
    functions: list[Any] | None = Field(
        default=None,
        description="Deprecated by OpenAI; not supported (use tools): only null or [].",
    )
    function_call: Any | None = Field(
        default=None, description="Deprecated by OpenAI; not supported (use tool_choice)."
    )
    response_format: ResponseFormat = None
    modalities: list[Literal["text"]] | None = Field(default=None, description="Only ['text'].")

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise _field_error("top_logprobs", "needs logprobs set to true")
        _check_tool_fields(self)
        if self.logit_bias:
            raise _unsupported("logit_bias", "logit_bias is not supported")
        return self

    def max_new_tokens(self) -> int | None:
        """max_completion_tokens wins over the deprecated max_tokens when both are given."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


def _check_tool_fields(body: ChatCompletionRequest) -> None:
    """Checks across the tool fields and the messages, naming the field at fault."""
    if body.functions:
        raise _unsupported("functions", "the deprecated functions API is not supported; use tools")
    if body.function_call is not None:
        raise _unsupported(
            "function_call", "the deprecated functions API is not supported; use tool_choice"
        )
    tools = body.tools or []
    check_tools(tools)
    names = [tool.function.name for tool in tools]
    choice = body.tool_choice
    if choice not in (None, "none") and not tools:
        raise _field_error("tool_choice", "is only allowed when tools are given")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise _field_error(
            "tool_choice", f"names {choice.function.name!r}, which is not one of the tools"
        )
    constrained = choice == "required" or isinstance(choice, NamedToolChoice)
    if constrained and _response_format_type(body.response_format) not in (None, "text"):
        raise _field_error(
            "tool_choice", "'required' or a named function cannot be combined with response_format"
        )
    check_tool_messages(body.messages)


def check_tools(tools: list[ToolDefinition]) -> None:
    names: set[str] = set()
    for i, tool in enumerate(tools):
        problem = parameters_problem(tool.function.parameters)
        if problem:
            raise _field_error(f"tools[{i}].function.parameters", problem)
        if tool.function.name in names:
            raise _field_error(
                f"tools[{i}].function.name", f"{tool.function.name!r} is declared twice"
            )
        names.add(tool.function.name)


def check_tool_messages(messages: list[ChatMessage]) -> None:
    """Tool turns answer a call by id; only assistant turns make calls, with object arguments."""
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.role == "tool" and not message.tool_call_id:
            raise _field_error(f"{where}.tool_call_id", "is required for a tool message")
        if message.role != "tool" and message.tool_call_id is not None:
            raise _field_error(f"{where}.tool_call_id", "is only allowed on tool messages")
        if message.tool_calls is not None and message.role != "assistant":
            raise _field_error(f"{where}.tool_calls", "is only allowed on assistant messages")
        for j, call in enumerate(message.tool_calls or ()):
            if not _is_json_object(call.function.arguments):
                raise _field_error(
                    f"{where}.tool_calls[{j}].function.arguments", "must be JSON text of an object"
                )


def parameters_problem(parameters: dict[str, Any] | None) -> str | None:
    """Why a function's parameters are no JSON Schema of an object (None: they are)."""
    if parameters is None:
        return None
    if parameters.get("type", "object") != "object":
        return "must be a JSON Schema of type 'object'"
    try:
        import jsonschema_rs

        jsonschema_rs.meta.validate(parameters)
    except ImportError:  # pragma: no cover - optional: only the type is checked then
        return None
    except Exception as exc:  # jsonschema_rs raises ValidationError or ValueError
        return f"is not a valid JSON Schema: {str(exc).splitlines()[0]}"
    return None


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


def _response_format_type(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("type")
    return getattr(value, "type", None)


TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1)]
Prompt = str | Annotated[list[str], Field(min_length=1)] | TokenIds
Prompts = Prompt | Annotated[list[TokenIds], Field(min_length=1)]


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompts = Field(
        description="A string, a list of strings (one set of n choices each), a list of token "
        "ids, or a list of such lists."
    )
    max_tokens: PositiveTokens | None = Field(default=16, description="New tokens at most [16].")
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_COMPLETION_LOGPROBS,
        description="The chosen token's logprob and this many alternatives.",
    )
    echo: bool | None = Field(default=None, description="Not supported: only false.")
    suffix: str | None = Field(default=None, description="Not supported: only null.")
    best_of: int | None = Field(default=None, ge=1, description="Only equal to n (or 1).")
    response_format: ResponseFormat = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.echo:
            raise _unsupported("echo", "echo is not supported")
        if self.suffix:
            raise _unsupported("suffix", "suffix (insertion) is not supported")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise _unsupported("best_of", "best_of must equal n (no server-side reranking)")
        if self.logit_bias:
            raise _unsupported("logit_bias", "logit_bias is not supported")
        prompts = len(self.prompt_list())
        if prompts * (self.n or 1) > MAX_FAN_OUT:
            raise _field_error(
                "prompt", f"prompts x n is {prompts * (self.n or 1)}, over the limit {MAX_FAN_OUT}"
            )
        return self

    def prompt_list(self) -> list[str | list[int]]:
        """Each prompt on its own: a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]


class FieldError(ValueError):
    """A check across fields failed; `errors.py` turns it into a 400 naming `param`."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message
        self.code = code


def _field_error(param: str, message: str) -> FieldError:
    return FieldError(param, message)


def _unsupported(param: str, message: str) -> FieldError:
    return FieldError(param, message, code="unsupported_parameter")


# ----------------------------------------------------------------------------- responses


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Status(BaseModel):
    status: str
    upstream: str | None = None


SSE_DESCRIPTION = (
    "With `stream: true`: server-sent events, one `data: {chunk}` per event (a "
    "chat.completion.chunk or text_completion object; an `{error}` object if the stream fails "
    "after it started), ended by `data: [DONE]`."
)
