"""The upstream Generate calls of one HTTP request: one per choice (n) and prompt, run together.

`ChoiceStreams.open()` starts every call and waits for each one's first chunk, so that a request
the server refuses (bad parameter, context length, queue full, draining) becomes an HTTP error
status before any byte of a 200 goes out. After that, `chunks()` yields what follows from all
calls as it arrives, and `cancel()` (called on every exit path, a client disconnect included)
cancels whatever is still running, which frees the engine's slots at its next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from gateway.client import AsyncChunkStream, AsyncGatewayClient, Chunk, GatewayError

_INT64 = 2**64
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class UpstreamCall:
    """One Generate call: which choice it fills, which prompt it continues, and how."""

    choice: int
    prompt_index: int
    prompt: str | None = None
    messages: Sequence[dict[str, Any]] | None = None
    tools: Sequence[dict[str, Any]] | None = None  # rendered with the messages
    token_ids: Sequence[int] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)


def seed_for_choice(seed: int | None, choice: int) -> int | None:
    """seed + choice, wrapped into int64, so that n choices differ yet each is reproducible."""
    if seed is None:
        return None
    value = (seed + choice) % _INT64
    return value - _INT64 if value > _INT64_MAX else value


class ChoiceStreams:
    def __init__(
        self, client: AsyncGatewayClient, model: str, request_id: str, calls: Sequence[UpstreamCall]
    ) -> None:
        self._client = client
        self._model = model
        self.request_id = request_id
        self.calls = list(calls)
        self._streams: list[AsyncChunkStream] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self) -> list[Chunk]:
        """Start every call; the first chunk of each, in call order. Raises the first call's
        GatewayError (every call cancelled) if any is refused."""
        for call in self.calls:
            self._streams.append(
                self._client.generate(
                    call.prompt,
                    call.messages,
                    call.token_ids,
                    model=self._model,
                    tools=call.tools,
                    request_id=f"{self.request_id}-{call.choice}"
                    if len(self.calls) > 1
                    else self.request_id,
                    **call.sampling,
                )
            )
        try:
            if len(self._streams) == 1:
                return [await _first_chunk(self._streams[0])]
            return list(await asyncio.gather(*(_first_chunk(s) for s in self._streams)))
        except BaseException:
            self.cancel()
            raise

    async def chunks(self, first: Sequence[Chunk]) -> AsyncIterator[tuple[int, Chunk]]:
        """(call index, chunk) for everything after the first chunks, as it arrives."""
        live = [i for i, chunk in enumerate(first) if chunk.finish_reason is None]
        if len(live) == 1:  # the common case (n = 1): no task, no queue
            async for chunk in self._streams[live[0]]:
                yield live[0], chunk
            return
        queue: asyncio.Queue[tuple[int, Chunk | BaseException | None]] = asyncio.Queue()
        self._tasks = [asyncio.ensure_future(self._pump(i, queue)) for i in live]
        remaining = len(live)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item

    async def _pump(
        self, index: int, queue: asyncio.Queue[tuple[int, Chunk | BaseException | None]]
    ) -> None:
        try:
            async for chunk in self._streams[index]:
                queue.put_nowait((index, chunk))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            queue.put_nowait((index, exc))
            return
        queue.put_nowait((index, None))

    async def collect(self) -> list[list[Chunk]]:
        """Every chunk of every call (for a response that is not streamed)."""
        first = await self.open()
        try:
            rest = await asyncio.gather(
                *(
                    _rest(stream) if chunk.finish_reason is None else _nothing()
                    for stream, chunk in zip(self._streams, first, strict=True)
                )
            )
        except BaseException:
            self.cancel()
            raise
        return [[chunk, *more] for chunk, more in zip(first, rest, strict=True)]

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        for stream in self._streams:
            stream.cancel()


async def _first_chunk(stream: AsyncChunkStream) -> Chunk:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        raise GatewayError(
            grpc.StatusCode.INTERNAL, "the server ended the stream without a chunk"
        ) from None


async def _rest(stream: AsyncChunkStream) -> list[Chunk]:
    return [chunk async for chunk in stream]


async def _nothing() -> list[Chunk]:
    return []
