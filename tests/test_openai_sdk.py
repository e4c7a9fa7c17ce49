"""The REST shim end to end with the official `openai` package: a real `gptq-gateway serve`
process (SmolLM2 4-bit on CPU) and a real `gptq-gateway openai` process in front of it, on
loopback. Outputs are checked against the gRPC client's for the same request where they must
match (greedy decoding, or the same seed).

The server runs with two engine slots and two queue places, so that a burst of six requests
gets 429s; the last test drains it with SIGTERM (503s). Generations are kept short: every decode
step counts on a 2-core CPU.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import socket
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fixtures_grpc import ServedGateway, start_gateway
from fixtures_openai import SHIM_KEY, ServedShim, shim_in_front, sse_events

from gateway.client import InvalidArgumentError

pytestmark = pytest.mark.slow

MODEL = "smollm2-w4"
MAX_MODEL_LEN = 256
CHAT = [{"role": "user", "content": "Name three colors."}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gateway(
    smollm2_w4_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedGateway]:
    served = start_gateway(
        smollm2_w4_checkpoint,
        tmp_path_factory.mktemp("openai-grpc"),
        extra_args=[
            "--max-num-seqs", "2",
            "--max-queue", "2",
            "--max-model-len", str(MAX_MODEL_LEN),
            "--drain-timeout", "120",
            "--model-name", MODEL,
        ],
    )  # fmt: skip
    yield served
    served.stop()


@pytest.fixture(scope="module")
def shim(gateway: ServedGateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedShim]:
    yield from shim_in_front(gateway, tmp_path_factory.mktemp("openai-shim"))


@pytest.fixture(scope="module")
def client(shim: ServedShim) -> Iterator[openai.OpenAI]:
    with shim.openai_client() as sdk:
        yield sdk


def grpc_text(gateway: ServedGateway, **request: object) -> tuple[str, object]:
    """The gRPC client's text and last chunk for the same request."""
    with gateway.client() as grpc_client:
        chunks = list(grpc_client.generate(**request))
    return "".join(chunk.text for chunk in chunks), chunks[-1]


# ----------------------------------------------------------------------------- models, probes


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [model.id for model in models] == [MODEL]
    assert models[0].object == "model" and models[0].owned_by == "gptq-gateway"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


def test_probes_and_schema_need_no_key(shim: ServedShim) -> None:
    anonymous = ServedShim(shim.process, shim.host, shim.port, shim.log_path, api_key=None)
    assert anonymous.request("GET", "/health")[0] == 200
    status, _, body = anonymous.request("GET", "/ready")
    assert status == 200 and json.loads(body) == {"status": "ready", "upstream": "SERVING"}
    status, _, body = anonymous.request("GET", "/openapi.json")
    paths = json.loads(body)["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(paths)
    assert anonymous.request("GET", "/docs")[0] == 200


# ----------------------------------------------------------------------------- chat


def test_chat_equals_grpc_greedy_output(client: openai.OpenAI, gateway: ServedGateway) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == MODEL and reply.system_fingerprint.startswith("fp_")
    assert abs(reply.created - time.time()) < 600
    [choice] = reply.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    text, last = grpc_text(gateway, messages=CHAT, max_tokens=12, temperature=0)
    assert choice.message.content == text and text
    assert choice.finish_reason == last.finish_reason
    assert reply.usage.prompt_tokens == last.usage.prompt_tokens
    assert reply.usage.completion_tokens == last.usage.completion_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_matches_and_include_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=12, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_completion_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    with_choices = [chunk for chunk in chunks if chunk.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in with_choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in with_choices[:-1]] == [None] * (
        len(with_choices) - 1
    )
    assert with_choices[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert len({chunk.id for chunk in chunks}) == 1
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}

    plain = list(
        client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=4, temperature=0, stream=True
        )
    )
    assert all(chunk.choices and chunk.usage is None for chunk in plain)


