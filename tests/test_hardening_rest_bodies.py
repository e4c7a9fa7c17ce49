"""Malformed, oversized and abandoned request bodies at the REST shim (issue 15, items 3, 4, 9):
real `serve` and `openai` processes on loopback, raw HTTP for what no SDK would send."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fixtures_grpc import API_KEY, ServedGateway, free_port, start_gateway
from fixtures_openai import ServedShim, start_shim, wait_for_http

MODEL = "hardening-model"
LIMIT = 4 * 1024 * 1024  # the shim's default --max-request-bytes
UPSTREAM_MESSAGE_LIMIT = 1024 * 1024  # the gRPC server's --max-message-bytes here, under LIMIT


@pytest.fixture(scope="module")
def gateway(
    smollm2_w4_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedGateway]:
    work_dir = tmp_path_factory.mktemp("hardening-rest")
    served = start_gateway(
        smollm2_w4_checkpoint,
        work_dir,
        extra_args=[
            "--max-model-len", "128", "--model-name", MODEL,
            "--max-message-bytes", str(UPSTREAM_MESSAGE_LIMIT),
        ],
    )  # fmt: skip
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def shim(gateway: ServedGateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedShim]:
    work_dir = tmp_path_factory.mktemp("hardening-rest-shim")
    served = start_shim(gateway.grpc_target, work_dir, api_keys=(), upstream_key=API_KEY)
    try:
        yield served
        assert served.request("GET", "/health")[0] == 200, served.log_tail()
    finally:
        assert served.stop() == 0, served.log_tail()


def _error(shim: ServedShim, path: str, body: bytes, status: int) -> dict:
    got, headers, raw = shim.request("POST", path, body)
    assert got == status, (got, raw[:300])
    assert "retry-after" not in headers
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    return error


def _chat(content: str = "hi", model: str = MODEL) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1}


@pytest.mark.parametrize("depth", [50_000, 100_000])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_deep_nesting_is_400(shim: ServedShim, path: str, depth: int) -> None:
    nested = b'{"model": "m", "metadata": ' + b"[" * depth + b"]" * depth + b"}"
    error = _error(shim, path, nested, 400)
    assert error["code"] == "invalid_json"
    assert "nested" in error["message"]


def test_moderate_nesting_in_an_any_field_is_400(shim: ServedShim) -> None:
    # Deep enough for pydantic but within json's reach: still a 400, never a 500.
    body = json.dumps(_chat()).encode()[:-1] + b', "tools": ' + b"[" * 900 + b"]" * 900 + b"}"
    _error(shim, "/v1/chat/completions", body, 400)


def test_lone_surrogate_escapes_name_the_field(shim: ServedShim) -> None:
    body = json.dumps(_chat("a\ud800b")).encode()  # ensure_ascii: sent as the escape \ud800
    assert b"\\ud800" in body
    error = _error(shim, "/v1/chat/completions", body, 400)
    assert (error["param"], error["code"]) == ("messages[0].content", "invalid_unicode")
    assert "messages[0].content" in error["message"]

    body = json.dumps({"model": MODEL, "prompt": ["ok", "\udfff"], "max_tokens": 1}).encode()
    error = _error(shim, "/v1/completions", body, 400)
    assert error["param"] == "prompt[1]"


def test_raw_surrogate_bytes_name_the_field(shim: ServedShim) -> None:
    body = b'{"model": "x\xed\xa0\x80", "prompt": "hi", "max_tokens": 1}'
    error = _error(shim, "/v1/completions", body, 400)
    assert (error["param"], error["code"]) == ("model", "invalid_unicode")
    body = json.dumps(_chat("PLACEHOLDER")).encode().replace(b"PLACEHOLDER", b"\xed\xa0\x80")
    assert _error(shim, "/v1/chat/completions", body, 400)["param"] == "messages[0].content"
    # Other bytes that are not UTF-8 stay a plain invalid JSON body.
    assert _error(shim, "/v1/completions", b'{"prompt": "\xff"}', 400)["code"] == "invalid_json"


def test_huge_model_name_is_400_naming_model(shim: ServedShim) -> None:
    client = shim.openai_client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="m" * 100_000, messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == "model"


def _connect(shim: ServedShim) -> socket.socket:
    return socket.create_connection((shim.host, shim.port), timeout=60)


def _post_head(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: x", "content-type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_reply(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of a reply that has a Content-Length."""
    reply = b""
    while b"\r\n\r\n" not in reply:
        data = sock.recv(65536)
        if not data:
            break
        reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        data = sock.recv(65536)
        if not data:
            break
        body += data
    return int(head.split()[1]), body


