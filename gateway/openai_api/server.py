"""Serve the shim with uvicorn on uvloop (httptools' parser when installed) until SIGTERM/SIGINT."""

from __future__ import annotations

import importlib.util
import logging
import signal

import uvicorn

from gateway.openai_api.app import ShimConfig, create_app
from gateway.server.gc_policy import freeze_startup_heap
from quantize.errors import UserInputError

log = logging.getLogger("gateway.openai")
# Seconds open streams get to finish after SIGTERM before they are cut.
GRACEFUL_SHUTDOWN_S = 30


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def serve(config: ShimConfig, host: str, port: int, log_level: str = "info") -> int:
    app = create_app(config)
    server_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop" if _installed("uvloop") else "asyncio",
        http="httptools" if _installed("httptools") else "h11",
        lifespan="on",
        log_config=None,  # keep gateway.server.logs' format (text or JSON lines)
        log_level=log_level,
        access_log=False,  # every request is counted in /metrics; errors are logged
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        server_header=False,
    )
    server = uvicorn.Server(server_config)
    log.info(
        "OpenAI-compatible API on http://%s:%d/v1, upstream gRPC %s",
        host,
        port,
        config.upstream,
        extra={"auth": bool(config.api_keys)},
    )
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again under the
    # handler it found installed. With Python's defaults that kills the process (exit -15) or
    # raises KeyboardInterrupt; a stop that was asked for is a clean exit (0), so install
    # handlers that do nothing.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _ignore)
    freeze_startup_heap()  # request churn's full collections then skip the imported modules
    try:
        server.run()
    except (OSError, SystemExit) as exc:
        # uvicorn logs why it could not bind (the port is taken, ...) and exits.
        if server.started:
            raise
        raise UserInputError(f"--port: cannot listen on {host}:{port} (see the log above)") from exc
    if not server.started:
        raise UserInputError(f"--port: cannot listen on {host}:{port} (see the log above)")
    return 0


def _ignore(signum: int, frame: object) -> None:
    pass
