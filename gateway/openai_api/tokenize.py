"""POST /v1/tokenize and /v1/detokenize: the gRPC Tokenize and Detokenize RPCs, in vLLM's shapes.

    {"model", "prompt"}                                -> {"tokens", "count", "max_model_len"}
    {"model", "messages", "add_generation_prompt", "tools"}  (the chat template, as chat does)
    {"model", "tokens"}                                -> {"prompt"}

Token ids are those Generate sees for the same input: a prompt gets the tokenizer's special
tokens (BOS), messages go through the chat template with the assistant's generation prompt
(unless `add_generation_prompt` is false).
Detokenizing keeps special tokens, so that detokenize(tokenize(x)) gives back what the model saw.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.openai_api.schemas import (
    MAX_MODEL_NAME_CHARS,
    MAX_TOOLS,
    ChatMessage,
    FieldError,
    ToolDefinition,
    check_tool_messages,
    check_tools,
)

TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class TokenizeRequest(BaseModel):
    """Exactly one of `prompt` and `messages`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=MAX_MODEL_NAME_CHARS)
    prompt: str | None = Field(default=None, description="Text, tokenized as a completion's.")
    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1, description="Chat turns, through the model's chat template."
    )
    add_generation_prompt: bool | None = Field(
        default=None,
        description="With messages: end with the assistant's generation prompt [true].",
    )
    tools: Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS)] | None = Field(
        default=None, description="With messages: rendered by the chat template, as chat does."
    )

    @model_validator(mode="after")
    def _check(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            param = "prompt" if self.messages is None else "messages"
            raise FieldError(param, "give exactly one of prompt and messages")
        if self.prompt is not None:
            for name in ("add_generation_prompt", "tools"):
                if getattr(self, name) is not None:
                    raise FieldError(name, "is only allowed with messages")
        check_tools(self.tools or [])
        check_tool_messages(self.messages or [])
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=MAX_MODEL_NAME_CHARS)
    tokens: list[TokenId] = Field(description="Token ids of the model's vocabulary.")


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


TOKENIZE_PARAMS = {
    "text": "prompt",
    "messages.tools_json": "tools",
    "messages": "messages",
    "input": "prompt",
}
DETOKENIZE_PARAMS = {"token_ids": "tokens"}
