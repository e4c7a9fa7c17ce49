"""Request bodies of the OpenAI-compatible endpoints, and the response shapes the schema documents.

The request models are what FastAPI validates against (a failure becomes a 400 naming the field,
see errors.py) and what the served OpenAPI schema describes, so the two never disagree. Unknown
fields are refused rather than ignored: a caller who sends `tools` or `response_format` must learn
that this server does not do them. Fields OpenAI clients commonly send that change nothing about
the tokens (user, metadata, store, ...) are accepted and ignored; so are the "off" values of the
unsupported features (`tools: []`, `logit_bias: {}`, `response_format: {"type": "text"}`).

Responses are built as plain dicts on the hot path (builders.py); the response models here only
document them in the OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class ChatMessage(BaseModel):
    """One turn. `developer` is passed to the chat template as `system`; content given as text
    parts is joined. Tool and function turns, images and audio are not supported."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] | None = None
    name: str | None = Field(default=None, description="Accepted and ignored.")
    refusal: str | None = Field(default=None, description="Accepted and ignored.")

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
    # Off values only.
    tools: list[Any] | None = Field(default=None, description="Not supported: only null or [].")
    tool_choice: Literal["none"] | None = Field(
        default=None, description="Not supported: only null or 'none'."
    )
    parallel_tool_calls: bool | None = Field(default=None, description="Accepted and ignored.")
    response_format: dict[str, Any] | None = Field(
        default=None, description="Not supported: only null or {'type': 'text'}."
    )
    modalities: list[Literal["text"]] | None = Field(default=None, description="Only ['text'].")

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise _field_error("top_logprobs", "needs logprobs set to true")
        if self.tools:
            raise _unsupported("tools", "tool calling is not supported")
        if self.response_format not in (None, {"type": "text"}):
            raise _unsupported("response_format", "only {'type': 'text'} is supported")
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


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


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
