"""Server-sent events, and stopping work the moment the client goes away.

A generation can wait in the engine's queue or prefill for seconds before its first token, and
a client may hang up at any time; its engine slot must be freed at once, not when the shim next
writes. `DisconnectGuard` watches for `http.disconnect` (one task per request) and cancels the
request's own task when it comes: whatever that task is awaiting (the first chunks, the next
chunk, a write) raises CancelledError, and the clean-up of the upstream streams cancels the gRPC
calls. Starlette runs an endpoint and the response it returns in the same task, so one guard
covers both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, MutableMapping
from typing import Any

from starlette.responses import StreamingResponse

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client disconnects (the request body has already been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class DisconnectGuard:
    """Cancels the task that created it if the client disconnects before `close()`."""

    def __init__(self, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None, "DisconnectGuard needs a running task"
        self._task = task
        self.disconnected = False
        self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        await wait_for_disconnect(receive)
        self.disconnected = True
        self._task.cancel()

    def close(self) -> None:
        """Stop watching. Call it before the response's last write: once the response is
        complete the server reports the connection as done, which is no disconnect."""
        self._watcher.cancel()

    def caused(self, error: BaseException) -> bool:
        """Whether `error` is this guard's cancellation; if so it is consumed."""
        if not (isinstance(error, asyncio.CancelledError) and self.disconnected):
            return False
        uncancel = getattr(self._task, "uncancel", None)  # Python 3.11+
        if uncancel is not None:
            uncancel()
        return True


class EventStreamResponse(StreamingResponse):
    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        guard: DisconnectGuard,
        on_disconnect: Callable[[], None],
    ) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._events = events
        self._guard = guard
        self._on_disconnect = on_disconnect

    async def stream_response(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for chunk in self._events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        self._guard.close()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Any, receive: Receive, send: Any) -> None:
        try:
            await self.stream_response(send)
        except asyncio.CancelledError as exc:
            if not self._guard.caused(exc):
                raise
            self._on_disconnect()
        except OSError:  # a write to a connection that is gone
            self._on_disconnect()
        finally:
            self._guard.close()
            await self._events.aclose()
