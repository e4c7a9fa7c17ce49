"""The gRPC gateway end to end: a real `gptq-gateway serve` process on loopback, serving the SmolLM2
4-bit checkpoint on CPU, driven by the project's client, grpc's reflection client and raw stubs.

One server serves the whole module (loading the model is the expensive part); the last test
drains it with SIGTERM. Every model forward counts on a 2-core CPU (the engine prefills one
sequence per forward), so requests are few and short and run concurrently where they can.
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fixtures_grpc import API_KEY, SLOW_READER, ServedGateway, start_gateway
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from gateway.client import (
    ContextLengthExceededError,
    DeadlineExceededError,
    GatewayClient,
    InvalidArgumentError,
    ModelNotFoundError,
    OverloadedError,
    UnauthenticatedError,
    UnavailableError,
)
from gateway.proto import pb2, pb2_grpc

pytestmark = pytest.mark.slow

MAX_BATCH = 4
MAX_QUEUE = 60  # room for the 50 concurrent streams, and for requests still being cancelled
MAX_MODEL_LEN = 256
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def served(
    smollm2_w4_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedGateway]:
    work_dir = tmp_path_factory.mktemp("grpc-server")
    gateway = start_gateway(
        smollm2_w4_checkpoint,
        work_dir,
        extra_args=[
            "--max-num-seqs",
            str(MAX_BATCH),
            "--max-queue",
            str(MAX_QUEUE),
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--drain-timeout",
            "120",
            "--model-name",
            "smollm2-w4",
        ],
    )
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def client(served: ServedGateway) -> Iterator[GatewayClient]:
    with served.client() as gateway_client:
        yield gateway_client


def test_health_turns_serving_only_after_the_model_loaded(served: ServedGateway) -> None:
    # The port opens before the model loads: the first answer must be NOT_SERVING.
    assert served.health_states[0] == "NOT_SERVING", served.health_states
    assert served.health_states[-1] == "SERVING"
    assert served.client(api_key=None).health("gptqgw.v1.Gateway") == "SERVING"


def test_the_startup_heap_is_frozen_before_serving(served: ServedGateway) -> None:
    # gateway/server/gc_policy.py: no full collection may walk the loaded model's objects
    # between two engine steps, so the server freezes them once loaded.
    lines = served.log_path.read_text(errors="replace").splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    frozen = [r for r in records if r.get("msg") == "startup heap frozen"]
    assert frozen, served.log_tail()
    assert frozen[0]["objects"] > 100_000  # torch, transformers and the tokenizer at least


def test_model_info_and_list_models(client: GatewayClient) -> None:
    card = client.model_info()
    assert card.name == "smollm2-w4"
    assert card.context_length == MAX_MODEL_LEN
    assert card.vocab_size == 49152
    assert card.quantization is not None
    assert card.quantization["bits"] == 4
    assert card.quantization["quant_method"] == "gptq"
    assert card.eos_token_ids
    assert client.list_models() == [card]


def test_tokenize_and_detokenize_round_trip(client: GatewayClient) -> None:
    ids = client.tokenize(text=PROMPT)
    assert ids and all(isinstance(i, int) for i in ids)
    assert client.detokenize(ids, skip_special_tokens=True) == PROMPT
    chat = client.tokenize(messages=[{"role": "user", "content": "Hi"}])
    assert len(chat) > len(client.tokenize(text="Hi"))  # the chat template adds its markup


def test_auth_refuses_missing_and_wrong_keys_but_not_health(served: ServedGateway) -> None:
    for key in (None, "wrong-key", API_KEY + "x"):
        with served.client(api_key=key) as anonymous:
            with pytest.raises(UnauthenticatedError) as caught:
                anonymous.model_info()
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(UnauthenticatedError):
                list(anonymous.generate(prompt=PROMPT, max_tokens=1))
            assert anonymous.health() == "SERVING"
    with served.client(api_key="second-key") as other:
        assert other.model_info().name == "smollm2-w4"
    assert served.metric("gptqgw_requests_total", method="ModelInfo", status="unauthenticated") >= 3


def test_reflection_lists_the_service(served: ServedGateway) -> None:
    with grpc.insecure_channel(served.grpc_target) as plain:
        with pytest.raises(grpc.RpcError) as caught:
            ProtoReflectionDescriptorDatabase(plain).get_services()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel = grpc.intercept_channel(grpc.insecure_channel(served.grpc_target), _BearerKey(API_KEY))
    with channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert "gptqgw.v1.Gateway" in services
        assert "grpc.health.v1.Health" in services
        service = DescriptorPool(database).FindServiceByName("gptqgw.v1.Gateway")
        methods = {m.name: m for m in service.methods}
        assert set(methods) == {"Generate", "Tokenize", "Detokenize", "ListModels", "ModelInfo"}
        assert methods["Generate"].output_type.full_name == "gptqgw.v1.GenerateChunk"


def test_streamed_output_equals_the_engines_own(
    served: ServedGateway, smollm2_w4_checkpoint: Path
) -> None:
    """Read twice: at once (one message per engine event), and by a slow reader that stops after
    the first message until the engine has finished, so the rest piles up in the server and goes
    out coalesced. Both must carry exactly the engine's own events."""
    requests = {
        "greedy": dict(max_tokens=8, temperature=0.0, logprobs=2),
        "sampled": dict(
            max_tokens=8,
            temperature=0.9,
            top_p=0.95,
            top_k=50,
            seed=1234,
            repetition_penalty=1.1,
            presence_penalty=0.2,
            frequency_penalty=0.1,
        ),
    }

    async def stream_all() -> dict[str, list]:
        async with served.async_client() as gateway:
            results = await asyncio.gather(
                *(
                    gateway.generate(prompt=PROMPT, request_id=f"cmp-{name}", **sampling).collect()
                    for name, sampling in requests.items()
                )
            )
        return dict(zip(requests, results, strict=True))

    async def stream_all_slowly() -> dict[str, list]:
        async with served.async_client(options=SLOW_READER) as gateway:
            streams = [
                gateway.generate(prompt=PROMPT, request_id=f"slow-{name}", **sampling)
                for name, sampling in requests.items()
            ]
            firsts = [await stream.__anext__() for stream in streams]
            # Both requests are in the engine now; wait for it to finish them unread.
            await asyncio.to_thread(
                served.wait_for,
                lambda: served.metric("gptqgw_requests_running") == 0,
                300,
                "the engine to finish the unread streams",
            )
            results = []
            for first, stream in zip(firsts, streams, strict=True):
                results.append([first, *[chunk async for chunk in stream]])
        return dict(zip(requests, results, strict=True))

    streamed = asyncio.run(stream_all())
    slowly = asyncio.run(stream_all_slowly())
    reference = _generate_in_process(smollm2_w4_checkpoint, requests)
    for prefix, results in (("cmp", streamed), ("slow", slowly)):
        for name, chunks in results.items():
            assert all(c.request_id == f"{prefix}-{name}" for c in chunks)
            assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
            _assert_same_as_engine(chunks, reference[name], f"{prefix}-{name}")
    for name, chunks in slowly.items():
        tokens = sum(len(c.token_ids) for c in chunks)
        # The events that piled up behind the slow reader went out in fewer messages.
        assert len(chunks) < tokens, (name, [len(c.token_ids) for c in chunks])
        assert max(len(c.token_ids) for c in chunks) > 1