def _assert_too_large(status: int, reply: bytes) -> None:
    assert status == 413, reply[:300]
    error = json.loads(reply)["error"]
    assert (error["code"], error["type"]) == ("request_too_large", "invalid_request_error")
    assert str(LIMIT) in error["message"]


@pytest.mark.parametrize("size", [6 * 1000 * 1000, 50 * 1000 * 1000])
def test_declared_body_over_the_limit_is_413_before_it_is_sent(shim: ServedShim, size: int) -> None:
    with _connect(shim) as sock:
        # Only the first 64 KiB go out: the answer must not wait for the rest.
        sock.sendall(_post_head("/v1/chat/completions", f"content-length: {size}"))
        sock.sendall(b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 65536)
        status, reply = _read_reply(sock)
    _assert_too_large(status, reply)


def test_chunked_body_is_cut_off_at_the_limit(shim: ServedShim) -> None:
    """A chunked body gets its 413 once it passes the limit; the rest is never read."""
    megabyte = b"x" * (1024 * 1024)
    chunk = f"{len(megabyte):x}\r\n".encode() + megabyte + b"\r\n"
    with _connect(shim) as sock:
        sock.sendall(_post_head("/v1/completions", "transfer-encoding: chunked"))
        for _ in range(50):  # 50 MB offered; the shim must answer after about 4
            try:
                sock.sendall(chunk)
            except OSError:  # the shim closed the connection after its answer
                break
            sock.settimeout(0.05)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break  # the answer has come
            except TimeoutError:
                pass
            finally:
                sock.settimeout(60)
        status, reply = _read_reply(sock)
    _assert_too_large(status, reply)


def test_upstream_message_limit_is_413_not_429(shim: ServedShim) -> None:
    """Under the shim's limit but over the gRPC server's: no retry can help, so no 429."""
    body = json.dumps(
        {"model": MODEL, "prompt": "x" * (2 * UPSTREAM_MESSAGE_LIMIT), "max_tokens": 1}
    ).encode()
    assert len(body) < LIMIT
    error = _error(shim, "/v1/completions", body, 413)
    assert error["code"] == "request_too_large"


def test_client_hanging_up_mid_body_is_one_info_line(shim: ServedShim) -> None:
    with _connect(shim) as sock:
        sock.sendall(_post_head("/v1/chat/completions", "content-length: 1000"))
        sock.sendall(b'{"model": "')
        time.sleep(0.5)  # the shim is now waiting for the rest of the body
    deadline = time.monotonic() + 30
    lines: list[dict] = []
    while time.monotonic() < deadline:
        text = shim.log_path.read_text(errors="replace")
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        if any("disconnected" in line.get("msg", "") for line in lines):
            break
        time.sleep(0.1)
    text = shim.log_path.read_text(errors="replace")
    gone = [line for line in lines if "disconnected" in line.get("msg", "")]
    assert len(gone) == 1, text[-2000:]
    assert gone[0]["level"].lower() == "info", gone[0]
    assert "Traceback" not in text and "internal error" not in text, text[-2000:]
    # The shim still answers.
    assert shim.request("GET", "/health")[0] == 200


def test_max_request_bytes_flag(gateway: ServedGateway, tmp_path: Path) -> None:
    """--max-request-bytes sets the limit (here far under the default); 0 is refused."""
    port = free_port()
    command = [
        sys.executable, "-m", "gateway.cli", "openai", "--upstream", gateway.grpc_target,
        "--port", str(port), "--log-format", "json", "--max-request-bytes", "1000",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GPTQGW_UPSTREAM_API_KEY": API_KEY}
    env.pop("GPTQGW_API_KEYS", None)
    log_path = tmp_path / "shim.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    small = ServedShim(process, "127.0.0.1", port, log_path, None)
    try:
        wait_for_http(small, "/ready")
        ok = json.dumps(_chat()).encode()
        assert small.request("POST", "/v1/chat/completions", ok)[0] == 200
        big = json.dumps(_chat("x" * 1000)).encode()
        status, _, reply = small.request("POST", "/v1/chat/completions", big)
        assert status == 413
        assert "1000 bytes" in json.loads(reply)["error"]["message"]
    finally:
        assert small.stop() == 0, small.log_tail()
    refused = subprocess.run(
        [*command[:-1], "0"], capture_output=True, text=True, env=env, timeout=120
    )
    assert refused.returncode != 0
    assert "--max-request-bytes" in refused.stderr + refused.stdout
