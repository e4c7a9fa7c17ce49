"""Helpers for the REST shim's tests: a real `gptq-gateway openai` process on a free loopback port,
in front of a real `gptq-gateway serve` process (tests/fixtures_grpc.py starts that one)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fixtures_grpc import API_KEY, ServedGateway, ServedProcess, free_port

SHIM_KEY = "shim-key-0123456789"
STARTUP_TIMEOUT_S = 120.0


@dataclass
class ServedShim(ServedProcess):
    process: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path
    api_key: str | None = SHIM_KEY

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def openai_client(self, api_key: str | None = None, **options: object):
        from openai import OpenAI

        key = api_key if api_key is not None else (self.api_key or "unused")
        # No retries: a 429 or 503 must reach the test, not be retried away.
        return OpenAI(
            base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=300, **options
        )

    def async_openai_client(self, api_key: str | None = None):
        from openai import AsyncOpenAI

        key = api_key if api_key is not None else (self.api_key or "unused")
        return AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=300)

    def request(
        self,
        method: str,
        path: str,
        body: object | bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 300,
    ) -> tuple[int, dict[str, str], bytes]:
        """A raw HTTP request; (status, lower-cased headers, body)."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            sent_headers = {"content-type": "application/json"}
            if self.api_key:
                sent_headers["authorization"] = f"Bearer {self.api_key}"
            sent_headers.update(headers or {})
            payload = body if isinstance(body, bytes) or body is None else json.dumps(body)
            connection.request(method, path, body=payload, headers=sent_headers)
            reply = connection.getresponse()
            return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
        finally:
            connection.close()

    def metrics_text(self) -> str:
        return self.request("GET", "/metrics")[2].decode()


def start_shim(
    upstream: str,
    work_dir: Path,
    *,
    api_keys: Sequence[str] = (SHIM_KEY,),
    upstream_key: str | None = None,
    wait_ready: bool = True,
) -> ServedShim:
    """`gptq-gateway openai` on a free port; returns once /health answers (and /ready, unless
    `wait_ready` is False: for an upstream that is down on purpose)."""
    port = free_port()
    command = [
        sys.executable, "-m", "gateway.cli", "openai", "--upstream", upstream,
        "--port", str(port), "--log-format", "json",
    ]  # fmt: skip
    if api_keys:
        keys_file = work_dir / "shim-keys.txt"
        keys_file.write_text("\n".join(api_keys) + "\n")
        command += ["--api-keys-file", str(keys_file)]
    if upstream_key:
        key_file = work_dir / "upstream-key.txt"
        key_file.write_text(upstream_key + "\n")
        command += ["--upstream-api-key-file", str(key_file)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("GPTQGW_API_KEYS", "GPTQGW_UPSTREAM_API_KEY"):
        env.pop(name, None)
    log_path = work_dir / "shim.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    shim = ServedShim(process, "127.0.0.1", port, log_path, api_keys[0] if api_keys else None)
    wait_for_http(shim, "/ready" if wait_ready else "/health")
    return shim


def shim_in_front(gateway: ServedGateway, work_dir: Path) -> Iterator[ServedShim]:
    """A module fixture's body: a shim in front of `gateway` (with its key), stopped cleanly."""
    served = start_shim(gateway.grpc_target, work_dir, upstream_key=API_KEY)
    yield served
    assert served.stop() == 0, served.log_tail()


def wait_for_http(shim: ServedShim, path: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if shim.process.poll() is not None:
            raise AssertionError(
                f"gptq-gateway openai exited with {shim.process.returncode}\n{shim.log_tail()}"
            )
        try:
            with urllib.request.urlopen(f"{shim.base_url}{path}", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    shim.stop()
    raise AssertionError(f"{path} not 200 after {timeout:g} s\n{shim.log_tail()}")


def sse_events(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing: every event is exactly one
    `data: ...` line followed by a blank line, and nothing else is sent."""
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), f"the stream does not end with a blank line: {text[-80:]!r}"
    events = text[:-2].split("\n\n")
    payloads = []
    for event in events:
        assert "\n" not in event, f"an event spans several lines: {event[:200]!r}"
        assert event.startswith("data: "), f"not a data line: {event[:200]!r}"
        payloads.append(event[len("data: ") :])
    return payloads
