"""Engine v2 through the real server on CPU: the paged KV cache, prefix caching and refusals.

One `gptq-gateway serve` process of the SmolLM2 4-bit checkpoint with the long context and the
many sequences a static per-slot cache could not hold (128 x 8,192 tokens of fp32 KV is about
48 GB; the pool here is 1 GiB), driven by the project's gRPC client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_grpc import ServedGateway, start_gateway

from gateway.client import Chunk, InvalidArgumentError

pytestmark = pytest.mark.slow

MAX_NUM_SEQS = 128
MAX_MODEL_LEN = 8192
STREAMS = 48
NEW_TOKENS = 8
PREFIX_TOKENS = 1800


@pytest.fixture(scope="module")
def served(
    smollm2_w4_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedGateway]:
    args = [
        "--max-num-seqs", str(MAX_NUM_SEQS), "--max-model-len", str(MAX_MODEL_LEN),
        "--kv-cache-memory", "1GiB", "--max-queue", "64",
    ]  # fmt: skip
    gateway = start_gateway(
        smollm2_w4_checkpoint, tmp_path_factory.mktemp("serve-paged"), extra_args=args
    )
    yield gateway
    gateway.stop()


def _tokens(chunks: list[Chunk]) -> list[int]:
    return [t for chunk in chunks for t in chunk.token_ids]


async def _greedy(
    served: ServedGateway, prompts: list[str], max_tokens: int = NEW_TOKENS, **sampling: object
) -> list[list[Chunk]]:
    async with served.async_client(timeout=1800) as gateway:
        streams = [
            gateway.generate(prompt=p, max_tokens=max_tokens, temperature=0.0, **sampling)
            for p in prompts
        ]
        return await asyncio.gather(*(s.collect() for s in streams))


def test_pool_is_sized_by_kv_cache_memory(served: ServedGateway) -> None:
    total_tokens = served.metric("gptqgw_kv_cache_tokens_total")
    block_bytes = 2**30 / served.metric("gptqgw_kv_cache_blocks_total")
    # SmolLM2 in fp32: 30 layers x 3 kv heads x 64 dims x (k, v) x 4 bytes = 46,080 bytes a token.
    assert block_bytes == pytest.approx(16 * 46_080, rel=0.01)
    assert 20_000 < total_tokens < MAX_NUM_SEQS * MAX_MODEL_LEN / 40


def test_48_streams_match_their_greedy_output_alone(served: ServedGateway) -> None:
    prompts = [f"Question {i}: what is {i} times {i + 3}? Answer:" for i in range(6)]
    alone = [asyncio.run(_greedy(served, [p], ignore_eos=True))[0] for p in prompts]
    crowd = asyncio.run(_greedy(served, [prompts[i % 6] for i in range(STREAMS)], ignore_eos=True))
    assert len(crowd) == STREAMS
    for index, chunks in enumerate(crowd):
        assert chunks[-1].finish_reason == "length", chunks[-1]
        assert _tokens(chunks)[:NEW_TOKENS] == _tokens(alone[index % 6])[:NEW_TOKENS], index
    assert served.metric("gptqgw_requests_running") == 0
    assert served.metric("gptqgw_kv_cache_blocks_used") == 0
    # More than one sequence per step: the streams were batched.
    steps = served.metric("gptqgw_engine_steps_total")
    assert served.metric("gptqgw_engine_step_tokens_total") > 2 * steps
    # The phase timings account for every counted step, and each kind's host phases add up.
    by_kind = {
        kind: served.metric("gptqgw_engine_kind_steps_total", kind=kind)
        for kind in ("decode", "mixed")
    }
    assert by_kind["decode"] > 0 and by_kind["mixed"] > 0, by_kind
    assert sum(by_kind.values()) <= steps
    for kind in by_kind:
        seconds = {
            phase: served.metric("gptqgw_engine_step_phase_seconds_total", kind=kind, phase=phase)
            for phase in ("schedule", "launch", "wait", "output", "gpu")
        }
        assert seconds["launch"] > 0 and seconds["wait"] > 0 and seconds["output"] > 0, seconds
        assert seconds["gpu"] == 0, seconds  # CPU: no device span


def test_repeated_long_prefix_is_not_prefilled_again(served: ServedGateway) -> None:
    with served.client() as client:
        text = " ".join(f"item {i} is {i * 7 % 13}." for i in range(1000))
        prefix = client.tokenize(text)[:PREFIX_TOKENS]
        hits_before = served.metric("gptqgw_prefix_cache_hit_tokens_total")
        timings = []
        for suffix in ("The first item is", "The last item is"):
            ids = [*prefix, *client.tokenize(suffix)]
            computed_before = served.metric("gptqgw_engine_step_tokens_total")
            started = time.perf_counter()
            chunks = list(client.generate(token_ids=ids, max_tokens=2, temperature=0.0))
            timings.append(
                (
                    chunks[-1].timings.ttft_s if chunks[-1].timings else None,
                    time.perf_counter() - started,
                    served.metric("gptqgw_engine_step_tokens_total") - computed_before,
                )
            )
    print("(ttft_s, wall_s, tokens computed) first, second:", timings)
    first_computed, second_computed = timings[0][2], timings[1][2]
    reused = served.metric("gptqgw_prefix_cache_hit_tokens_total") - hits_before
    assert reused >= PREFIX_TOKENS // 16 * 16 - 16
    # The second request computed its suffix (and at most one partial block), not the prefix.
    assert second_computed <= first_computed / 4


@pytest.fixture(scope="module")
def small_pool(
    smollm2_w4_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedGateway]:
    """A pool of 12 blocks (192 tokens): four streams of 60 tokens cannot all be resident."""
    args = [
        "--max-num-seqs", "4", "--max-model-len", "512",
        "--kv-cache-memory", str(12 * 16 * 46_080), "--max-num-batched-tokens", "64",
    ]  # fmt: skip
    gateway = start_gateway(
        smollm2_w4_checkpoint, tmp_path_factory.mktemp("serve-small-pool"), extra_args=args
    )
    yield gateway
    gateway.stop()


def test_preempted_streams_complete_with_their_unpreempted_output(
    small_pool: ServedGateway,
) -> None:
    assert small_pool.metric("gptqgw_kv_cache_tokens_total") == 192
    prompts = [f"Write a list of {n} fruits:" for n in (3, 5, 7, 9)]
    alone = [asyncio.run(_greedy(small_pool, [p], 48, ignore_eos=True))[0] for p in prompts]
    assert small_pool.metric("gptqgw_preemptions_total") == 0
    together = asyncio.run(_greedy(small_pool, prompts, 48, ignore_eos=True))
    assert small_pool.metric("gptqgw_preemptions_total") > 0
    for chunks, reference in zip(together, alone, strict=True):
        assert chunks[-1].finish_reason == "length"
        assert _tokens(chunks) == _tokens(reference)
    assert small_pool.metric("gptqgw_kv_cache_blocks_used") == 0


def test_request_larger_than_the_pool_is_refused_with_both_numbers(
    small_pool: ServedGateway,
) -> None:
    with small_pool.client() as client, pytest.raises(InvalidArgumentError) as refused:
        list(client.generate(token_ids=[1] * 100, max_tokens=100, temperature=0.0))
    assert refused.value.error_code == "kv_cache_too_small"
    assert refused.value.field == "sampling.max_tokens"
    assert "199" in refused.value.message and "192" in refused.value.message
