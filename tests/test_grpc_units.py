"""Fast checks of the gRPC layer's parts that need no model: the generated code, the client's
request building and error mapping, API keys, the error mapping of engine exceptions, logs, CLI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from gateway.client import (
    SAMPLING_PARAMETERS,
    ContextLengthExceededError,
    GatewayError,
    InvalidArgumentError,
    OverloadedError,
    UnauthenticatedError,
    chunk_from_message,
    error_from_rpc,
    generate_request,
)
from gateway.engine.errors import (
    ContextLengthExceeded,
    EngineOverloaded,
    EngineStopped,
    InvalidParameter,
)
from gateway.proto import DESCRIPTOR_SET_PATH, SERVICE_NAME, pb2
from gateway.server import convert
from gateway.server.auth import ApiKeyInterceptor, bearer_token, load_api_keys
from gateway.server.errors import ERROR_CODE_KEY, ERROR_FIELD_KEY, from_engine_error
from gateway.server.logs import JsonFormatter, configure_logging, request_id_var
from quantize.errors import UserInputError

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- generated code


def test_generated_modules_match_the_proto(tmp_path: Path) -> None:
    """gateway/proto_gen is what protoc makes of proto/ now (a stale build fails here)."""
    out = tmp_path / "gen"
    out.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "proto/gptqgw/v1/gateway.proto",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    generated = ROOT / "gateway" / "proto_gen" / "gptqgw" / "v1"
    for name in ("gateway_pb2.py", "gateway_pb2_grpc.py"):
        assert (out / "gptqgw" / "v1" / name).read_text() == (generated / name).read_text(), name


def test_descriptor_set_carries_the_service_and_its_comments() -> None:
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET_PATH.read_bytes())
    files = {f.name: f for f in descriptor_set.file}
    gateway = files["gptqgw/v1/gateway.proto"]
    assert [s.name for s in gateway.service] == ["Gateway"]
    assert SERVICE_NAME == "gptqgw.v1.Gateway"
    comments = " ".join(loc.leading_comments for loc in gateway.source_code_info.location)
    assert "Cancelling the call" in comments


# ----------------------------------------------------------------------------- client requests


def test_generate_request_takes_exactly_one_input() -> None:
    assert generate_request(prompt="hi").WhichOneof("input") == "prompt"
    assert generate_request(token_ids=[]).WhichOneof("input") == "token_ids"
    chat = generate_request(messages=[("user", "hi"), {"role": "assistant", "content": "yo"}])
    assert [(m.role, m.content) for m in chat.messages.messages] == [
        ("user", "hi"),
        ("assistant", "yo"),
    ]
    with pytest.raises(TypeError, match="exactly one"):
        generate_request()
    with pytest.raises(TypeError, match="exactly one"):
        generate_request(prompt="a", token_ids=[1])


def test_generate_request_sampling_parameters() -> None:
    request = generate_request(prompt="x", max_tokens=5, temperature=0.0, stop="END", seed=None)
    sampling = request.sampling
    assert sampling.HasField("max_tokens") and sampling.max_tokens == 5
    assert sampling.HasField("temperature") and sampling.temperature == 0.0  # 0 is sent, not unset
    assert not sampling.HasField("seed")  # None leaves it to the engine
    assert list(sampling.stop) == ["END"]
    with pytest.raises(TypeError, match="top_q"):
        generate_request(prompt="x", top_q=0.5)
    # Every engine sampling parameter has a field in the proto.
    from gateway.engine import SamplingParams

    assert set(SamplingParams.__dataclass_fields__) == set(SAMPLING_PARAMETERS)


def test_server_passes_only_the_fields_the_client_set() -> None:
    kwargs = convert.sampling_kwargs(pb2.SamplingParams(top_k=0, stop=["a"], logprobs=0))
    assert kwargs == {
        "top_k": 0,
        "logprobs": 0,
        "stop": ("a",),
        "stop_token_ids": (),
        "ignore_eos": False,
        "min_tokens": 0,
    }


def test_chunk_conversion_of_the_last_chunk() -> None:
    message = pb2.GenerateChunk(
        request_id="r",
        text="!",
        token_ids=[5],
        finish_reason=pb2.FINISH_REASON_LENGTH,
        usage=pb2.Usage(prompt_tokens=3, completion_tokens=4),
        timings=pb2.Timings(queued_s=0.1, ttft_s=0.2, total_s=0.3),
        logprobs=[
            pb2.TokenLogprob(
                token_id=5, token="!", logprob=-0.5, top=[pb2.TopLogprob(token_id=6, logprob=-1)]
            )
        ],
    )
    chunk = chunk_from_message(message)
    assert chunk.finish_reason == "length"
    assert chunk.usage is not None and chunk.usage.completion_tokens == 4
    assert chunk.timings is not None and chunk.timings.total_s == pytest.approx(0.3)
    assert chunk.logprobs is not None and chunk.logprobs[0].top[0].token_id == 6
    plain = chunk_from_message(pb2.GenerateChunk(request_id="r", text="a", token_ids=[1]))
    assert plain.finish_reason is None and plain.usage is None and plain.logprobs is None


# ----------------------------------------------------------------------------- errors


class _FailedCall(grpc.RpcError):
    """What grpc raises for a failed call: code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing


