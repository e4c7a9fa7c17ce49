"""Issue 15 hardening of the gRPC server: wire garbage, repetition penalty range, bounded metric
labels, request_id log injection, and ModelInfo's quantization fields.

Unit tests first (no server); then one real `gptq-gateway serve` process (text logs, so that a
forged line would show as one) driven by raw gRPC channels and the project's client.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fixtures_grpc import API_KEY, ServedGateway, start_gateway

from gateway.client import GatewayClient, InvalidArgumentError
from gateway.engine.errors import InvalidParameter
from gateway.engine.params import REPETITION_PENALTY_MAX, REPETITION_PENALTY_MIN, SamplingParams
from gateway.proto import SERVICE_NAME, pb2
from gateway.server.logs import JsonFormatter, RateLimitedLog, TextFormatter, printable
from gateway.server.metrics import KNOWN_METHODS, method_label

FORGED = "\n2026-01-01 00:00:00,000 ERROR gateway.server \x1b[31mFORGED LINE\x1b[0m"
RTL = "abc\u202edcba"
GATEWAY_REQUESTS = {
    "Generate": pb2.GenerateRequest,
    "Tokenize": pb2.TokenizeRequest,
    "Detokenize": pb2.DetokenizeRequest,
    "ListModels": pb2.ListModelsRequest,
    "ModelInfo": pb2.ModelInfoRequest,
}
WIRE_LOG_MESSAGE = "refused a request that does not parse"


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize("penalty", [1e-300, 5e-324, 0.0099, 100.5, 1e300])
def test_out_of_range_repetition_penalties_are_refused(penalty: float) -> None:
    with pytest.raises(InvalidParameter) as caught:
        SamplingParams(repetition_penalty=penalty).validate(vocab_size=100)
    assert caught.value.field == "repetition_penalty"


@pytest.mark.parametrize("penalty", [REPETITION_PENALTY_MIN, 1.0, 1.3, REPETITION_PENALTY_MAX])
def test_in_range_repetition_penalties_pass(penalty: float) -> None:
    SamplingParams(repetition_penalty=penalty).validate(vocab_size=100)


def test_method_label_buckets_unknown_methods() -> None:
    assert {method_label(f"/{SERVICE_NAME}/{name}") for name in KNOWN_METHODS} == KNOWN_METHODS
    for method in ("/gptqgw.v1.Gateway/Nope", "/x.Y/Generate", "garbage", "", "/a/b/c"):
        assert method_label(method) == "other"


def test_printable_escapes_and_cuts() -> None:
    assert printable("req-42") == "req-42"
    escaped = printable(FORGED)
    assert "\n" not in escaped and "\x1b" not in escaped and "\\n" in escaped
    assert "\u202e" not in printable(RTL)
    cut = printable("x" * 1_000_000, limit=64)
    assert len(cut) < 100 and "1000000 chars" in cut


def test_formatters_escape_client_values() -> None:
    record = logging.makeLogRecord(
        {"msg": "Generate ok", "levelname": "INFO", "request_id": FORGED, "field": RTL}
    )
    text = TextFormatter().format(record)
    assert "\n" not in text and "\x1b" not in text and "\u202e" not in text
    entry = json.loads(JsonFormatter().format(record))
    assert "\u202e" not in entry["field"] and "\x1b" not in entry["request_id"]


def test_rate_limited_log_counts_what_it_drops(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("test.rate"), interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.rate"):
        assert limited.warning("garbage", method="m")
        for _ in range(99):
            now[0] += 0.05
            assert not limited.warning("garbage", method="m")
        now[0] = 10.0
        assert limited.warning("garbage", method="m")
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING]
    assert [r.suppressed for r in caplog.records] == [0, 99]


# ----------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def served(
    smollm2_w4_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedGateway]:
    work_dir = tmp_path_factory.mktemp("grpc-hardening")
    gateway = start_gateway(
        smollm2_w4_checkpoint,
        work_dir,
        extra_args=["--log-format", "text", "--max-model-len", "256", "--model-name", "w4"],
    )
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def client(served: ServedGateway) -> Iterator[GatewayClient]:
    with served.client() as gateway_client:
        yield gateway_client


def _garbage_for(message_type: type) -> list[bytes]:
    """Payloads that do not parse as `message_type` (checked here with protobuf itself): random
    bytes, a truncated and a bit-flipped valid message, invalid UTF-8 in a string field."""
    rng = random.Random(15)
    payloads = [bytes([0xFF] * 8)]
    while len(payloads) < 6:
        candidate = rng.randbytes(rng.randint(1, 64))
        if not _parses(message_type, candidate):
            payloads.append(candidate)
    strings = [f for f in message_type.DESCRIPTOR.fields if f.type == f.TYPE_STRING]
    if strings:
        field = strings[0]
        valid = message_type(**{field.name: "hello world"}).SerializeToString()
        payloads.append(valid[:-3] + bytes([0x80]))  # the string's bytes cut short
        tag = bytes([(field.number << 3) | 2])
        payloads.append(tag + bytes([3]) + b"\xed\xa0\x80")  # a lone surrogate: bad UTF-8
        flipped = bytearray(valid)
        flipped[1] ^= 0x40  # the length now runs past the end
        payloads.append(bytes(flipped))
    return [p for p in payloads if not _parses(message_type, p)]


def _parses(message_type: type, data: bytes) -> bool:
    try:
        message_type.FromString(data)
    except Exception:
        return False
    return True


def _raw_call(
    channel: grpc.Channel, method: str, payload: bytes, streaming_response: bool, key: str | None
) -> grpc.RpcError:
    metadata = () if key is None else (("authorization", f"Bearer {key}"),)
    if streaming_response:
        call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            list(call(payload, timeout=30, metadata=metadata))
    else:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            call(payload, timeout=30, metadata=metadata)
    return caught.value


def _log_lines(served: ServedGateway) -> list[str]:
    return served.log_path.read_text(errors="replace").splitlines()


def test_wire_garbage_is_invalid_argument_logged_once_at_warning(
    served: ServedGateway, client: GatewayClient
) -> None:
    started = time.monotonic()
    lines_before = len(_log_lines(served))
    refused = 0
    with grpc.insecure_channel(served.grpc_target) as channel:
        for name, message_type in GATEWAY_REQUESTS.items():
            method = f"/{SERVICE_NAME}/{name}"
            for payload in _garbage_for(message_type):
                error = _raw_call(channel, method, payload, name == "Generate", API_KEY)
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, payload)
                assert error.details().startswith("request:"), error.details()
                assert ("gptqgw-error-code", "malformed_request") in error.trailing_metadata()
                refused += 1
                # Without a key: refused for the key, cleanly, whatever the bytes.
                error = _raw_call(channel, method, payload, name == "Generate", None)
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (name, payload)
        for payload in _garbage_for(pb2.GenerateRequest)[:3]:
            # Health is open (no key) and served by grpc's own servicer: wrapped too.
            health = "/grpc.health.v1.Health/Check"
            error = _raw_call(channel, health, payload, False, None)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        reflection = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(reflection(iter([b"\xff" * 8]), timeout=30, metadata=_key_metadata()))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused >= 30
    # The server still serves, and said so at WARNING, rate-limited, with no traceback.
    assert client.model_info().name == "w4"
    elapsed = time.monotonic() - started
    new_lines = _log_lines(served)[lines_before:]
    assert not [line for line in new_lines if " ERROR " in line or "Traceback" in line], "\n".join(
        new_lines[:20]
    )
    warnings = [line for line in new_lines if WIRE_LOG_MESSAGE in line]
    assert warnings and all(" WARNING " in line for line in warnings)
    assert len(warnings) <= 1 + elapsed / 10.0, warnings
    assert served.metric("gptqgw_requests_total", method="Tokenize", status="invalid_argument") > 0


def _key_metadata() -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {API_KEY}"),)


def test_unknown_methods_share_one_metric_series(served: ServedGateway) -> None:
    with grpc.insecure_channel(served.grpc_target) as channel:
        for index in range(25):
            service = SERVICE_NAME if index % 2 else f"evil{index}.Service"
            call = channel.unary_unary(
                f"/{service}/M{uuid.uuid4().hex}",
                request_serializer=None,
                response_deserializer=None,
            )
            with pytest.raises(grpc.RpcError) as caught:
                call(b"", timeout=30)  # no key: refused, and counted
            assert caught.value.code() in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.UNIMPLEMENTED,
            )
    methods = {
        dict(labels).get("method")
        for (name, labels) in served.metrics()
        if name == "gptqgw_requests_total"
    }
    assert methods <= KNOWN_METHODS | {"other"}, methods
    assert served.metric("gptqgw_requests_total", method="other", status="unauthenticated") >= 25


@pytest.mark.parametrize("penalty", [1e-300, 5e-324, 0.005, 1e6])
def test_generate_refuses_out_of_range_repetition_penalty(
    client: GatewayClient, penalty: float
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        list(client.generate(prompt="Hi", max_tokens=2, repetition_penalty=penalty))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.field == "sampling.repetition_penalty"
    assert "repetition_penalty" in caught.value.message


def test_generate_accepts_the_smallest_allowed_penalty(client: GatewayClient) -> None:
    chunks = list(client.generate(prompt="Hi", max_tokens=1, repetition_penalty=0.01))
    assert chunks[-1].finish_reason == "length", chunks[-1]


@pytest.mark.parametrize(
    "request_id",
    [FORGED, RTL, "ok\u200bzero-width", "x" * 1_000_000, "tab\there"],
    ids=["forged-line", "rtl-override", "zero-width", "one-megabyte", "tab"],
)
def test_bad_request_ids_are_refused_and_logged_escaped(
    served: ServedGateway, client: GatewayClient, request_id: str
) -> None:
    lines_before = len(_log_lines(served))
    with pytest.raises(InvalidArgumentError) as caught:
        list(client.generate(prompt="Hi", max_tokens=1, request_id=request_id))
    assert caught.value.field == "request_id"
    assert caught.value.message.startswith("request_id:")
    time.sleep(0.5)  # let the server's log line reach the file
    text = served.log_path.read_text(errors="replace")
    new_lines = text.splitlines()[lines_before:]
    assert not [line for line in new_lines if line.startswith("2026-01-01")]  # no forged line
    for line in new_lines:
        assert len(line) < 2_000, line[:200]
        assert "\x1b" not in line and "\u202e" not in line and "\u200b" not in line
    assert any("refused the client's request_id" in line for line in new_lines), new_lines


def test_good_request_ids_still_echo(client: GatewayClient) -> None:
    chunks = list(client.generate(prompt="Hi", max_tokens=1, request_id="req-ok 42"))
    assert {chunk.request_id for chunk in chunks} == {"req-ok 42"}


def test_model_info_reports_the_quantize_config(
    client: GatewayClient, smollm2_w4_checkpoint: Path
) -> None:
    written = json.loads((smollm2_w4_checkpoint / "quantize_config.json").read_text())
    card = client.model_info()
    assert card.quantization is not None
    for key in ("damp_percent", "true_sequential", "static_groups", "bits", "group_size", "sym"):
        assert card.quantization[key] == pytest.approx(written[key]), key
    assert written["damp_percent"] > 0 and written["true_sequential"] is True
    assert client.list_models() == [card]


def test_quant_summary_takes_how_it_was_quantized_from_the_config() -> None:
    from gateway.model.config import QuantConfig
    from gateway.model.llama import _quant_summary

    def summary(raw: dict[str, object]) -> dict[str, object]:
        quant = QuantConfig(bits=4, group_size=128, desc_act=False, sym=True,
                            checkpoint_format="gptq", raw=raw)  # fmt: skip
        config = type("Config", (), {"quant": quant})()
        result = _quant_summary(config)  # type: ignore[arg-type]
        assert result is not None
        return result

    ours = summary({"damp_percent": 0.01, "true_sequential": True, "static_groups": False})
    assert (ours["damp_percent"], ours["true_sequential"], ours["static_groups"]) == (
        0.01,
        True,
        False,
    )
    # Another tool's config with odd types or none of these keys: left unset, never a crash.
    odd = summary({"damp_percent": "0.01", "true_sequential": 1, "static_groups": None})
    assert odd["damp_percent"] is None and odd["true_sequential"] is None
    assert summary({})["static_groups"] is None
