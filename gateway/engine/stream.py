"""How token events travel from the engine loop thread to the asyncio side.

The loop thread never touches an asyncio object directly: it batches one step's events per event
loop and hands them over with `loop.call_soon_threadsafe`, which puts them on per-request
`asyncio.Queue`s. `RequestStream` is what `Engine.generate` returns; dropping it, breaking out of
its `async for`, or cancelling the task that awaits it cancels the request in the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.engine.types import TokenEvent


@dataclass(eq=False)
class AsyncSink:
    """Events for a consumer on an asyncio event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent] = field(default_factory=asyncio.Queue)


@dataclass(eq=False)
class ListSink:
    """Events collected in a list (synchronous use: warm-up, `Engine.run_batch`)."""

    events: list[TokenEvent] = field(default_factory=list)


Sink = AsyncSink | ListSink


def _put_all(items: list[tuple[asyncio.Queue[TokenEvent], TokenEvent]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


def publish(outbox: list[tuple[Sink, TokenEvent]]) -> list[TokenEvent]:
    """Deliver one step's events; return those whose event loop is gone (closed)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[TokenEvent], TokenEvent]]]
    by_loop = {}
    for sink, event in outbox:
        if isinstance(sink, ListSink):
            sink.events.append(event)
        else:
            by_loop.setdefault(sink.loop, []).append((sink.queue, event))
    undelivered: list[TokenEvent] = []
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the event loop was closed: nobody will read these
            undelivered.extend(event for _, event in items)
    return undelivered


class RequestStream:
    """Async iterator over one request's `TokenEvent`s; the last has `finish_reason` set."""

    def __init__(
        self, request_id: str, queue: asyncio.Queue[TokenEvent], abandon: Callable[[], None]
    ) -> None:
        self.request_id = request_id
        self._queue = queue
        self._abandon_callback: Callable[[], None] | None = abandon
        self._finished = False
        self._held: TokenEvent | None = None  # taken from the queue by take_ready, not yet given

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._finished:
            raise StopAsyncIteration
        event = self._held
        if event is not None:
            self._held = None
            return self._accept(event)
        try:
            event = await self._queue.get()
        except BaseException:  # task cancelled (client went away): cancel in the engine too
            self._abandon()
            raise
        return self._accept(event)

    def take_ready(self, max_tokens: int) -> list[TokenEvent]:
        """The events already delivered and not yet read, without waiting.

        Takes them in order while their tokens add up to at most `max_tokens` (an event carrying
        no token always fits), and stops after the final event. An event that does not fit stays
        first in line for the next read. Returns [] when nothing is ready. Lets a consumer that
        fell behind the engine send what piled up as one message instead of one per event.
        """
        ready: list[TokenEvent] = []
        queue = self._queue
        budget = max_tokens
        while not self._finished:
            event = self._held
            if event is None:
                if queue.empty():
                    break
                event = queue.get_nowait()
            cost = len(event.token_ids)
            if cost and cost > budget:
                self._held = event
                break
            self._held = None
            budget -= cost
            ready.append(self._accept(event))
        return ready

    def _accept(self, event: TokenEvent) -> TokenEvent:
        if event.finish_reason is not None:
            self._finished = True
            self._abandon_callback = None
        return event

    async def aclose(self) -> None:
        """Stop reading; the engine cancels the request at its next step if still running."""
        self._abandon()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._abandon()

    def _abandon(self) -> None:
        self._finished = True
        callback, self._abandon_callback = self._abandon_callback, None
        if callback is not None:
            callback()

    def __del__(self) -> None:
        # Safe from a finalizer: the callback only puts on a queue.SimpleQueue (reentrant).
        self._abandon()
