"""Issue 15, items 10, 14, 16 and 17: drain with a final chunk, bounded examples, a second `up`
that fails first, and a descriptor set that holds the health service.

The drain tests run real `serve`, `openai` and `up` processes on loopback with the real 4-bit
SmolLM2, real signals and a 2 s drain timeout; streams use min_tokens so that they are still
running when the drain timeout passes.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_grpc import API_KEY, ServedGateway, free_port, start_gateway
from fixtures_openai import ServedShim, sse_events, start_shim, wait_for_http

from gateway.client import Chunk, GatewayError

REPO = Path(__file__).resolve().parent.parent
DRAIN_S = 2.0
EXIT_SLACK_S = 1.0  # the bound: exit within the drain timeout plus 1 s
LONG = {"max_tokens": 4000, "min_tokens": 4000}  # still streaming when the drain ends
MODEL = "smollm2-w4"


# ----------------------------------------------------------------------------- helpers


class SseReader:
    """One streamed chat completion read raw in a thread: every byte the shim sent, in order."""

    def __init__(self, host: str, port: int, body: dict[str, object], key: str | None) -> None:
        self.raw = b""
        self.started = threading.Event()
        self.error: BaseException | None = None
        headers = {"content-type": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        self._thread = threading.Thread(
            target=self._read, args=(host, port, body, headers), daemon=True
        )
        self._thread.start()

    def _read(self, host: str, port: int, body: dict[str, object], headers: dict) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=300)
        try:
            connection.request("POST", "/v1/chat/completions", json.dumps(body), headers)
            reply = connection.getresponse()
            assert reply.status == 200, reply.read()
            while chunk := reply.read1(65536):
                self.raw += chunk
                if b'"content"' in self.raw:
                    self.started.set()
        except BaseException as exc:  # reported by join()
            self.error = exc
        finally:
            self.started.set()
            connection.close()

    def join(self, timeout: float) -> list[str]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the SSE stream did not end"
        assert self.error is None, self.error
        return sse_events(self.raw)


def _chat_body(**extra: object) -> dict[str, object]:
    return {
        "model": MODEL,
        "stream": True,
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        **extra,
    }


def _assert_error_then_done(events: list[str]) -> None:
    """A stream cut by the drain: content first, then an error event, then [DONE]."""
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])
    assert error["error"]["code"] == "generation_cancelled", error
    assert "shutting down" in error["error"]["message"]
    assert any('"content"' in event for event in events[:-2])


def _grpc_stream(gateway: ServedGateway, chunks: list[Chunk], started: threading.Event) -> None:
    with gateway.client() as client:
        for chunk in client.generate(prompt="Once upon a time", **LONG):
            chunks.append(chunk)
            started.set()
    started.set()


@pytest.fixture()
def drained_gateway(smollm2_w4_checkpoint: Path, tmp_path: Path) -> Iterator[ServedGateway]:
    served = start_gateway(
        smollm2_w4_checkpoint,
        tmp_path,
        extra_args=[
            "--max-num-seqs", "4", "--max-model-len", "4096",
            "--drain-timeout", str(DRAIN_S), "--model-name", MODEL,
        ],
    )  # fmt: skip
    yield served
    served.stop()


# ----------------------------------------------------------------------------- item 10


def test_drain_ends_open_streams_with_a_final_chunk_and_exits_in_time(
    drained_gateway: ServedGateway, tmp_path: Path
) -> None:
    gateway = drained_gateway
    shim = start_shim(gateway.grpc_target, tmp_path, upstream_key=API_KEY)
    try:
        grpc_chunks: list[list[Chunk]] = [[], []]
        grpc_started = [threading.Event(), threading.Event()]
        threads = [
            threading.Thread(target=_grpc_stream, args=(gateway, chunks, started), daemon=True)
            for chunks, started in zip(grpc_chunks, grpc_started, strict=True)
        ]
        for thread in threads:
            thread.start()
        sse = SseReader(shim.host, shim.port, _chat_body(**LONG), shim.api_key)
        for event in (*grpc_started, sse.started):
            assert event.wait(300), gateway.log_tail()

        signalled = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        code = gateway.process.wait(timeout=60)
        exit_s = time.monotonic() - signalled
        assert code == 0, gateway.log_tail()
        assert exit_s <= DRAIN_S + EXIT_SLACK_S, f"exited {exit_s:.2f} s after SIGTERM"

        for thread in threads:
            thread.join(30)
            assert not thread.is_alive()
        for chunks in grpc_chunks:
            last = chunks[-1]
            assert last.finish_reason == "cancelled", last
            assert last.error and "shutting down" in last.error
            assert len(chunks) > 1  # tokens were streamed before the cut
        _assert_error_then_done(sse.join(30))
    finally:
        shim.stop()


def test_new_calls_during_the_drain_are_refused(drained_gateway: ServedGateway) -> None:
    gateway = drained_gateway
    chunks: list[Chunk] = []
    started = threading.Event()
    thread = threading.Thread(target=_grpc_stream, args=(gateway, chunks, started), daemon=True)
    thread.start()
    assert started.wait(300)
    gateway.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # the signal reaches the server's loop
    with gateway.client() as client, pytest.raises(GatewayError) as refused:
        list(client.generate(prompt="Hello", max_tokens=2))
    assert refused.value.code.name == "UNAVAILABLE"
    assert gateway.process.wait(timeout=60) == 0
    thread.join(30)
    assert chunks[-1].finish_reason == "cancelled"


# ----------------------------------------------------------------------------- `up`


class UpProcess:
    """`gptq-gateway up` in a subprocess, stdout and stderr collected line by line."""

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

    def wait_for_banner(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line.strip() == "Ctrl-C stops it." for line in self.lines):
                return
            assert self.process.poll() is None, self.output[-4000:]
            time.sleep(0.2)
        self.process.kill()
        raise AssertionError(f"no banner\n{self.output[-4000:]}")

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self._reader.join(5)


def test_up_ctrl_c_cuts_streams_with_an_error_event_and_a_second_up_fails_first(
    smollm2_w4_checkpoint: Path, tmp_path: Path
) -> None:
    port, grpc_port = free_port(), free_port()
    args = [
        "--port", str(port), "--grpc-port", str(grpc_port), "--metrics-port", "0",
        "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--model-name", MODEL,
        "--max-model-len", "4096", "--max-num-seqs", "2",
        "--drain-timeout", str(DRAIN_S), "--default-max-tokens", "3",
    ]  # fmt: skip
    up = UpProcess([str(smollm2_w4_checkpoint), *args])
    try:
        up.wait_for_banner()
        # Item 14: the printed examples are bounded.
        banner = up.output
        assert '"max_tokens": 64' in banner and "max_tokens=64" in banner

        # Item 16: a second `up` on the same ports fails at once, before any banner.
        second = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "up", str(smollm2_w4_checkpoint), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        assert f"port {grpc_port} in use" in second.stderr
        assert "is up" not in second.stdout + second.stderr

        # Item 14: `up`'s server-side default bounds a chat request that omits max_tokens.
        shim = ServedShim(up.process, "127.0.0.1", port, tmp_path / "none.log", api_key=None)  # type: ignore[arg-type]
        wait_for_http(shim, "/ready", timeout=60)
        with shim.openai_client() as client:
            reply = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Tell me a long story."}]
            )
        assert reply.usage is not None and reply.usage.completion_tokens <= 3
        assert reply.choices[0].finish_reason == "length"

        # Item 10: Ctrl-C with an open stream.
        sse = SseReader("127.0.0.1", port, _chat_body(**LONG), None)
        assert sse.started.wait(300)
        signalled = time.monotonic()
        up.process.send_signal(signal.SIGINT)
        _assert_error_then_done(sse.join(60))
        assert sse_cut_s(signalled) <= DRAIN_S + EXIT_SLACK_S + 1.0
        assert up.wait(60) == 0, up.output[-4000:]
    finally:
        if up.process.poll() is None:
            up.process.kill()
    output = up.output
    assert "Traceback" not in output and "CancelledError" not in output, output[-4000:]
    assert "open streams get up to 2 s" in output
    assert re.search(r"waiting for `serve` \(pid \d+\) to stop", output), output[-2000:]
    assert "stopped (SIGINT)" in output
    for taken in (port, grpc_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", taken)) != 0


def sse_cut_s(signalled: float) -> float:
    return time.monotonic() - signalled


def test_up_refuses_a_port_in_use_before_starting_anything() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        for flag in ("--grpc-port", "--port"):
            others = {"--grpc-port": free_port(), "--port": free_port()}
            others[flag] = taken
            command = [sys.executable, "-m", "gateway.cli", "up", "--metrics-port", "0"]
            command += ["--grpc-port", str(others["--grpc-port"]), "--port", str(others["--port"])]
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == 2, result.stderr
            assert f"port {taken} in use ({flag}" in result.stderr
            assert "quantizing" not in result.stderr and "is up" not in result.stdout


# ----------------------------------------------------------------------------- item 14


def test_every_example_sets_max_tokens() -> None:
    """Each chat request in the README and in `up`'s banner bounds its length."""
    from argparse import Namespace

    from gateway.cli_up import banner

    text = banner("m", Path("/c"), "http://h:1", "h:2", Namespace(metrics_port=0), None)
    readme = (REPO / "README.md").read_text()
    examples = [*re.findall(r"```[a-z]*\n(.*?)```", readme, flags=re.S), text]
    requests = [
        block
        for block in examples
        if "chat.completions.create" in block or "/v1/chat/completions" in block
    ]
    assert requests
    for block in requests:
        for call in re.split(r"(?=chat\.completions\.create|curl )", block)[1:]:
            if "chat.completions.create" in call or "/v1/chat/completions" in call:
                assert "max_tokens" in call or "max_completion_tokens" in call, call[:400]