def test_client_errors_carry_code_message_and_field() -> None:
    error = error_from_rpc(
        _FailedCall(
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.max_tokens: context_length_exceeded: ...",
            ((ERROR_CODE_KEY, "context_length_exceeded"), (ERROR_FIELD_KEY, "sampling.max_tokens")),
        )
    )
    assert isinstance(error, ContextLengthExceededError)
    assert isinstance(error, InvalidArgumentError)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.field == "sampling.max_tokens"
    assert error.error_code == "context_length_exceeded"
    assert isinstance(
        error_from_rpc(_FailedCall(grpc.StatusCode.UNAUTHENTICATED, "no key")), UnauthenticatedError
    )
    assert isinstance(
        error_from_rpc(_FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, "")), OverloadedError
    )
    other = error_from_rpc(_FailedCall(grpc.StatusCode.DATA_LOSS, "lost"))
    assert type(other) is GatewayError and other.message == "lost"


def test_engine_errors_map_to_statuses_naming_the_request_field() -> None:
    bad_param = from_engine_error(InvalidParameter("top_p", "must be in (0, 1]"))
    assert bad_param is not None
    assert (bad_param.status, bad_param.field) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.top_p",
    )
    assert bad_param.message.startswith("sampling.top_p:")

    bad_prompt = from_engine_error(InvalidParameter("prompt_token_ids", "empty"), "token_ids")
    assert bad_prompt is not None and bad_prompt.field == "token_ids"

    too_long = from_engine_error(ContextLengthExceeded(100, 1000, 512))
    assert too_long is not None
    assert too_long.status == grpc.StatusCode.INVALID_ARGUMENT
    assert too_long.error_code == "context_length_exceeded"
    assert too_long.field == "sampling.max_tokens"
    assert "1100" in too_long.message and "512" in too_long.message
    prompt_alone = from_engine_error(ContextLengthExceeded(600, 1, 512), "messages")
    assert prompt_alone is not None and prompt_alone.field == "messages"

    overloaded = from_engine_error(EngineOverloaded(10, 10))
    assert overloaded is not None and overloaded.status == grpc.StatusCode.RESOURCE_EXHAUSTED
    stopped = from_engine_error(EngineStopped("shut down"))
    assert stopped is not None and stopped.status == grpc.StatusCode.UNAVAILABLE
    assert from_engine_error(RuntimeError("bug")) is None


# ----------------------------------------------------------------------------- API keys


def test_api_keys_from_file_and_environment(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\n\nkey-one\n  key-two  \n")
    assert load_api_keys(keys_file, environ={"GPTQGW_API_KEYS": "k3, k4,,"}) == [
        "key-one",
        "key-two",
        "k3",
        "k4",
    ]
    assert load_api_keys(None, environ={}) == []
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(UserInputError, match="holds no key"):
        load_api_keys(tmp_path / "empty", environ={})
    with pytest.raises(UserInputError, match="cannot read"):
        load_api_keys(tmp_path / "missing", environ={})


def test_bearer_keys_are_checked_against_every_key() -> None:
    interceptor = ApiKeyInterceptor(["alpha", "beta"])
    assert interceptor.is_authorized([("authorization", "Bearer beta")])
    assert interceptor.is_authorized([("authorization", "bearer alpha")])
    assert not interceptor.is_authorized([("authorization", "Bearer alph")])
    assert not interceptor.is_authorized([("authorization", "Basic alpha")])
    assert not interceptor.is_authorized([])
    assert bearer_token([("x-other", "1"), ("authorization", b"Bearer  tok ")]) == "tok"
    with pytest.raises(ValueError):
        ApiKeyInterceptor([])


# ----------------------------------------------------------------------------- logs and CLI


def test_json_logs_carry_the_request_id() -> None:
    record = logging.LogRecord(
        "gateway.server", logging.INFO, __file__, 1, "Generate ok", None, None
    )
    record.request_id = "req-7"
    record.completion_tokens = 3
    entry = json.loads(JsonFormatter().format(record))
    assert entry["request_id"] == "req-7"
    assert entry["completion_tokens"] == 3
    assert entry["msg"] == "Generate ok" and entry["level"] == "info"


def test_request_id_comes_from_the_context(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    token = request_id_var.set("ctx-42")
    try:
        logging.getLogger("gateway.server").info("hello")
    finally:
        request_id_var.reset(token)
        logging.getLogger().handlers.clear()
    assert json.loads(capsys.readouterr().err.strip())["request_id"] == "ctx-42"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "/nonexistent/checkpoint"], "not a directory"),
        (["serve", ".", "--grpc-port", "70000"], "--grpc-port 70000"),
        (["serve", ".", "--max-queue", "0"], "--max-queue 0"),
        (["serve", ".", "--drain-timeout", "-1"], "--drain-timeout"),
        (["serve", ".", "--api-keys-file", "/nonexistent/keys"], "--api-keys-file"),
    ],
)
def test_serve_refuses_bad_flags_with_exit_code_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    assert main(args) == 2
    assert message in capsys.readouterr().err
