"""The server's lifecycle: bind, load the engine, serve, drain on SIGTERM, exit 0.

Order matters for a load balancer: the port opens first with health NOT_SERVING, the engine loads
and warms up in a thread, health turns SERVING; on SIGTERM or SIGINT health turns NOT_SERVING
for good, new calls get UNAVAILABLE, open calls may finish within the drain timeout, then the
engine shuts down (each stream still open gets a last chunk, FINISH_REASON_CANCELLED with an
error message), the server stops, and the process exits within the timeout plus a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from gateway.proto import DESCRIPTOR_SET_PATH, SERVICE_NAME, pb2_grpc
from gateway.server.auth import ApiKeyInterceptor
from gateway.server.convert import EngineTypes, load_engine_types
from gateway.server.errors import MalformedRequestInterceptor
from gateway.server.gc_policy import freeze_startup_heap
from gateway.server.metrics import GatewayMetrics, method_label
from gateway.server.servicer import (
    DEFAULT_MAX_TOKENS_PER_CHUNK,
    GatewayServicer,
    ServingState,
)
from quantize.errors import UserInputError

log = logging.getLogger("gateway.server")
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# After the drain timeout: the most the stop may take (the process exits within the timeout plus
# this), split between cutting the engine's streams, flushing their final chunks, and the stop.
EXIT_SLACK_S = 0.8
CUT_JOIN_S = 0.4
FLUSH_S = 0.2


@dataclass
class ServerConfig:
    model_name: str
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    metrics_port: int = 9400  # 0 = no metrics endpoint
    api_keys: list[str] = field(default_factory=list)
    drain_timeout: float = 30.0
    max_message_bytes: int = 4 * 1024 * 1024
    # Seconds a call still open at the end of the drain gets before it is cancelled.
    stop_grace: float = 1.0
    # Most tokens one GenerateChunk carries when a stream's events piled up (1 = one per event).
    max_tokens_per_chunk: int = DEFAULT_MAX_TOKENS_PER_CHUNK


class GatewayServer:
    """One gRPC server around one engine. `load_engine` runs in a thread and returns a started
    engine; `engine_types` gives the engine's request classes (see convert.EngineTypes)."""

    def __init__(
        self,
        config: ServerConfig,
        load_engine: Callable[[], Any],
        engine_types: Callable[[], EngineTypes] = load_engine_types,
    ) -> None:
        self.config = config
        self._load_engine = load_engine
        self._engine_types = engine_types
        self.state = ServingState(model_name=config.model_name)
        self.metrics = GatewayMetrics()
        self.metrics.watch_engine(self._engine_stats)
        self.health = HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stop_metrics: Callable[[], None] | None = None

    def _engine_stats(self) -> Any | None:
        engine = self.state.engine
        return None if engine is None else engine.stats()

    async def start(self) -> None:
        """Bind and serve with health NOT_SERVING (the engine is not loaded yet)."""
        config = self.config
        requests = self.metrics.requests
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if config.api_keys:
            interceptors.append(
                ApiKeyInterceptor(
                    config.api_keys,
                    on_reject=lambda method: requests.labels(
                        method_label(method), "unauthenticated"
                    ).inc(),
                )
            )
        # After the key check, so that refused calls also read garbage without an error.
        interceptors.append(
            MalformedRequestInterceptor(
                on_reject=lambda method: requests.labels(
                    method_label(method), "invalid_argument"
                ).inc()
            )
        )
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_receive_message_length", config.max_message_bytes),
                # Two servers on one port would split the traffic silently: refuse instead.
                ("grpc.so_reuseport", 0),
            ],
        )
        servicer = GatewayServicer(self.state, self.metrics, config.max_tokens_per_chunk)
        pb2_grpc.add_GatewayServicer_to_server(servicer, server)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, _NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME),
            server,
            pool=reflection_pool(),
        )
        address = f"{config.host}:{config.grpc_port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise UserInputError(f"--grpc-port: cannot listen on {address} ({exc})") from exc
        if config.metrics_port:
            try:
                self._stop_metrics = self.metrics.serve_http(config.host, config.metrics_port)
            except OSError as exc:
                raise UserInputError(
                    f"--metrics-port: cannot listen on {config.host}:{config.metrics_port} "
                    f"({exc.strerror})"
                ) from exc
        await server.start()
        self._server = server
        log.info(
            "listening",
            extra={"grpc": f"{config.host}:{self.port}", "metrics_port": config.metrics_port},
        )

    async def load(self) -> None:
        """Load and warm up the engine off the event loop, then report SERVING."""
        log.info("loading the engine")
        engine = await _in_daemon_thread(self._load_engine)
        self.state.engine_types = self._engine_types()
        self.state.engine = engine
        frozen = freeze_startup_heap()  # no full collection walks the model's objects again
        log.info("startup heap frozen", extra={"objects": frozen})
        for name in ("", SERVICE_NAME):
            await self.health.set(name, _SERVING)
        log.info("serving", extra={"model": self.config.model_name})

    async def drain_and_stop(self) -> None:
        """Refuse new calls, give open ones `drain_timeout` seconds, then cut what is left with a
        final chunk (FINISH_REASON_CANCELLED and an error message) and stop: within
        `drain_timeout` + EXIT_SLACK_S of the call."""
        state = self.state
        state.draining = True
        deadline = time.monotonic() + self.config.drain_timeout + EXIT_SLACK_S
        await self.health.enter_graceful_shutdown()
        log.info(
            "draining",
            extra={"open_calls": state.open_calls, "drain_timeout_s": self.config.drain_timeout},
        )
        if not await _wait_idle(state, self.config.drain_timeout):
            log.warning(
                "drain timeout passed; ending open streams with a final chunk",
                extra={"open_calls": state.open_calls},
            )
        engine = state.engine
        if engine is not None:
            # Shutting the engine down ends every unfinished stream with a "cancelled" event
            # carrying "engine is shutting down": the handlers send it as their last chunk. The
            # join is bounded; a step still running ends its streams when it returns.
            await asyncio.to_thread(engine.shutdown, _left(deadline, CUT_JOIN_S))
            await _wait_idle(state, _left(deadline, FLUSH_S))
        if self._server is not None:
            # Only calls that are still open (a step that did not return in time) are cancelled.
            await self._server.stop(grace=_left(deadline, self.config.stop_grace))
        if self._stop_metrics is not None:
            self._stop_metrics()
        log.info("stopped")

    async def serve_until_signal(self) -> int:
        """Run until SIGTERM/SIGINT; 0 after a clean drain, 1 if the engine failed to load."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await self.start()
        loader = asyncio.ensure_future(self.load())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait((loader, stopper), return_when=asyncio.FIRST_COMPLETED)
        if loader.done() and loader.exception() is not None:
            log.error("the engine failed to load: %s", loader.exception())
            stopper.cancel()
            await self.drain_and_stop()
            raise loader.exception()  # type: ignore[misc]
        await stopper
        log.info("signal received")
        if not loader.done():
            loader.cancel()  # the loading thread is a daemon: it dies with the process
        await self.drain_and_stop()
        return 0


def run(
    config: ServerConfig,
    load_engine: Callable[[], Any],
    engine_types: Callable[[], EngineTypes] = load_engine_types,
) -> int:
    """Serve on uvloop (when installed) until SIGTERM, then end the process (see _exit_now)."""
    server = GatewayServer(config, load_engine, engine_types)
    try:
        import uvloop
    except ImportError:  # Windows
        return _exit_now(asyncio.run(server.serve_until_signal()))
    return _exit_now(uvloop.run(server.serve_until_signal()))


def _exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown, once everything has stopped cleanly.

    Every call has ended and the engine has shut down; what is left is tearing down torch,
    OpenMP and grpc's threads, which took 0.8 s or more on a CPU (measured) and would push the
    exit past the drain timeout plus a second.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """Descriptors for reflection, from the FileDescriptorSet compiled at build time (plus the
    health and reflection services' own files)."""
    pool = descriptor_pool.DescriptorPool()
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET_PATH.read_bytes())
    added = set()
    for file_proto in descriptor_set.file:
        pool.Add(file_proto)
        added.add(file_proto.name)
    for module in (health_pb2, reflection_pb2):
        file_proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(file_proto)
        if file_proto.name not in added:
            pool.Add(file_proto)
    return pool