def _assert_same_as_engine(chunks: list, events: list, name: str) -> None:
    assert "".join(c.text for c in chunks) == "".join(e.text for e in events), name
    assert [t for c in chunks for t in c.token_ids] == [t for e in events for t in e.token_ids]
    last = chunks[-1]
    assert last.finish_reason == events[-1].finish_reason
    assert last.usage is not None and events[-1].usage is not None
    assert last.usage.prompt_tokens == events[-1].usage.prompt_tokens
    assert last.usage.completion_tokens == events[-1].usage.completion_tokens
    assert last.timings is not None and last.timings.total_s > 0
    ours = [lp for c in chunks for lp in (c.logprobs or ())]
    theirs = [lp for e in events for lp in (e.logprobs or ())]
    assert [lp.token_id for lp in ours] == [lp.token_id for lp in theirs], name
    for mine, engine in zip(ours, theirs, strict=True):
        assert mine.logprob == pytest.approx(engine.logprob, abs=1e-5)
        assert [a.token_id for a in mine.top] == [a.token_id for a in engine.top]


def _engine_settled(served: ServedGateway, client: GatewayClient) -> None:
    """Run one 1-token request to its end. The engine applies cancellations at the start of a
    step and publishes its counters before a step's final events, so once this returns, every
    earlier cancellation has freed its slot and the metrics say so (during a step they lag)."""
    deadline = time.monotonic() + 600
    while True:
        try:
            chunks = list(client.generate(prompt="Hi", max_tokens=1, temperature=0.0))
        except OverloadedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
            continue
        assert chunks[-1].finish_reason in ("length", "stop")
        return


