"""Helpers for the gRPC tests: a real `gptq-gateway serve` process on free loopback ports.

`start_gateway` launches the CLI in a subprocess (the same entry point as the console script),
records every health state it answers while the model loads, and returns once it is SERVING.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.client import AsyncGatewayClient, GatewayClient, GatewayError

API_KEY = "test-key-0123456789"
# Reconnect quickly while the server starts (grpc's default backoff starts at a second).
FAST_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
)
# A reader that takes no more than it has asked for: HTTP/2 lets a server run ahead of a slow
# reader by the receive window (64 KiB and growing by default), so events pile up in the server,
# where coalescing happens, only once that window is spent. A 1-byte window with no
# bandwidth-delay probing spends it at the first message.
SLOW_READER = (
    ("grpc.http2.lookahead_bytes", 1),
    ("grpc.http2.bdp_probe", 0),
)
STARTUP_TIMEOUT_S = 900.0  # model load + warm-up on a busy 2-core machine


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServedProcess:
    """A server started as a subprocess with its output in `log_path`."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclass
class ServedGateway(ServedProcess):
    process: subprocess.Popen[bytes]
    grpc_target: str
    metrics_url: str
    log_path: Path
    api_key: str = API_KEY
    health_states: list[str] = field(default_factory=list)  # as answered during start-up

    def client(self, api_key: str | None = API_KEY, timeout: float | None = 300.0) -> GatewayClient:
        return GatewayClient(self.grpc_target, api_key=api_key, timeout=timeout)

    def async_client(
        self,
        api_key: str | None = API_KEY,
        timeout: float | None = 300.0,
        options: Sequence[tuple[str, int]] = (),
    ) -> AsyncGatewayClient:
        return AsyncGatewayClient(
            self.grpc_target, api_key=api_key, timeout=timeout, options=options
        )

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, keyed by (name, sorted labels)."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as reply:
            text = reply.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.1)
        gauges = {
            name: value
            for (name, labels), value in self.metrics().items()
            if name.startswith(("gptqgw_requests_", "gptqgw_kv_cache_", "gptqgw_streams_"))
        }
        raise AssertionError(
            f"timed out after {timeout:g} s waiting for {what}; metrics {gauges}\n{self.log_tail()}"
        )


def start_gateway(
    checkpoint: Path, work_dir: Path, extra_args: Sequence[str] = (), api_key: str = API_KEY
) -> ServedGateway:
    grpc_port, metrics_port = free_port(), free_port()
    keys_file = work_dir / "api-keys.txt"
    keys_file.write_text(f"# test keys\n{api_key}\nsecond-key\n")
    log_path = work_dir / "server.log"
    command = [
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        str(checkpoint),
        "--device",
        "cpu",
        "--grpc-port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
        "--api-keys-file",
        str(keys_file),
        "--log-format",
        "json",
        *extra_args,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("GPTQGW_API_KEYS", None)
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    served = ServedGateway(
        process,
        f"127.0.0.1:{grpc_port}",
        f"http://127.0.0.1:{metrics_port}/metrics",
        log_path,
        api_key,
    )
    _wait_until_serving(served)
    return served


def _wait_until_serving(served: ServedGateway) -> None:
    probe = GatewayClient(served.grpc_target, timeout=2.0, options=FAST_RECONNECT)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if served.process.poll() is not None:
                raise AssertionError(
                    f"gptq-gateway serve exited with {served.process.returncode}\n"
                    f"{served.log_tail()}"
                )
            try:
                state = probe.health()
            except GatewayError:
                state = None  # not listening yet
            if state is not None and (
                not served.health_states or served.health_states[-1] != state
            ):
                served.health_states.append(state)
            if state == "SERVING":
                return
            time.sleep(0.05)
    finally:
        probe.close()
    served.stop()
    raise AssertionError(f"not SERVING after {STARTUP_TIMEOUT_S:g} s\n{served.log_tail()}")