async def _wait_idle(state: ServingState, timeout: float) -> bool:
    """Whether every open call ended within `timeout` seconds."""
    try:
        await asyncio.wait_for(state.idle.wait(), timeout=timeout)
    except asyncio.TimeoutError:
        return False
    return True


def _left(deadline: float, most: float) -> float:
    """At most `most` seconds, and no later than `deadline`."""
    return max(0.0, min(most, deadline - time.monotonic()))


async def _in_daemon_thread(function: Callable[[], Any]) -> Any:
    """Like asyncio.to_thread, but in a daemon thread that stays parked after `function` returns.

    Daemon: a SIGTERM during a long model load must not wait for the load before the process can
    exit. Parked, never exiting: when the thread that loaded and warmed up the model (its first
    torch/OpenMP work) exits, every later engine step on the CPU ran 4 to 8 times slower
    (measured: 16 tokens in 7.5-9.2 s instead of 1.1-2.3 s, same process, same load).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def target() -> None:
        try:
            result = function()
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)
        threading.Event().wait()  # park until the process ends (see above)

    threading.Thread(target=target, name="engine-loader", daemon=True).start()
    return await future


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.cancelled():
        # Loaded after a SIGTERM gave up on it: stop its loop thread so the process can exit.
        shutdown = getattr(result, "shutdown", None)
        if shutdown is not None:
            threading.Thread(target=shutdown, args=(5.0,), daemon=True).start()
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