def _generate_in_process(checkpoint: Path, requests: dict[str, dict]) -> dict[str, list]:
    from gateway.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

    engine = Engine.from_checkpoint(
        checkpoint,
        EngineConfig(device="cpu", max_num_seqs=2, max_model_len=MAX_MODEL_LEN, warmup=False),
    )
    engine.start()
    try:
        prompt_ids = engine.encode(PROMPT)

        async def run_all() -> dict[str, list]:
            async def one(name: str, sampling: dict) -> list:
                request = GenerationRequest(f"ref-{name}", prompt_ids, SamplingParams(**sampling))
                return [event async for event in engine.generate(request)]

            results = await asyncio.gather(*(one(n, s) for n, s in requests.items()))
            return dict(zip(requests, results, strict=True))

        return asyncio.run(run_all())
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    ("request_kwargs", "error", "field", "error_code"),
    [
        (dict(prompt=""), InvalidArgumentError, "prompt", "invalid_parameter"),
        (dict(prompt=PROMPT, model="gpt-4"), ModelNotFoundError, "model", "model_not_found"),
        (dict(prompt=PROMPT, top_p=1.5), InvalidArgumentError, "sampling.top_p", None),
        (dict(prompt=PROMPT, temperature=-1.0), InvalidArgumentError, "sampling.temperature", None),
        (dict(prompt=PROMPT, max_tokens=0), InvalidArgumentError, "sampling.max_tokens", None),
        (dict(prompt=PROMPT, logprobs=1000), InvalidArgumentError, "sampling.logprobs", None),
        (dict(token_ids=[1, 10**6]), InvalidArgumentError, "token_ids[1]", None),
        (dict(messages=[]), InvalidArgumentError, "messages", None),
        (
            dict(prompt=PROMPT, max_tokens=10**6),
            ContextLengthExceededError,
            "sampling.max_tokens",
            "context_length_exceeded",
        ),
    ],
    ids=[
        "empty-prompt",
        "unknown-model",
        "top-p-out-of-range",
        "negative-temperature",
        "zero-max-tokens",
        "too-many-logprobs",
        "token-id-outside-vocab",
        "no-messages",
        "huge-max-tokens",
    ],
)
def test_malformed_requests_get_invalid_argument_naming_the_field(
    client: GatewayClient, request_kwargs: dict, error: type, field: str, error_code: str | None
) -> None:
    with pytest.raises(error) as caught:
        list(client.generate(**request_kwargs))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.field == field
    assert field in caught.value.message
    if error_code is not None:
        assert caught.value.error_code == error_code
    if error is ContextLengthExceededError:
        assert "context_length_exceeded" in caught.value.message
        assert str(MAX_MODEL_LEN) in caught.value.message


def test_request_without_input_and_oversized_message(served: ServedGateway) -> None:
    metadata = (("authorization", f"Bearer {API_KEY}"),)
    with grpc.insecure_channel(served.grpc_target) as channel:
        stub = pb2_grpc.GatewayStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(pb2.GenerateRequest(), metadata=metadata, timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input" in caught.value.details()
        huge = pb2.GenerateRequest(prompt="x" * (5 * 1024 * 1024))  # over --max-message-bytes
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(huge, metadata=metadata, timeout=30))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_cancelling_mid_stream_frees_the_slot(served: ServedGateway, client: GatewayClient) -> None:
    cancelled_before = served.metric("gptqgw_generate_finish_reasons_total", reason="cancelled")
    generated_before = served.metric("gptqgw_generation_tokens_total")
    stream = client.generate(prompt=PROMPT, max_tokens=200, ignore_eos=True, temperature=0.0)
    first = next(stream)
    assert first.token_ids
    stream.close()
    served.wait_for(  # the server sees the client's cancellation a moment later
        lambda: (
            served.metric("gptqgw_generate_finish_reasons_total", reason="cancelled")
            > cancelled_before
        ),
        timeout=30,
        what="the server to count the cancellation",
    )
    assert served.metric("gptqgw_requests_total", method="Generate", status="cancelled") >= 1
    _engine_settled(served, client)
    assert served.metric("gptqgw_requests_running") == 0
    assert served.metric("gptqgw_kv_cache_blocks_used") == 0
    # Freed at the next step, not after the 200 tokens it asked for (the probe adds 1).
    assert served.metric("gptqgw_generation_tokens_total") - generated_before < 50


