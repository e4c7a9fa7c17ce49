"""`gptq-gateway up` end to end: from an empty cache to a streamed chat answer through the OpenAI
SDK, then Ctrl-C; a second run reuses the cached checkpoint and stops on SIGTERM.

The first quantization uses `--method rtn` (flags the brief allows for this test): GPTQ itself
is tested with the quantizer; what is under test here is the road from the demo GGUF to an
answer. Everything else is the real thing: the demo GGUF, `gptq-gateway quantize`, `serve` and
`openai` as child processes on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from fixtures_grpc import free_port

from gateway.client import GatewayClient
from gateway.up.model_cache import DEMO_NAME

pytestmark = pytest.mark.slow

READY_TIMEOUT_S = 1500.0  # a cold GGUF conversion, quantization and model load on a busy CPU
BANNER_END = "Ctrl-C stops it."


class UpProcess:
    """`gptq-gateway up` in a subprocess, its output collected line by line."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name in ("GPTQGW_API_KEYS", "GPTQGW_UPSTREAM_API_KEY", "GPTQGW_CACHE_DIR"):
            env.pop(name, None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "up", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_banner(self, timeout: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if any(line.strip() == BANNER_END for line in self.lines):
                return time.monotonic() - started
            if self.process.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"up exited with {self.process.returncode}\n{self.output}")
            time.sleep(0.2)
        self.stop(signal.SIGKILL)
        raise AssertionError(f"no banner after {timeout:g} s\n{self.output[-4000:]}")

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout=180)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        self._reader.join(5)
        return code


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _streamed_answer(port: int) -> str:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    with client:
        stream = client.chat.completions.create(
            model=DEMO_NAME,
            messages=[{"role": "user", "content": "Write a haiku about the sea."}],
            max_tokens=12,
            stream=True,
        )
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def test_up_from_a_clean_cache_answers_then_reuses_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    port, grpc_port = free_port(), free_port()
    args = [
        "--port", str(port), "--grpc-port", str(grpc_port), "--metrics-port", "0",
        "--device", "cpu", "--cache-dir", str(cache), "--method", "rtn",
        "--max-model-len", "256", "--max-num-seqs", "2",
    ]  # fmt: skip

    first = UpProcess(args)
    ready_s = first.wait_for_banner(READY_TIMEOUT_S)
    assert "quantizing" in first.output  # the cache was empty
    assert f"http://127.0.0.1:{port}/v1" in first.output
    assert "curl -N" in first.output and "from openai import OpenAI" in first.output
    assert "gptqgw.v1.Gateway/Generate" in first.output
    assert _streamed_answer(port).strip()
    [checkpoint] = (cache / "models").glob(f"{DEMO_NAME}-*/config.json")
    assert json.loads(checkpoint.read_text())["quantization_config"]["quant_method"] == "gptq"
    assert first.stop(signal.SIGINT) == 0, first.output[-4000:]
    assert "stopped (SIGINT)" in first.output
    assert _port_closed(port) and _port_closed(grpc_port)  # both children are gone

    # Flags that only the servers read do not change the cache key, and `up` passes them on.
    second = UpProcess([*args, "--max-request-bytes", "2000", "--allow-special-tokens"])
    second.wait_for_banner(READY_TIMEOUT_S)
    assert "quantizing" not in second.output  # the cached checkpoint is reused
    assert _streamed_answer(port).strip()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model=DEMO_NAME, prompt="x" * 3000, max_tokens=1)
    assert refused.value.status_code == 413, refused.value
    with GatewayClient(f"127.0.0.1:{grpc_port}", timeout=30) as grpc_client:
        assert len(grpc_client.tokenize("<|im_end|>")) == 1  # the control token itself
    assert second.stop(signal.SIGTERM) == 0, second.output[-4000:]
    assert _port_closed(port) and _port_closed(grpc_port)
    print(f"first up: ready in {ready_s:.0f} s from an empty cache")


def test_up_refuses_bad_input_quickly(tmp_path: Path) -> None:
    for args, message in (
        ([str(tmp_path / "missing")], "no such file or directory"),
        (["--port", "8000", "--grpc-port", "8000"], "must differ"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "up", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr
