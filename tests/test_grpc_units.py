"""Fast checks of the gRPC layer's parts that need no model: the generated code, the client's
request building and error mapping, API keys, the error mapping of engine exceptions, logs, CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

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
from gateway.engine import (
    GenerationRequest,
    ModelInfo,
    Timings,
    TokenEvent,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from gateway.engine.errors import (
    ContextLengthExceeded,
    EngineOverloaded,
    EngineStopped,
    InvalidParameter,
)
from gateway.engine.stream import RequestStream
from gateway.proto import DESCRIPTOR_SET_PATH, SERVICE_NAME, pb2
from gateway.server import convert
from gateway.server.auth import ApiKeyInterceptor, bearer_token, load_api_keys
from gateway.server.convert import EngineTypes
from gateway.server.errors import ERROR_CODE_KEY, ERROR_FIELD_KEY, from_engine_error
from gateway.server.logs import JsonFormatter, configure_logging, request_id_var
from gateway.server.metrics import GatewayMetrics
from gateway.server.servicer import GatewayServicer, ServingState
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
        (["serve", ".", "--max-tokens-per-chunk", "0"], "--max-tokens-per-chunk 0"),
    ],
)
def test_serve_refuses_bad_flags_with_exit_code_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    assert main(args) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- coalescing


def _event(ids: list[int], *, logprobs: bool = False, **final: Any) -> TokenEvent:
    entries = None
    if logprobs:
        entries = [
            TokenLogprob(t, f"<{t}>", -0.5 * t, [TopLogprob(t + 1, f"<{t + 1}>", -t - 1.0)])
            for t in ids
        ]
    return TokenEvent("r", "".join(f"<{t}>" for t in ids), ids, entries, **final)


def _final(ids: list[int], reason: str = "length", **kwargs: Any) -> TokenEvent:
    return _event(
        ids,
        finish_reason=reason,
        usage=Usage(3, 9),
        timings=Timings(0.01, 0.02, 0.03),
        **kwargs,
    )


def test_merged_chunk_carries_every_event_in_order() -> None:
    events = [_event([1], logprobs=True), _event([2, 3], logprobs=True), _final([4], logprobs=True)]
    merged = chunk_from_message(convert.chunk(events, "r"))
    singles = [chunk_from_message(convert.chunk([e], "r")) for e in events]
    assert merged.text == "<1><2><3><4>" == "".join(c.text for c in singles)
    assert merged.token_ids == (1, 2, 3, 4)
    assert merged.logprobs is not None
    assert [(lp.token_id, lp.token, lp.logprob) for lp in merged.logprobs] == [
        (t, f"<{t}>", -0.5 * t) for t in (1, 2, 3, 4)
    ]
    assert [lp.top[0].token_id for lp in merged.logprobs] == [2, 3, 4, 5]
    assert merged.finish_reason == "length"
    assert merged.usage is not None
    assert (merged.usage.prompt_tokens, merged.usage.completion_tokens) == (3, 9)
    assert merged.timings is not None and merged.timings.total_s == pytest.approx(0.03)
    unfinished = chunk_from_message(convert.chunk(events[:2], "r"))
    assert unfinished.finish_reason is None and unfinished.usage is None
    failed = chunk_from_message(convert.chunk([events[0], _final([], "error", error="boom")], "r"))
    assert (failed.finish_reason, failed.error, failed.text) == ("error", "boom", "<1>")


def _stream(events: list[TokenEvent]) -> tuple[RequestStream, asyncio.Queue[TokenEvent], list]:
    queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
    for event in events:
        queue.put_nowait(event)
    abandoned: list[bool] = []
    return RequestStream("r", queue, lambda: abandoned.append(True)), queue, abandoned


def test_take_ready_respects_the_bound_and_stops_after_the_final_event() -> None:
    async def scenario() -> None:
        events = [_event([1]), _event([2, 3]), _event([4]), _final([5]), _event([99])]
        stream, queue, abandoned = _stream(events)
        assert stream.take_ready(2) == [events[0]]  # [2, 3] would make 3 tokens: held back
        assert stream.take_ready(0) == []
        assert await stream.__anext__() is events[1]  # the held event comes first
        assert stream.take_ready(64) == [events[2], events[3]]  # not the event after the final
        assert stream.take_ready(64) == []
        assert [e async for e in stream] == []
        assert queue.qsize() == 1 and not abandoned  # finished normally: nothing to cancel

        stream, queue, _ = _stream([])
        assert stream.take_ready(64) == []  # nothing ready: returns at once
        queue.put_nowait(_final([], "cancelled"))
        assert stream.take_ready(0)[0].finish_reason == "cancelled"  # no tokens: always fits

    asyncio.run(scenario())


class _HandFedEngine:
    """The engine's interface around a real RequestStream whose queue the test fills by hand."""

    model_info = ModelInfo("m", 1024, 100, None, (0,))

    def __init__(self, ready: list[TokenEvent]) -> None:
        self.ready = ready
        self.queue: asyncio.Queue[TokenEvent] | None = None
        self.abandoned = 0

    def encode(self, text: str) -> list[int]:
        return [7] * len(text)

    def generate(self, request: GenerationRequest) -> RequestStream:
        stream, self.queue, _ = _stream(self.ready)
        stream._abandon_callback = self._abandon
        return stream

    def _abandon(self) -> None:
        self.abandoned += 1