def test_deadline_exceeded_cancels_the_engine_request(
    served: ServedGateway, client: GatewayClient
) -> None:
    before = served.metric("gptqgw_requests_total", method="Generate", status="deadline_exceeded")
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        list(client.generate(prompt=PROMPT, max_tokens=200, ignore_eos=True, timeout=1.5))
    assert time.monotonic() - started < 30
    # The client sees DEADLINE_EXCEEDED before the server's handler records the outcome.
    served.wait_for(
        lambda: (
            served.metric("gptqgw_requests_total", method="Generate", status="deadline_exceeded")
            > before
        ),
        timeout=30,
        what="the deadline_exceeded outcome in the metrics",
    )
    _engine_settled(served, client)
    assert served.metric("gptqgw_requests_running") == 0
    assert served.metric("gptqgw_kv_cache_blocks_used") == 0


def test_fifty_concurrent_streams_all_complete(served: ServedGateway) -> None:
    async def run() -> list[list]:
        async with served.async_client(timeout=1800) as gateway:

            async def one(index: int) -> list:
                stream = gateway.generate(
                    prompt=f"{index} plus {index} equals", max_tokens=2, temperature=0.0
                )
                return await stream.collect()

            return await asyncio.gather(*(one(i) for i in range(50)))

    results = asyncio.run(run())
    assert len(results) == 50  # MAX_BATCH running + MAX_QUEUE waiting: none refused
    for chunks in results:
        last = chunks[-1]
        assert last.finish_reason in ("length", "stop")
        assert last.usage is not None and 1 <= last.usage.completion_tokens <= 2
    assert len({chunks[0].request_id for chunks in results}) == 50  # ids generated, unique
    assert served.metric("gptqgw_time_to_first_token_seconds_count") >= 50
    assert served.metric("gptqgw_inter_token_latency_seconds_count") >= 1
    assert served.metric("gptqgw_e2e_request_latency_seconds_count") >= 50
    assert served.metric("gptqgw_prompt_tokens_total") > 0


def test_full_queue_gets_resource_exhausted(served: ServedGateway) -> None:
    capacity = MAX_BATCH + MAX_QUEUE
    offered = capacity + 6

    async def run() -> tuple[int, list[BaseException]]:
        async with served.async_client() as gateway:
            streams = [
                gateway.generate(prompt=PROMPT, max_tokens=64, ignore_eos=True, request_id=f"q{i}")
                for i in range(offered)
            ]
            tasks = [asyncio.ensure_future(s.__anext__()) for s in streams]
            # Refusals come back at once; admitted requests wait for a slot or their first token.
            await asyncio.sleep(0.5)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                refused = [t for t in tasks if t.done() and t.exception() is not None]
                if len(refused) >= offered - capacity:
                    break
                await asyncio.sleep(0.2)
            errors = [t.exception() for t in tasks if t.done() and t.exception() is not None]
            for stream in streams:
                stream.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return len(errors), errors

    count, errors = asyncio.run(run())
    # Refused only when full: at most `capacity` admitted (fewer while earlier tests' cancelled
    # requests still hold a slot).
    assert count >= offered - capacity, errors
    for error in errors:
        assert isinstance(error, OverloadedError), error
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.error_code == "overloaded"
    with served.client() as client:
        _engine_settled(served, client)
    assert served.metric("gptqgw_requests_running") == 0
    assert served.metric("gptqgw_requests_waiting") == 0
    assert served.metric("gptqgw_kv_cache_blocks_used") == 0
    assert served.metric(
        "gptqgw_requests_total", method="Generate", status="resource_exhausted"
    ) >= (offered - capacity)


def test_sigterm_drains_in_flight_stream_and_exits_zero(served: ServedGateway) -> None:
    """Last in the module: it stops the shared server."""
    with served.client() as gateway:
        stream = gateway.generate(prompt=PROMPT, max_tokens=6, ignore_eos=True, temperature=0.0)
        chunks = [next(stream)]
        served.process.send_signal(signal.SIGTERM)
        served.wait_for(
            lambda: gateway.health() == "NOT_SERVING", timeout=30, what="health NOT_SERVING"
        )
        with pytest.raises(UnavailableError) as caught:
            list(gateway.generate(prompt=PROMPT, max_tokens=1))
        assert caught.value.error_code == "draining"
        chunks.extend(stream)
    assert chunks[-1].finish_reason == "length"
    assert sum(len(c.token_ids) for c in chunks) == 6
    assert served.process.wait(timeout=120) == 0
    log = served.log_path.read_text()
    assert '"msg": "draining"' in log and '"msg": "stopped"' in log


class _BearerKey(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the API key to calls made by clients that take no metadata (the reflection client)."""

    def __init__(self, key: str) -> None:
        self._entry = ("authorization", f"Bearer {key}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._entry],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass
