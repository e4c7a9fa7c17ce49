"""The engine on the real SmolLM2-135M 4-bit checkpoint and the real runner (CPU).

The reference is plain greedy decoding with the same runner (prefill, then one decode per token,
argmax), computed before the engine's loop starts. The checkpoint comes from the session fixture
`smollm2_w4_checkpoint` (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fixtures_engine import plain_greedy_decode

from gateway.engine import (
    Engine,
    EngineConfig,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)

pytestmark = pytest.mark.slow

NEW_TOKENS = 16


@dataclass
class Reference:
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]


@dataclass
class Smol:
    engine: Engine
    refs: dict[str, Reference]


def plain_greedy(runner: Any, prompt: list[int], count: int) -> Reference:
    """Prefill, then one decode step per token, on pool blocks the engine has not used yet."""
    return Reference(prompt, *plain_greedy_decode(runner, prompt, count))


@pytest.fixture(scope="module")
def smol(smollm2_w4_checkpoint: Path) -> Iterator[Smol]:
    config = EngineConfig(device="cpu", max_num_seqs=8, max_queue=16, max_model_len=256)
    engine = Engine.from_checkpoint(smollm2_w4_checkpoint, config)
    prompts = {
        "chat": engine.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}]
        ),
        "code": engine.encode("def fibonacci(n):\n    "),
        "emoji": engine.apply_chat_template(
            [{"role": "user", "content": "Write the word 世界 and a smiley emoji."}]
        ),
    }
    refs = {name: plain_greedy(engine.runner, ids, NEW_TOKENS) for name, ids in prompts.items()}
    engine.start()
    yield Smol(engine, refs)
    assert engine.shutdown(timeout=30.0)


def greedy(**kwargs: Any) -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, **kwargs)


async def collect(engine: Engine, request: GenerationRequest) -> list[TokenEvent]:
    return [event async for event in engine.generate(request)]


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def text_of(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)


def test_engine_greedy_equals_plain_greedy_decoding(smol: Smol) -> None:
    engine = smol.engine
    for name, ref in smol.refs.items():
        request = GenerationRequest(name, ref.prompt, greedy(logprobs=2))
        events = asyncio.run(collect(engine, request))
        assert tokens_of(events) == ref.tokens, name
        # Deltas never split a character, and add up to the decoded tokens.
        assert text_of(events) == engine.decode(ref.tokens)
        assert not any("\ufffd" in e.text for e in events)
        got = [lp.logprob for e in events for lp in (e.logprobs or [])]
        assert got == pytest.approx(ref.logprobs, abs=1e-3)
        assert events[-1].finish_reason == "length"


def test_eight_concurrent_requests_and_greedy_batch_invariance(smol: Smol) -> None:
    engine = smol.engine
    seeded = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=1234)
    sampled = [
        seeded,
        SamplingParams(max_tokens=8, temperature=1.0, top_k=40),
        SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.3),
        SamplingParams(
            max_tokens=8, temperature=0.7, presence_penalty=0.5, frequency_penalty=0.5, logprobs=3
        ),
        SamplingParams(max_tokens=8, temperature=0.8, stop=["\n"], min_tokens=2),
    ]
    chat = smol.refs["chat"].prompt

    async def scenario() -> list[list[TokenEvent]]:
        greedy_jobs = [
            collect(engine, GenerationRequest(f"g-{name}", ref.prompt, greedy()))
            for name, ref in smol.refs.items()
        ]
        sampled_jobs = [
            collect(engine, GenerationRequest(f"s{i}", chat, p)) for i, p in enumerate(sampled)
        ]
        return await asyncio.gather(*greedy_jobs, *sampled_jobs)

    results = asyncio.run(scenario())
    for events in results:
        assert events[-1].finish_reason in ("stop", "length"), events[-1]
        assert events[-1].usage is not None and events[-1].usage.completion_tokens >= 1
    # Greedy output does not depend on what else is in the batch.
    for events, ref in zip(results[:3], smol.refs.values(), strict=True):
        assert tokens_of(events) == ref.tokens
    # Nor does a seeded request's output.
    alone = asyncio.run(collect(engine, GenerationRequest("again", chat, seeded)))
    assert tokens_of(alone) == tokens_of(results[3])


def test_stop_string_cuts_real_model_text(smol: Smol) -> None:
    engine = smol.engine
    ref = smol.refs["chat"]
    full = engine.decode(ref.tokens)
    # A stop string from the middle of the reference text, spanning a token boundary.
    stop = full[len(full) // 3 : len(full) // 3 + 6]
    assert stop.strip()
    request = GenerationRequest("stop", ref.prompt, greedy(stop=[stop]))
    events = asyncio.run(collect(engine, request))
    assert text_of(events) == full[: full.index(stop)]
    assert events[-1].finish_reason == "stop"


def test_cancelling_a_real_request_frees_its_slot(smol: Smol) -> None:
    engine = smol.engine
    ref = smol.refs["code"]

    async def scenario() -> None:
        count = 0
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        async for _ in engine.generate(GenerationRequest("long", ref.prompt, params)):
            count += 1
            if count == 2:
                break
        deadline = time.monotonic() + 60
        while engine.stats().kv_blocks_used:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    before = engine.stats().generated_tokens_total
    asyncio.run(scenario())
    assert engine.stats().generated_tokens_total - before < 200
