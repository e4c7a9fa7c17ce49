"""A STAND-IN ENGINE that computes nothing, for measuring the gRPC gateway alone.

It has the engine's API (generate, cancel, stats, encode, model_info, ...) and delivers events
the way the real engine does: a producer thread runs "steps", and each step emits one token
event for every open request through the engine's own delivery path (gateway/engine/stream.py:
`AsyncSink`s, `publish`, `RequestStream`). So events pile up in a stream's queue exactly as they
would behind a real engine when the server or the reader falls behind, and the server's
coalescing runs on the production path. The only difference from a real engine is that a step
costs nothing: with `step_rate=0` steps run back to back ("tokens emitted instantly"); with
`step_rate=N` the producer paces itself to N steps per second (an offered load of N tokens/s per
stream). Whatever throughput a server reaches with it is the ceiling the gateway layer (server,
protobuf, HTTP/2, client) puts on a real engine. It lives in benchmarks/ on purpose: it is not a
product engine.

Run as a script, it serves itself over gRPC (what bench_grpc.py starts in a subprocess):

    python benchmarks/standin_engine.py --grpc-port 50099 [--step-rate 0] \
        [--tokens-per-event 1] [--max-tokens-per-chunk 64]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import queue
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
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
from gateway.engine.stream import AsyncSink, RequestStream, Sink, publish

STANDIN_NAME = "instant-standin"
VOCAB_SIZE = 49152


@dataclass(eq=False)
class _Open:
    """One request the producer is generating for."""

    key: int
    request_id: str
    sink: Sink
    prompt_tokens: int
    max_tokens: int
    submitted_at: float
    produced: int = 0
    first_token_at: float | None = None


class InstantEngine:
    """Generates `max_tokens` tokens per request (`tokens_per_event` per event; 1 is what a real
    engine does at one decode step per token) at `step_rate` steps per second, 0 = unpaced."""

    def __init__(
        self, tokens_per_event: int = 1, step_rate: float = 0.0, max_queue: int = 4096
    ) -> None:
        if tokens_per_event < 1:
            raise ValueError("tokens_per_event must be at least 1")
        if step_rate < 0:
            raise ValueError("step_rate must not be negative")
        self.tokens_per_event = tokens_per_event
        self.step_rate = step_rate
        self.max_queue = max_queue
        self.model_info = ModelInfo(
            name=STANDIN_NAME,
            context_length=1 << 20,
            vocab_size=VOCAB_SIZE,
            quantization=None,
            eos_token_ids=(0,),
        )
        self._cond = threading.Condition()
        self._open: dict[int, _Open] = {}  # key -> request; guarded by _cond
        self._by_id: dict[str, int] = {}
        self._keys = itertools.count()
        self._cancel_queue: queue.SimpleQueue[int] = queue.SimpleQueue()  # as the real engine
        self._prompt_tokens = 0
        self._generated_tokens = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="standin-engine", daemon=True)
        self._thread.start()

    # The text helpers: bytes as token ids, enough for Tokenize/Detokenize round trips.
    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}\n" for m in messages))

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return bytes(t % 256 for t in token_ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------------ requests

    def generate(self, request: GenerationRequest) -> RequestStream:
        if len(self._open) >= self.max_queue:
            raise EngineOverloaded(len(self._open), self.max_queue)
        request.params.validate(VOCAB_SIZE)
        sink = AsyncSink(asyncio.get_running_loop(), asyncio.Queue())
        entry = _Open(
            next(self._keys),
            request.request_id,
            sink,
            len(request.prompt_token_ids),
            request.params.max_tokens or 16,
            time.perf_counter(),
        )
        with self._cond:
            self._open[entry.key] = entry
            self._by_id[entry.request_id] = entry.key
            self._prompt_tokens += entry.prompt_tokens
            self._cond.notify_all()
        key = entry.key
        return RequestStream(request.request_id, sink.queue, lambda: self._cancel(key))

    def _cancel(self, key: int) -> None:
        # Reentrant-safe (RequestStream.__del__ may call it): no lock, a SimpleQueue put.
        self._cancel_queue.put(key)

    def cancel(self, request_id: str) -> bool:
        with self._cond:
            key = self._by_id.get(request_id)
            if key is None:
                return False
            self._cancel_queue.put(key)
            self._cond.notify_all()
            return True

    def stats(self) -> EngineStats:
        with self._cond:
            running = len(self._open)
            return EngineStats(
                running=running,
                waiting=0,
                max_num_seqs=self.max_queue,
                kv_blocks_used=0,
                kv_blocks_total=0,
                block_size=1,
                prompt_tokens_total=self._prompt_tokens,
                generated_tokens_total=self._generated_tokens,
                prefix_query_tokens_total=0,
                prefix_hit_tokens_total=0,
                preemptions_total=0,
                steps_total=0,
                step_tokens_total=0,
            )

    def shutdown(self, timeout: float | None = 10.0) -> bool:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------------ producer thread

    def _loop(self) -> None:
        interval = 1.0 / self.step_rate if self.step_rate else 0.0
        next_step_at = time.perf_counter()
        while True:
            with self._cond:
                while not self._stopping and not self._open and self._cancel_queue.empty():
                    self._cond.wait()
                    next_step_at = time.perf_counter()  # idle time does not bank steps
                if self._stopping:
                    break
            if interval:
                delay = next_step_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                next_step_at += interval
            self._step()
        self._end_all("cancelled")

    def _step(self) -> None:
        outbox: list[tuple[Sink, TokenEvent]] = []
        now = time.perf_counter()
        with self._cond:
            self._take_cancellations(outbox, now)
            finished = []
            for entry in self._open.values():
                count = min(self.tokens_per_event, entry.max_tokens - entry.produced)
                start = entry.produced
                ids = [(start + i) % 255 + 1 for i in range(count)]
                entry.produced += count
                entry.first_token_at = entry.first_token_at or now
                if entry.produced < entry.max_tokens:
                    outbox.append((entry.sink, TokenEvent(entry.request_id, "x" * count, ids)))
                else:
                    outbox.append((entry.sink, self._final(entry, ids, "length", now)))
                    finished.append(entry)
                self._generated_tokens += count
            for entry in finished:
                self._forget(entry)
        self._deliver(outbox)

    def _take_cancellations(self, outbox: list[tuple[Sink, TokenEvent]], now: float) -> None:
        # Caller holds _cond.
        while True:
            try:
                key = self._cancel_queue.get_nowait()
            except queue.Empty:
                return
            entry = self._open.get(key)
            if entry is not None:
                outbox.append((entry.sink, self._final(entry, [], "cancelled", now)))
                self._forget(entry)

    def _forget(self, entry: _Open) -> None:
        del self._open[entry.key]
        if self._by_id.get(entry.request_id) == entry.key:
            del self._by_id[entry.request_id]

    def _deliver(self, outbox: list[tuple[Sink, TokenEvent]]) -> None:
        undelivered = publish(outbox)
        for event in undelivered:  # the reader's event loop is gone: stop generating for it
            if event.finish_reason is None:
                self.cancel(event.request_id)

    def _end_all(self, reason: str) -> None:
        outbox: list[tuple[Sink, TokenEvent]] = []
        now = time.perf_counter()
        with self._cond:
            for entry in list(self._open.values()):
                outbox.append((entry.sink, self._final(entry, [], reason, now)))
                self._forget(entry)
        publish(outbox)

    @staticmethod
    def _final(entry: _Open, ids: list[int], reason: str, now: float) -> TokenEvent:
        started = entry.submitted_at
        first = entry.first_token_at
        return TokenEvent(
            entry.request_id,
            "x" * len(ids),
            ids,
            finish_reason=reason,  # type: ignore[arg-type]
            usage=Usage(entry.prompt_tokens, entry.produced),
            timings=Timings(0.0, None if first is None else first - started, now - started),
        )


def standin_engine_types() -> Any:
    from gateway.server import EngineTypes

    return EngineTypes(SamplingParams, GenerationRequest)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--tokens-per-event", type=int, default=1)
    parser.add_argument(
        "--step-rate", type=float, default=0.0, help="producer steps per second, 0 = unpaced [0]"
    )
    parser.add_argument("--max-tokens-per-chunk", type=int, default=None)
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
    if args.max_tokens_per_chunk is not None:
        config.max_tokens_per_chunk = args.max_tokens_per_chunk
    return run(
        config,
        lambda: InstantEngine(args.tokens_per_event, args.step_rate),
        standin_engine_types,
    )


if __name__ == "__main__":
    sys.exit(main())