def test_chat_without_max_tokens_fills_the_context(
    client: openai.OpenAI, gateway: ServedGateway
) -> None:
    # A prompt a few tokens short of the context: the reply may take exactly what is left.
    with gateway.client() as grpc_client:
        words = 200
        while True:
            messages = [{"role": "user", "content": "go " * words}]
            prompt_tokens = len(grpc_client.tokenize(messages=messages))
            if prompt_tokens >= MAX_MODEL_LEN - 6:
                break
            words += max(1, (MAX_MODEL_LEN - 6 - prompt_tokens) // 2)
    reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    usage = reply.usage
    assert usage.prompt_tokens == prompt_tokens
    assert usage.prompt_tokens + usage.completion_tokens <= MAX_MODEL_LEN
    if reply.choices[0].finish_reason == "length":
        assert usage.prompt_tokens + usage.completion_tokens == MAX_MODEL_LEN

    too_long = [{"role": "user", "content": "go " * (MAX_MODEL_LEN * 2)}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=too_long)
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.param == "messages"


def _stop_spanning_a_token_boundary(pieces: list[str]) -> tuple[str, int]:
    """A 2-character stop string made of the end of one token and the start of the next, whose
    first occurrence in the text is at that boundary; and where the text must be cut."""
    text = "".join(pieces)
    boundary = 0
    for left, right in itertools.pairwise(pieces):
        boundary += len(left)
        if left and right:
            stop = left[-1] + right[0]
            if text.find(stop) == boundary - 1:
                return stop, boundary - 1
    raise AssertionError(f"no usable token boundary in {pieces}")


def test_stop_string_split_across_tokens_never_shows(client: openai.OpenAI) -> None:
    free = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=16, temperature=0, logprobs=True
    )
    pieces = [entry.token for entry in free.choices[0].logprobs.content]
    assert "".join(pieces) == free.choices[0].message.content
    stop, cut = _stop_spanning_a_token_boundary(pieces)
    expected = free.choices[0].message.content[:cut]

    stopped = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=16, temperature=0, stop=[stop, "never-seen"]
    )
    assert stopped.choices[0].message.content == expected
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=16, temperature=0, stop=stop, stream=True
    )
    deltas = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    assert "".join(deltas) == expected
    assert all(stop not in delta for delta in deltas)

    completion = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, logprobs=0
    )
    pieces = completion.choices[0].logprobs.tokens
    stop, cut = _stop_spanning_a_token_boundary(pieces)
    cut_completion = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop]
    )
    assert cut_completion.choices[0].text == completion.choices[0].text[:cut]
    assert cut_completion.choices[0].finish_reason == "stop"


def test_n2_choices_are_seed_and_seed_plus_one(client: openai.OpenAI) -> None:
    common = {"model": MODEL, "messages": CHAT, "max_tokens": 8, "temperature": 1.0}
    both = client.chat.completions.create(n=2, seed=7, **common)
    assert [choice.index for choice in both.choices] == [0, 1]
    first = client.chat.completions.create(seed=7, **common)
    second = client.chat.completions.create(seed=8, **common)
    assert both.choices[0].message.content == first.choices[0].message.content
    assert both.choices[1].message.content == second.choices[0].message.content
    assert both.usage.prompt_tokens == first.usage.prompt_tokens  # counted once
    assert both.usage.completion_tokens == (
        first.usage.completion_tokens + second.usage.completion_tokens
    )

    texts: dict[int, str] = defaultdict(str)
    finishes: dict[int, str] = {}
    for chunk in client.chat.completions.create(n=2, seed=7, stream=True, **common):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {i: both.choices[i].message.content for i in (0, 1)}
    assert finishes == {i: both.choices[i].finish_reason for i in (0, 1)}


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    common = {"model": MODEL, "messages": CHAT, "max_tokens": 10, "temperature": 1.0}
    texts = [
        client.chat.completions.create(seed=seed, **common).choices[0].message.content
        for seed in (123, 123, 124, 125)
    ]
    assert texts[0] == texts[1]
    assert len(set(texts[1:])) > 1, texts  # three seeds, ten tokens: not all the same
    completions = {
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=99
        )
        .choices[0]
        .text
        for _ in range(2)
    }
    assert len(completions) == 1


def test_chat_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = reply.choices[0]
    content = choice.logprobs.content
    # Every generated token but a final EOS, whose text is never shown.
    eos = 1 if choice.finish_reason == "stop" else 0
    assert len(content) == reply.usage.completion_tokens - eos
    assert "".join(entry.token for entry in content) == choice.message.content
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        best = entry.top_logprobs[0]
        # Greedy picks the most likely token, which is the first alternative.
        assert entry.token == best.token and entry.logprob == pytest.approx(best.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )

    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert plain.choices[0].logprobs is None

    streamed = [
        entry
        for chunk in client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=8,
            temperature=0,
            logprobs=True,
            top_logprobs=1,
            stream=True,
        )
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in content
    ]


# ----------------------------------------------------------------------------- completions


