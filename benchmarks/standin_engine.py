"""A STAND-IN ENGINE that emits tokens instantly, for measuring the gRPC gateway alone.

It has the engine's API (generate, cancel, stats, encode, model_info, ...) and produces events of
the engine's own types, but computes nothing: each event is made when the server asks for the
next one. Whatever throughput a server reaches with it is the ceiling the gateway layer (server,
protobuf, HTTP/2, client) puts on a real engine. It lives in benchmarks/ on purpose: it is not a
product engine.

Run as a script, it serves itself over gRPC (what bench_grpc.py starts in a subprocess):

    python benchmarks/standin_engine.py --grpc-port 50099 [--tokens-per-event 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree too

from gateway.engine import (
    EngineOverloaded,
    EngineStats,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    Timings,
    TokenEvent,
    Usage,
)

STANDIN_NAME = "instant-standin"
VOCAB_SIZE = 49152


class InstantEngine:
    """Emits `max_tokens` tokens per request as fast as they are consumed (`tokens_per_event` per
    event; 1 is what a real engine does at one decode step per token)."""

    def __init__(self, tokens_per_event: int = 1, max_queue: int = 4096) -> None:
        self.tokens_per_event = tokens_per_event
        self.max_queue = max_queue
        self.model_info = ModelInfo(
            name=STANDIN_NAME,
            context_length=1 << 20,
            vocab_size=VOCAB_SIZE,
            quantization=None,
            eos_token_ids=(0,),
        )
        self._open: set[str] = set()
        self._cancelled: set[str] = set()
        self._prompt_tokens = 0
        self._generated_tokens = 0

    # The text helpers: bytes as token ids, enough for Tokenize/Detokenize round trips.
    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}\n" for m in messages))

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return bytes(t % 256 for t in token_ids).decode("utf-8", errors="replace")

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if len(self._open) >= self.max_queue:
            raise EngineOverloaded(len(self._open), self.max_queue)
        request.params.validate(VOCAB_SIZE)
        self._open.add(request.request_id)
        return self._stream(request)

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        request_id = request.request_id
        started = time.perf_counter()
        prompt_tokens = len(request.prompt_token_ids)
        self._prompt_tokens += prompt_tokens
        max_tokens = request.params.max_tokens or 16
        step = self.tokens_per_event
        produced = 0
        first_at: float | None = None
        try:
            while produced < max_tokens:
                if request_id in self._cancelled:
                    yield self._final(request_id, [], "cancelled", prompt_tokens, produced, started)
                    return
                ids = [(produced + i) % 255 + 1 for i in range(min(step, max_tokens - produced))]
                produced += len(ids)
                self._generated_tokens += len(ids)
                first_at = first_at or time.perf_counter()
                text = "x" * len(ids)
                if produced < max_tokens:
                    yield TokenEvent(request_id, text, ids)
                else:
                    final = self._final(request_id, ids, "length", prompt_tokens, produced, started)
                    yield TokenEvent(
                        request_id,
                        text,
                        ids,
                        finish_reason="length",
                        usage=final.usage,
                        timings=Timings(0.0, first_at - started, time.perf_counter() - started),
                    )
        finally:
            self._open.discard(request_id)
            self._cancelled.discard(request_id)

    @staticmethod
    def _final(
        request_id: str,
        ids: list[int],
        reason: str,
        prompt_tokens: int,
        produced: int,
        started: float,
    ) -> TokenEvent:
        return TokenEvent(
            request_id,
            "",
            ids,
            finish_reason=reason,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens, produced),
            timings=Timings(0.0, None, time.perf_counter() - started),
        )

    def cancel(self, request_id: str) -> bool:
        if request_id in self._open:
            self._cancelled.add(request_id)
            return True
        return False

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self._open),
            waiting=0,
            slots_total=self.max_queue,
            slots_used=len(self._open),
            kv_tokens_used=0,
            kv_tokens_total=0,
            prompt_tokens_total=self._prompt_tokens,
            generated_tokens_total=self._generated_tokens,
        )

    def shutdown(self, timeout: float | None = None) -> bool:
        return True


def standin_engine_types() -> Any:
    from gateway.server import EngineTypes

    return EngineTypes(SamplingParams, GenerationRequest)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--tokens-per-event", type=int, default=1)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)

    from gateway.server import ServerConfig, run
    from gateway.server.logs import configure_logging

    configure_logging("text", args.log_level)
    config = ServerConfig(
        model_name=STANDIN_NAME,
        host=args.host,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        drain_timeout=5.0,
    )
    return run(config, lambda: InstantEngine(args.tokens_per_event), standin_engine_types)


if __name__ == "__main__":
    sys.exit(main())
