"""Errors the engine raises at submit time; the server maps each one to its own status code."""

from __future__ import annotations

from quantize.errors import UserInputError


class EngineError(Exception):
    """Base class of every error raised by `gateway.engine`."""


class InvalidParameter(EngineError, UserInputError):
    """A request field has a bad value. `field` is the attribute name (`top_p`, `stop`, ...)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class ContextLengthExceeded(EngineError, UserInputError):
    """Prompt plus `max_tokens` does not fit the model's context; the engine never truncates."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length
        # The field a client should change: max_tokens, unless the prompt alone is too long.
        self.field = "max_tokens" if prompt_tokens < context_length else "prompt"
        super().__init__(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
            f"{prompt_tokens + max_tokens} tokens exceeds the model's context length of "
            f"{context_length} tokens"
        )


class KVCacheTooSmall(EngineError, UserInputError):
    """The request's KV (prompt + max_tokens - 1 tokens: the last sampled token is never computed)
    is more than the whole pool holds, so it could never run, even alone (raise --kv-cache-memory
    or lower max_tokens)."""

    def __init__(self, needed_tokens: int, capacity_tokens: int) -> None:
        self.needed_tokens = needed_tokens
        self.capacity_tokens = capacity_tokens
        self.field = "max_tokens"
        super().__init__(
            f"the request needs {needed_tokens} KV-cache tokens (prompt + max_tokens - 1) but "
            f"the whole KV cache holds {capacity_tokens}; lower max_tokens or raise "
            "--kv-cache-memory"
        )


class EngineOverloaded(EngineError):
    """The waiting queue is full (`EngineConfig.max_queue`); the client should retry later."""

    def __init__(self, waiting: int, max_queue: int) -> None:
        self.waiting = waiting
        self.max_queue = max_queue
        super().__init__(
            f"engine overloaded: {waiting} requests are already waiting (max_queue={max_queue})"
        )


class EngineStopped(EngineError):
    """The engine is not running (not started yet, shut down, or its loop died)."""