def test_completions_equal_grpc_and_stream(client: openai.OpenAI, gateway: ServedGateway) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    text, last = grpc_text(gateway, prompt=PROMPT, max_tokens=8, temperature=0)
    assert whole.choices[0].text == text
    assert whole.choices[0].finish_reason == last.finish_reason
    assert whole.usage.completion_tokens == last.usage.completion_tokens

    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()

    with gateway.client() as grpc_client:
        ids = grpc_client.tokenize(text=PROMPT)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == text


def test_completions_batch_of_prompts(client: openai.OpenAI) -> None:
    prompts = [PROMPT, "One, two, three,"]
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    singles = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0)
        for p in prompts
    ]
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in singles]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)


def test_completions_logprobs(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2
    )
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
    assert "".join(logprobs.tokens) == choice.text
    offsets = [0]
    for token in logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs.text_offset == offsets
    for token, value, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert value <= 0 and 1 <= len(top) <= 2
        assert top.get(token) == pytest.approx(value)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"stop": ["ok", ""]}, "stop[1]"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"extra_body": {"top_k": -5}}, "top_k"),
        ({"extra_body": {"surprise": 1}}, "surprise"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ],
)
def test_invalid_parameters_are_400_naming_the_field(
    client: openai.OpenAI, kwargs: dict, param: str
) -> None:
    request = {"model": MODEL, "messages": CHAT, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**request)
    error = caught.value
    assert error.status_code == 400 and error.param == param
    assert error.type == "invalid_request_error"
    assert param.split("[")[0] in error.message


def test_model_without_tool_template_refuses_tools(
    client: openai.OpenAI, shim: ServedShim, gateway: ServedGateway
) -> None:
    # SmolLM2's own chat template never renders tools: a 400 that says so, whatever tool_choice
    # (with "none" too: the tools would not be rendered), streamed or not; and on gRPC.
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    for extra in ({}, {"tool_choice": "none"}, {"tool_choice": "required", "stream": True}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=MODEL, messages=CHAT, max_tokens=2, tools=tools, **extra
            )
        assert (caught.value.param, caught.value.code) == ("tools", "tools_not_supported")
        assert "no tool support" in caught.value.message
    status, _, body = shim.request(
        "POST", "/v1/tokenize", {"model": MODEL, "messages": CHAT, "tools": tools}
    )
    assert status == 400 and json.loads(body)["error"]["param"] == "tools"
    with gateway.client() as grpc_client:
        assert grpc_client.model_info().tool_call_format == ""
        with pytest.raises(InvalidArgumentError) as refused:
            list(grpc_client.generate(messages=CHAT, tools=tools, max_tokens=2))
    assert refused.value.field == "messages.tools_json"
    assert refused.value.error_code == "tools_not_supported"
    # Tool turns in the history need no tool support: the template renders them as turns.
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[*CHAT, {"role": "assistant", "content": "Red."},
                  {"role": "tool", "tool_call_id": "c1", "content": "ok"}],
        max_tokens=2,
    )  # fmt: skip
    assert reply.choices[0].message.tool_calls is None


def test_upstream_refusals_name_the_request_field(client: openai.OpenAI) -> None:
    # Checked by the gRPC server, not the shim's schema: the field comes back under its
    # OpenAI name.
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="", max_tokens=2)
    assert caught.value.param == "prompt" and "prompt" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=[10**6], max_tokens=2)
    assert caught.value.param.startswith("prompt")


def test_context_length_exceeded(client: openai.OpenAI) -> None:
    for stream in (False, True):
        for name in ("max_tokens", "max_completion_tokens"):
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(
                    model=MODEL, messages=CHAT, stream=stream, **{name: MAX_MODEL_LEN * 4}
                )
            assert caught.value.code == "context_length_exceeded"
            assert caught.value.param == name
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_MODEL_LEN * 4)
    assert caught.value.code == "context_length_exceeded"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(
                model="gpt-4o", messages=CHAT, max_tokens=2, stream=stream
            )
        assert caught.value.code == "model_not_found" and caught.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)


def test_missing_or_wrong_key_is_401(shim: ServedShim) -> None:
    with shim.openai_client(api_key="wrong-key") as wrong:
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
        assert caught.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    status, headers, body = shim.request(
        "POST", "/v1/completions", {"model": MODEL, "prompt": "x"}, headers={"authorization": ""}
    )
    assert status == 401 and json.loads(body)["error"]["code"] == "missing_api_key"
    assert headers["www-authenticate"] == "Bearer"


