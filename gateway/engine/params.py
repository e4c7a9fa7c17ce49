"""Per-request sampling parameters and their validation (errors name the attribute)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.engine.errors import InvalidParameter

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 512
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20
# torch.Generator.manual_seed accepts this range; OpenAI clients send any 64-bit integer.
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1
# Outside this range the penalty is no penalty but a multiplier that overflows the logits to inf
# or 0 (1e-300 gave non-finite logits); the REST shim's schema uses the same bounds.
REPETITION_PENALTY_MIN = 0.01
REPETITION_PENALTY_MAX = 100.0
# Below this temperature sampling is numerically greedy, so it is treated as greedy.
GREEDY_TEMPERATURE = 1e-5
# The languages a request can be constrained to (gptqgw.v1.GuidedDecoding's oneof).
GUIDED_KINDS = ("json_schema", "json_object", "regex", "grammar")


@dataclass(frozen=True)
class GuidedDecoding:
    """Constrain the output to a formal language.

    `kind` is one of GUIDED_KINDS; `spec` is the JSON Schema text, the regex or the Lark grammar
    (empty for json_object). Whether the library can compile it is checked at submission.
    """

    kind: str
    spec: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    `max_tokens=None` means "up to the context length". `top_k=0` and `top_p=1.0` disable those
    filters; `temperature=0` is greedy. Penalties follow HF (`repetition_penalty`, over prompt and
    output) and OpenAI (`presence_penalty`, `frequency_penalty`, over the output only).
    `logprobs=N` returns the chosen token's log-probability plus the N most likely alternatives,
    computed from the raw model distribution (before penalties and temperature), as OpenAI does.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    logprobs: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    guided: GuidedDecoding | None = None

    def __post_init__(self) -> None:
        # Accept what JSON gives (a single string or lists) but store tuples: hashable, immutable.
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)):
            stop = tuple(stop)
        object.__setattr__(self, "stop", stop)
        if isinstance(self.stop_token_ids, (list, tuple)):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def validate(self, vocab_size: int) -> None:
        """Raise `InvalidParameter(field, message)` for the first bad field."""
        if self.max_tokens is not None:
            _require_int("max_tokens", self.max_tokens, minimum=1)
        _require_number("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidParameter("temperature", f"must be >= 0, got {self.temperature}")
        _require_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParameter("top_p", f"must be in (0, 1], got {self.top_p}")
        _require_int("top_k", self.top_k, minimum=0)
        if self.seed is not None:
            _require_int("seed", self.seed, minimum=SEED_MIN)
            if self.seed > SEED_MAX:
                raise InvalidParameter("seed", f"must be < 2**64, got {self.seed}")
        _require_number("repetition_penalty", self.repetition_penalty)
        if not REPETITION_PENALTY_MIN <= self.repetition_penalty <= REPETITION_PENALTY_MAX:
            raise InvalidParameter(
                "repetition_penalty",
                f"must be in [{REPETITION_PENALTY_MIN:g}, {REPETITION_PENALTY_MAX:g}], "
                f"got {self.repetition_penalty}",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require_number(name, value)
            if not -2.0 <= value <= 2.0:
                raise InvalidParameter(name, f"must be in [-2, 2], got {value}")
        self._validate_stop()
        self._validate_stop_token_ids(vocab_size)
        if self.logprobs is not None:
            _require_int("logprobs", self.logprobs, minimum=0)
            if self.logprobs > MAX_LOGPROBS:
                raise InvalidParameter(
                    "logprobs", f"must be at most {MAX_LOGPROBS}, got {self.logprobs}"
                )
        if not isinstance(self.ignore_eos, bool):
            raise InvalidParameter("ignore_eos", f"must be a boolean, got {self.ignore_eos!r}")
        _require_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParameter(
                "min_tokens",
                f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )
        self._validate_guided()

    def _validate_guided(self) -> None:
        if self.guided is None:
            return
        if self.guided.kind not in GUIDED_KINDS:
            raise InvalidParameter(
                "guided", f"kind must be one of {', '.join(GUIDED_KINDS)}, got {self.guided.kind!r}"
            )
        if self.guided.kind != "json_object" and not self.guided.spec:
            raise InvalidParameter("guided", f"{self.guided.kind} must not be empty")

    def _validate_stop(self) -> None:
        if not isinstance(self.stop, tuple):
            raise InvalidParameter("stop", "must be a string or a list of strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidParameter(
                "stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}"
            )
        for item in self.stop:
            if not isinstance(item, str):
                raise InvalidParameter("stop", f"must contain strings, got {item!r}")
            if not item:
                raise InvalidParameter("stop", "stop strings must not be empty")
            if len(item) > MAX_STOP_STRING_CHARS:
                raise InvalidParameter(
                    "stop", f"stop strings are limited to {MAX_STOP_STRING_CHARS} characters"
                )

    def _validate_stop_token_ids(self, vocab_size: int) -> None:
        if not isinstance(self.stop_token_ids, tuple):
            raise InvalidParameter("stop_token_ids", "must be a list of token ids")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidParameter(
                "stop_token_ids",
                f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}",
            )
        for token_id in self.stop_token_ids:
            if not _is_int(token_id) or not 0 <= token_id < vocab_size:
                raise InvalidParameter(
                    "stop_token_ids",
                    f"must be token ids in [0, {vocab_size}), got {token_id!r}",
                )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require_int(field: str, value: Any, *, minimum: int) -> None:
    if not _is_int(value):
        raise InvalidParameter(field, f"must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidParameter(field, f"must be >= {minimum}, got {value}")


def _require_number(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(field, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidParameter(field, f"must be finite, got {value}")