class _Context:
    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str, trailing: Any = ()) -> None:
        raise AssertionError(f"aborted: {code} {details}")


def _servicer(
    engine: _HandFedEngine, max_tokens_per_chunk: int
) -> tuple[GatewayServicer, GatewayMetrics]:
    from gateway.engine import GenerationRequest, SamplingParams

    state = ServingState("m", engine, EngineTypes(SamplingParams, GenerationRequest))
    metrics = GatewayMetrics()
    return GatewayServicer(state, metrics, max_tokens_per_chunk), metrics


def _generate(servicer: GatewayServicer) -> Any:
    return servicer.Generate(pb2.GenerateRequest(prompt="hi", request_id="r"), _Context())


@pytest.mark.parametrize(
    ("bound", "sizes"),
    [(1, [1] * 11), (4, [4, 4, 3]), (64, [11]), (2, [2, 2, 2, 2, 2, 1])],
)
def test_servicer_merges_what_piled_up_within_the_bound(bound: int, sizes: list[int]) -> None:
    events = [_event([t], logprobs=True) for t in range(1, 11)] + [_final([11], logprobs=True)]
    engine = _HandFedEngine(events)
    servicer, metrics = _servicer(engine, bound)

    async def read_all() -> list[pb2.GenerateChunk]:
        return [message async for message in _generate(servicer)]

    messages = asyncio.run(read_all())
    assert [len(m.token_ids) for m in messages] == sizes
    assert "".join(m.text for m in messages) == "".join(e.text for e in events)
    assert [t for m in messages for t in m.token_ids] == list(range(1, 12))
    assert [lp.token_id for m in messages for lp in m.logprobs] == list(range(1, 12))
    assert [m.finish_reason for m in messages[:-1]] == [pb2.FINISH_REASON_UNSPECIFIED] * (
        len(messages) - 1
    )
    assert messages[-1].finish_reason == pb2.FINISH_REASON_LENGTH
    assert messages[-1].usage.completion_tokens == 9  # the final event's usage, untouched
    sample = metrics.registry.get_sample_value
    assert sample("gptqgw_time_to_first_token_seconds_count") == 1
    # One inter-token latency per token after the first message's.
    assert sample("gptqgw_inter_token_latency_seconds_count") == 11 - sizes[0]
    assert engine.abandoned == 0


def test_servicer_sends_a_lone_ready_event_at_once() -> None:
    engine = _HandFedEngine([_event([1])])
    servicer, _ = _servicer(engine, 64)

    async def scenario() -> None:
        messages = _generate(servicer)
        # Only one event is ready: it must go out alone, without waiting for more.
        first = await asyncio.wait_for(messages.__anext__(), timeout=5)
        assert list(first.token_ids) == [1] and not first.finish_reason
        assert engine.queue is not None
        pending = asyncio.ensure_future(messages.__anext__())
        await asyncio.sleep(0.05)
        assert not pending.done()  # nothing ready: the servicer waits for the engine
        engine.queue.put_nowait(_event([2]))
        engine.queue.put_nowait(_event([3]))
        second = await asyncio.wait_for(pending, timeout=5)
        assert list(second.token_ids) == [2, 3]  # both were ready: one message
        engine.queue.put_nowait(_final([4]))
        last = await asyncio.wait_for(messages.__anext__(), timeout=5)
        assert list(last.token_ids) == [4] and last.finish_reason == pb2.FINISH_REASON_LENGTH
        with pytest.raises(StopAsyncIteration):
            await messages.__anext__()

    asyncio.run(scenario())


def test_max_tokens_per_chunk_must_be_positive_and_defaults_agree() -> None:
    from gateway import cli_serve
    from gateway.server import servicer

    assert cli_serve.DEFAULT_MAX_TOKENS_PER_CHUNK == servicer.DEFAULT_MAX_TOKENS_PER_CHUNK
    with pytest.raises(ValueError, match="max_tokens_per_chunk"):
        _servicer(_HandFedEngine([]), 0)