def test_framework_errors_come_in_openai_shape(shim: ServedShim) -> None:
    cases = [
        ("POST", "/v1/chat/completions", b"{not json", 400),
        ("POST", "/v1/chat/completions", b"", 400),
        ("POST", "/v1/chat/completions", b"[1, 2]", 400),
        ("POST", "/v1/completions", {"model": MODEL}, 400),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400),
        ("GET", "/v1/chat/completions", None, 405),
        ("GET", "/v1/nothing-here", None, 404),
    ]
    for method, path, body, expected in cases:
        status, headers, raw = shim.request(method, path, body)
        assert status == expected, (path, body, raw)
        assert headers["content-type"] == "application/json"
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_full_queue_is_429(shim: ServedShim) -> None:
    # 2 slots + 2 queue places: of six long requests sent at once, two are refused.
    async def burst() -> list[object]:
        async with shim.async_openai_client() as sdk:
            return await asyncio.gather(
                *(
                    sdk.chat.completions.create(
                        model=MODEL,
                        messages=CHAT,
                        max_tokens=24,
                        extra_body={"ignore_eos": True},
                    )
                    for _ in range(6)
                ),
                return_exceptions=True,
            )

    results = asyncio.run(burst())
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if not isinstance(r, BaseException)]
    assert len(refused) == 2 and len(served) == 4, results
    assert refused[0].status_code == 429 and refused[0].code == "engine_overloaded"
    assert refused[0].response.headers["retry-after"] == "1"
    assert all(reply.usage.completion_tokens == 24 for reply in served)


def _open_stream(shim: ServedShim, body: dict) -> socket.socket:
    """A raw HTTP/1.1 request whose reply is read by hand, so the test can hang up mid-way."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection((shim.host, shim.port), timeout=120)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"authorization: Bearer {SHIM_KEY}\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def test_client_disconnect_cancels_the_upstream_call(
    shim: ServedShim, gateway: ServedGateway
) -> None:
    def cancelled() -> float:
        return gateway.metric("gptqgw_requests_total", method="Generate", status="cancelled")

    before = cancelled()
    long_request = {"model": MODEL, "messages": CHAT, "max_tokens": 200, "ignore_eos": True}
    sock = _open_stream(shim, {**long_request, "stream": True})
    received = b""
    while b"data: " not in received:
        received += sock.recv(4096)
    sock.close()  # mid-stream, ~190 tokens before the end
    gateway.wait_for(lambda: cancelled() >= before + 1, 30, "the streamed call's cancellation")

    sock = _open_stream(shim, long_request)  # not streamed: the shim is waiting for the end
    time.sleep(1.0)
    sock.close()
    gateway.wait_for(lambda: cancelled() >= before + 2, 30, "the unary call's cancellation")
    gateway.wait_for(
        lambda: gateway.metric("gptqgw_requests_running") == 0, 30, "the slots to be freed"
    )
    metrics = shim.metrics_text()
    assert "gptqgw_http_client_disconnects_total 2.0" in metrics


def test_sse_framing_on_the_wire(shim: ServedShim) -> None:
    status, headers, raw = shim.request(
        "POST",
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": CHAT,
            "max_tokens": 5,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    assert "content-length" not in headers
    payloads = sse_events(raw)
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert all(
        set(c) >= {"id", "created", "model", "system_fingerprint", "choices"} for c in chunks
    )
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"

    status, headers, raw = shim.request(
        "POST",
        "/v1/completions",
        {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True},
    )
    payloads = sse_events(raw)
    assert payloads[-1] == "[DONE]"
    assert all(json.loads(p)["object"] == "text_completion" for p in payloads[:-1])


def test_shim_metrics(shim: ServedShim) -> None:
    text = shim.metrics_text()
    assert 'gptqgw_http_requests_total{path="/v1/chat/completions",status="200"}' in text
    assert 'gptqgw_http_requests_total{path="/v1/chat/completions",status="400"}' in text
    assert "gptqgw_http_time_to_first_token_seconds_count" in text
    assert "gptqgw_http_streams_open 0.0" in text


def test_zz_draining_upstream_gives_503(
    client: openai.OpenAI, shim: ServedShim, gateway: ServedGateway
) -> None:
    """Last: SIGTERM the gRPC server while a stream is open. The open stream finishes; new
    requests get 503; /ready turns 503."""
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=16, temperature=0, stream=True
    )
    first = next(iter(stream))
    gateway.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert caught.value.status_code == 503
    assert caught.value.code in ("draining", "upstream_unavailable")
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason in ("stop", "length")
    assert first.choices[0].delta.role == "assistant"
    assert shim.request("GET", "/ready")[0] == 503
    assert gateway.process.wait(timeout=120) == 0