def test_default_max_tokens_flags() -> None:
    from gateway.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["up"]).default_max_tokens == 512
    assert parser.parse_args(["openai", "--upstream", "h:1"]).default_max_tokens is None


# ----------------------------------------------------------------------------- item 17


def test_descriptor_set_holds_the_health_service_as_grpc_defines_it() -> None:
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health_pb2

    from gateway.proto import DESCRIPTOR_SET_PATH

    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET_PATH.read_bytes())
    files = {file.name: file for file in descriptor_set.file}
    assert "gptqgw/v1/gateway.proto" in files
    ours = files["grpc_health/v1/health.proto"]
    theirs = descriptor_pb2.FileDescriptorProto()
    health_pb2.DESCRIPTOR.CopyToProto(theirs)
    for proto in (ours, theirs):
        proto.ClearField("options")
        proto.ClearField("source_code_info")
        for message in proto.message_type:
            _clear_json_names(message)
    assert ours.package == "grpc.health.v1"
    assert [s.name for s in ours.service] == ["Health"]
    # Same messages, fields, numbers and methods: the wire format grpcurl builds is the server's.
    assert {m.name: m for m in ours.message_type} == {m.name: m for m in theirs.message_type}
    assert {m.name: m for m in ours.service[0].method} == {
        m.name: m for m in theirs.service[0].method
    }


def _clear_json_names(message: object) -> None:
    """protoc fills json_name in a descriptor set; a compiled module's descriptor leaves it out."""
    for field in message.field:  # type: ignore[attr-defined]
        field.ClearField("json_name")
    for nested in message.nested_type:  # type: ignore[attr-defined]
        _clear_json_names(nested)


@pytest.mark.parametrize("command", [["up"], ["openai", "--upstream", "127.0.0.1:1"]])
def test_default_max_tokens_must_be_positive(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *command, "--default-max-tokens", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "--default-max-tokens 0: must be" in result.stderr
