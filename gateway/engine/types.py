"""Plain data the engine takes and gives: requests, token events, stats, model info."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.engine.params import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The sampled token's log-probability under the raw model distribution, and the top-N."""

    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds since the request was submitted. `ttft_s` is None when no token was produced."""

    queued_s: float
    ttft_s: float | None
    total_s: float


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One step's output for one request.

    `text` is the new text (never half a UTF-8 character, never any part of a stop string; it may be
    "" while text is held back). `token_ids` are every token sampled in this step, including a final
    EOS or stop token whose text is not shown. The last event of a stream has `finish_reason`,
    `usage` and `timings`; `error` is set when `finish_reason` is "error".
    """

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int  # sequences holding a place in the batch (preempted ones included)
    waiting: int  # requests not admitted yet
    max_num_seqs: int
    kv_blocks_used: int  # blocks referenced by live sequences
    kv_blocks_total: int
    block_size: int
    prompt_tokens_total: int
    generated_tokens_total: int
    prefix_query_tokens_total: int  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens_total: int  # of those, tokens whose KV was reused
    preemptions_total: int
    steps_total: int
    step_tokens_total: int  # tokens computed over all steps (mean batch = this / steps_total)
    # gateway/engine/step_timing.py: steps per kind, and seconds per (kind, phase)
    steps_by_kind: dict[str, int] = field(default_factory=dict)
    step_phase_seconds: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def kv_tokens_used(self) -> int:
        return self.kv_blocks_used * self.block_size

    @property
    def kv_tokens_total(self) -> int:
        return self.kv_blocks_total * self.block_size


@dataclass(frozen=True)
class ModelInfo:
    name: str
    context_length: int
    vocab_size: int
    quantization: dict[str, Any] | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None = None
    # How the chat template writes tool calls (gateway/engine/tool_format.py); "" = no tools.
    tool_call_format: str = ""
