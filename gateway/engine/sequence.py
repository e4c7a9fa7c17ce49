"""One request's text pipeline inside the engine loop (token -> incremental detokenizer ->
stop-string matcher -> TokenEvent) and its timings. Where its tokens sit in the KV cache is the
scheduler's business (gateway/engine/scheduler.py)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from gateway.engine.detokenizer import DecodeFn, IncrementalDetokenizer
from gateway.engine.params import SamplingParams
from gateway.engine.stop import StopStringMatcher
from gateway.engine.types import FinishReason, Timings, TokenEvent, TokenLogprob, Usage


class SequenceState:
    """State of one request. Only the engine loop thread touches it."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        max_tokens: int,
        eos_token_ids: frozenset[int],
        decode: DecodeFn,
        submitted_at: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.max_tokens = max_tokens
        self.num_generated = 0
        self.finished = False
        self.submitted_at = time.perf_counter() if submitted_at is None else submitted_at
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self._end_token_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else eos_token_ids
        )
        self._detokenizer = IncrementalDetokenizer(decode, prompt_token_ids)
        self._stop = StopStringMatcher(params.stop)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def on_token(
        self, token_id: int, logprob: TokenLogprob | None, *, grammar_ended: bool = False
    ) -> TokenEvent:
        """Account for one sampled token and return its event (final when the request ends).

        `grammar_ended`: the request's grammar (guided decoding) allows nothing after this token,
        so the request stops here."""
        self.num_generated += 1
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        logprobs = None if logprob is None else [logprob]
        # The sampler masks end tokens until min_tokens; this guard keeps the rule in one place.
        if token_id in self._end_token_ids and self.num_generated > self.params.min_tokens:
            text, _ = self._drain()
            return self._final(text, [token_id], logprobs, "stop")
        text, matched = self._feed_stop(self._detokenizer.push(token_id))
        if matched:
            return self._final(text, [token_id], logprobs, "stop")
        if grammar_ended:
            return self._final(text + self._drain()[0], [token_id], logprobs, "stop")
        if self.num_generated >= self.max_tokens:
            tail, matched = self._drain()
            return self._final(text + tail, [token_id], logprobs, "stop" if matched else "length")
        return TokenEvent(self.request_id, text, [token_id], logprobs)

    def abort(self, reason: FinishReason, error: str | None = None) -> TokenEvent:
        """End the request from outside (cancel, shutdown, error)."""
        text = "" if error is not None else self._drain()[0]
        return self._final(text, [], None, reason, error)

    def _stop_active(self) -> bool:
        # As vLLM: stop strings do not end a request before min_tokens.
        return self.num_generated >= self.params.min_tokens

    def _feed_stop(self, text: str) -> tuple[str, bool]:
        if not self._stop_active():
            return text, False
        return self._stop.feed(text)

    def _drain(self) -> tuple[str, bool]:
        text, matched = self._feed_stop(self._detokenizer.flush())
        if matched:
            return text, True
        return text + self._stop.flush(), False

    def _final(
        self,
        text: str,
        token_ids: list[int],
        logprobs: list[TokenLogprob] | None,
        reason: FinishReason,
        error: str | None = None,
    ) -> TokenEvent:
        self.finished = True
        now = time.perf_counter()
        start = self.submitted_at
        timings = Timings(
            queued_s=((self.admitted_at or now) - start),
            ttft_s=None if self.first_token_at is None else self.first_token_at - start,
            total_s=now - start,
        )
        usage = Usage(self.prompt_len, self.num_generated)
        return TokenEvent(self.request_id, text, token_ids, logprobs, reason, error, usage, timings)
