"""Engine logic over the ScriptedRunner test double: continuous batching, cancellation, queue
limits, context checks, stop conditions, errors in a step, shutdown. The same engine on the real
SmolLM2 runner is tested in test_engine_smollm2.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import torch
from fixtures_engine import EOS_ID, VOCAB_SIZE, ScriptedRunner, ScriptedSpec, byte_tokenizer, ids

from gateway.engine import (
    ContextLengthExceeded,
    Engine,
    EngineConfig,
    EngineError,
    EngineOverloaded,
    EngineStopped,
    GenerationRequest,
    InvalidParameter,
    KVCacheTooSmall,
    SamplingParams,
    TokenEvent,
)

T = TypeVar("T")
TOKENIZER = byte_tokenizer()
FREE_RUN = "free-run: "  # no "say:", so the double emits pseudo-random bytes and never EOS

EngineFactory = Callable[..., tuple[Engine, ScriptedRunner]]


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def greedy(max_tokens: int = 64, **kwargs: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)


def request(rid: str, prompt: str, params: SamplingParams | None = None) -> GenerationRequest:
    return GenerationRequest(rid, ids(prompt), params or greedy())


async def collect(engine: Engine, req: GenerationRequest) -> list[TokenEvent]:
    return [event async for event in engine.generate(req)]


def text_of(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)


def token_ids_of(events: list[TokenEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


@pytest.fixture
def make_engine() -> Iterator[EngineFactory]:
    engines: list[tuple[Engine, ScriptedRunner]] = []

    def factory(
        *,
        num_slots: int = 4,
        max_queue: int = 16,
        max_model_len: int = 512,
        chunk: int = 4096,
        delay: float = 0.0,
        start: bool = True,
        num_blocks: int | None = None,
        prefix_caching: bool = True,
    ) -> tuple[Engine, ScriptedRunner]:
        blocks = num_blocks or num_slots * -(-max_model_len // 16)
        runner = ScriptedRunner(
            ScriptedSpec(max_model_len=max_model_len, num_blocks=blocks), delay_s=delay
        )
        config = EngineConfig(
            max_num_seqs=num_slots,
            max_queue=max_queue,
            max_num_batched_tokens=chunk,
            prefix_caching=prefix_caching,
            warmup=False,
        )
        engine = Engine(runner, TOKENIZER, config)
        if start:
            engine.start()
        engines.append((engine, runner))
        return engine, runner

    yield factory
    for engine, runner in engines:
        assert engine.shutdown(timeout=5.0)
        assert runner.violations == []  # the engine kept the runner contract throughout
        engine._blocks.check_invariants()


# ------------------------------------------------------------------------- basic stream


def test_greedy_stream_text_usage_and_timings(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()
    events = run(collect(engine, request("a", "say:Hello, 世界 😀|")))
    assert text_of(events) == "Hello, 世界 😀"
    assert all(e.finish_reason is None for e in events[:-1])
    final = events[-1]
    assert final.finish_reason == "stop" and final.token_ids == [EOS_ID]
    assert final.usage is not None
    assert final.usage.prompt_tokens == len(ids("say:Hello, 世界 😀|"))
    assert final.usage.completion_tokens == len("Hello, 世界 😀".encode()) + 1
    timings = final.timings
    assert timings is not None and timings.ttft_s is not None
    assert 0 <= timings.queued_s <= timings.ttft_s <= timings.total_s
    assert engine.stats().kv_blocks_used == 0
    stats = engine.stats()
    assert stats.running == 0
    assert stats.prompt_tokens_total == final.usage.prompt_tokens
    assert stats.generated_tokens_total == final.usage.completion_tokens


def test_max_tokens_ends_with_length(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()
    events = run(collect(engine, request("a", FREE_RUN, greedy(max_tokens=7))))
    assert len(token_ids_of(events)) == 7
    assert events[-1].finish_reason == "length"
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 7


def test_min_tokens_holds_off_eos(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()
    events = run(collect(engine, request("a", "say:ab|", greedy(min_tokens=4))))
    tokens = token_ids_of(events)
    assert tokens[:2] == ids("ab") and EOS_ID not in tokens[:4]
    assert events[-1].finish_reason == "stop" and tokens[-1] == EOS_ID
    assert len(tokens) == 5


def test_ignore_eos_runs_to_max_tokens(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()
    events = run(collect(engine, request("a", "say:ab|", greedy(max_tokens=6, ignore_eos=True))))
    assert len(token_ids_of(events)) == 6 and events[-1].finish_reason == "length"
    assert text_of(events).startswith("ab")


def test_stop_token_id_ends_without_its_text(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()
    params = greedy(stop_token_ids=[ord("c")])
    events = run(collect(engine, request("a", "say:abcd|", params)))
    assert text_of(events) == "ab"
    assert events[-1].finish_reason == "stop" and events[-1].token_ids == [ord("c")]


def test_stop_string_split_across_tokens_never_leaks(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()
    params = greedy(stop=["<END>", "never"])
    events = run(collect(engine, request("a", "say:Hello<END>world|", params)))
    assert text_of(events) == "Hello"
    assert events[-1].finish_reason == "stop"
    assert not any("<" in e.text for e in events)
    # Tokens of "<END>" were generated (and counted) but their text was held back.
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == len("Hello<END>")


def test_multibyte_stop_string(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()
    events = run(collect(engine, request("a", "say:ok 😀 no|", greedy(stop=["😀"]))))
    assert text_of(events) == "ok "
    assert events[-1].finish_reason == "stop"


def test_held_stop_prefix_is_released_at_the_end(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()
    events = run(collect(engine, request("a", "say:value <EN|", greedy(stop=["<END>"]))))
    assert text_of(events) == "value <EN"
    assert events[-1].finish_reason == "stop"  # EOS, and the held "<EN" came out with it


def test_logprobs_in_events(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()
    events = run(collect(engine, request("a", "say:ok|", greedy(logprobs=2))))
    first = events[0].logprobs
    assert first is not None and len(first) == 1
    entry = first[0]
    assert entry.token_id == ord("o") and entry.token == "o"
    assert entry.logprob <= 0.0
    assert len(entry.top) == 2 and entry.top[0].token_id == ord("o")
    assert entry.top[0].logprob >= entry.top[1].logprob


def test_request_id_can_be_reused_after_completion(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()
    for _ in range(2):
        assert text_of(run(collect(engine, request("same", "say:x|")))) == "x"


def test_run_batch_before_start(make_engine: EngineFactory) -> None:
    engine, _ = make_engine(start=False)
    results = engine.run_batch([request("a", "say:one|"), request("b", "say:two|")])
    assert [text_of(r) for r in results] == ["one", "two"]
    engine.start()
    with pytest.raises(EngineError, match="before start"):
        engine.run_batch([request("c", "say:x|")])


# ------------------------------------------------------------------- continuous batching


def test_requests_join_a_running_batch_at_step_boundaries(make_engine: EngineFactory) -> None:
    engine, runner = make_engine(delay=0.002)

    async def scenario() -> tuple[list[TokenEvent], list[TokenEvent], int]:
        long_events: list[TokenEvent] = []
        joined_at = -1
        joiner: asyncio.Task[list[TokenEvent]] | None = None
        async for event in engine.generate(request("long", FREE_RUN, greedy(max_tokens=60))):
            long_events.append(event)
            if len(long_events) == 10:
                joiner = asyncio.create_task(collect(engine, request("late", "say:joined|")))
            if joiner is not None and joiner.done() and joined_at < 0:
                joined_at = len(long_events)
        assert joiner is not None
        return long_events, await joiner, joined_at

    long_events, late_events, joined_at = run(scenario())
    assert text_of(late_events) == "joined"
    # The late request finished while the long one was still generating.
    assert 0 < joined_at < len(long_events)
    assert 2 in runner.decode_rows() and 1 in runner.decode_rows()
    # Its presence did not change the long request's tokens (logits depend on own history).
    engine_alone, _ = make_engine()
    alone = run(collect(engine_alone, request("long", FREE_RUN, greedy(max_tokens=60))))
    assert token_ids_of(alone) == token_ids_of(long_events)


def test_more_requests_than_slots_all_finish(make_engine: EngineFactory) -> None:
    engine, runner = make_engine(num_slots=3)

    async def scenario() -> list[list[TokenEvent]]:
        return await asyncio.gather(
            *(collect(engine, request(f"r{i}", f"say:answer {i}|")) for i in range(10))
        )

    results = run(scenario())
    assert [text_of(r) for r in results] == [f"answer {i}" for i in range(10)]
    assert max(runner.decode_rows()) == 3
    assert engine.stats().running == 0


def test_eight_concurrent_requests_with_different_params(make_engine: EngineFactory) -> None:
    engine, _ = make_engine(num_slots=8)
    params = [
        greedy(),
        SamplingParams(max_tokens=20, temperature=0.7, seed=1),
        SamplingParams(max_tokens=20, temperature=1.0, top_p=0.8),
        SamplingParams(max_tokens=20, temperature=1.2, top_k=5, seed=3),
        SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.3),
        SamplingParams(max_tokens=20, temperature=0.9, presence_penalty=1.0, frequency_penalty=0.5),
        SamplingParams(max_tokens=20, temperature=0.0, stop=["x"], logprobs=3),
        SamplingParams(max_tokens=5, temperature=0.5, ignore_eos=True, min_tokens=2),
    ]

    async def scenario() -> list[list[TokenEvent]]:
        return await asyncio.gather(
            *(collect(engine, request(f"r{i}", FREE_RUN, p)) for i, p in enumerate(params))
        )

    results = run(scenario())
    for events, p in zip(results, params, strict=True):
        final = events[-1]
        assert final.finish_reason in ("stop", "length"), final
        assert final.usage is not None and 1 <= final.usage.completion_tokens <= p.max_tokens


def test_seeded_output_is_the_same_alone_and_in_a_crowd(make_engine: EngineFactory) -> None:
    # Hot enough that the seed, not the scripted token, decides.
    seeded = SamplingParams(max_tokens=30, temperature=6.0, top_k=100, seed=77)
    engine, _ = make_engine()
    alone = token_ids_of(run(collect(engine, request("s", FREE_RUN, seeded))))

    async def crowd() -> list[list[TokenEvent]]:
        others = [
            collect(engine, request(f"o{i}", f"other {i}: ", SamplingParams(max_tokens=25)))
            for i in range(3)
        ]
        return await asyncio.gather(collect(engine, request("s", FREE_RUN, seeded)), *others)

    crowded = token_ids_of(run(crowd())[0])
    assert crowded == alone
    other_seed = SamplingParams(max_tokens=30, temperature=6.0, top_k=100, seed=78)
    assert token_ids_of(run(collect(engine, request("s", FREE_RUN, other_seed)))) != alone


def test_chunked_prefill_gives_the_same_output(make_engine: EngineFactory) -> None:
    text = "a long prompt " * 6
    prompt = f"say:{text}|"
    chunked, runner = make_engine(chunk=16, max_model_len=256)
    events = run(collect(chunked, request("a", prompt, greedy(max_tokens=100))))
    assert text_of(events) == text
    starts = [c.start for step in runner.steps for c in step if c.num_tokens > 1]
    assert starts == list(range(0, len(ids(prompt)) - 1, 16))


def test_chunked_prefill_lets_running_streams_continue(make_engine: EngineFactory) -> None:
    engine, runner = make_engine(chunk=8, delay=0.001, max_model_len=256)

    async def scenario() -> list[TokenEvent]:
        events: list[TokenEvent] = []
        long_prompt = "say:" + "z" * 80 + "|"
        late: asyncio.Task[list[TokenEvent]] | None = None
        async for event in engine.generate(request("run", FREE_RUN, greedy(max_tokens=40))):
            events.append(event)
            if len(events) == 3:
                late = asyncio.create_task(
                    collect(engine, request("big", long_prompt, greedy(max_tokens=100)))
                )
        assert late is not None
        assert text_of(await late) == "z" * 80
        return events

    run(scenario())
    # While the 85-token prompt went in 8 at a time, the running request kept decoding.
    # Steps of 8 tokens: the running row's decode plus a 7-token prompt chunk.
    shared = [step for step in runner.steps if len(step) == 2 and step[1].num_tokens == 7]
    assert len(shared) >= 9
    assert runner.decode_rows().count(1) > 10


# --------------------------------------------------------------------------- cancellation


def test_cancel_before_any_prefill_leaves_the_runner_alone(make_engine: EngineFactory) -> None:
    # A 60-token prompt uses the whole 8-token budget of each step, so the second request waits
    # in the scheduler's queue for several steps before its first prefill chunk.
    engine, runner = make_engine(chunk=8, delay=0.002)

    async def scenario() -> list[TokenEvent]:
        first = engine.generate(request("first", "say:" + "q" * 55 + "|"))
        await wait_until(lambda: engine.stats().running == 1)
        second = engine.generate(request("second", "say:x|"))
        await wait_until(lambda: engine.stats().waiting == 1 and len(runner.steps) >= 2)
        assert engine.cancel("second")
        events = [e async for e in second]
        await first.aclose()
        return events

    events = run(scenario())
    assert events[-1].finish_reason == "cancelled"
    # Only the first request's prompt was ever computed.
    assert all(len(step) == 1 for step in runner.steps)


def test_cancel_frees_the_slot_at_the_next_step(make_engine: EngineFactory) -> None:
    engine, _ = make_engine(delay=0.003)

    async def scenario() -> list[TokenEvent]:
        events: list[TokenEvent] = []
        async for event in engine.generate(request("c", FREE_RUN, greedy(max_tokens=100))):
            events.append(event)
            if len(events) == 3:
                assert engine.stats().running == 1
                assert engine.cancel("c")
        return events

    events = run(scenario())
    assert events[-1].finish_reason == "cancelled"
    assert len(events) < 10
    stats = engine.stats()
    assert stats.running == 0 and stats.kv_tokens_used == 0
    assert engine.stats().kv_blocks_used == 0
    assert not engine.cancel("c")  # no longer in flight
    assert engine.cancel("unknown") is False


def test_cancelling_twice_before_a_step_frees_the_slot_once(make_engine: EngineFactory) -> None:
    # The gRPC server cancels on both the client's cancel and the stream's end; both can land
    # between two steps.
    engine, _ = make_engine(delay=0.003)

    async def scenario() -> list[TokenEvent]:
        events: list[TokenEvent] = []
        async for event in engine.generate(request("c", FREE_RUN, greedy(max_tokens=100))):
            events.append(event)
            if len(events) == 2:
                assert engine.cancel("c")
                engine.cancel("c")
        return events

    events = run(scenario())
    assert events[-1].finish_reason == "cancelled"
    stats = engine.stats()
    assert stats.running == 0
    engine._blocks.check_invariants()
    assert engine.stats().kv_blocks_used == 0


def test_breaking_out_of_the_stream_cancels_the_request(make_engine: EngineFactory) -> None:
    engine, _ = make_engine(delay=0.003)

    async def scenario() -> None:
        count = 0
        async for _ in engine.generate(request("b", FREE_RUN, greedy(max_tokens=120))):
            count += 1
            if count == 2:
                break
        await wait_until(lambda: engine.stats().running == 0)

    run(scenario())
    assert engine.stats().kv_blocks_used == 0
    assert engine.stats().generated_tokens_total < 60


def test_cancelling_the_consumer_task_cancels_the_request(make_engine: EngineFactory) -> None:
    engine, _ = make_engine(delay=0.003)

    async def scenario() -> None:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate(request("t", FREE_RUN, greedy(max_tokens=120))):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: engine.stats().running == 0)

    run(scenario())
    assert engine.stats().kv_blocks_used == 0


def test_cancelling_a_waiting_request(make_engine: EngineFactory) -> None:
    engine, _ = make_engine(num_slots=1, delay=0.003)

    async def scenario() -> list[TokenEvent]:
        first = engine.generate(request("first", FREE_RUN, greedy(max_tokens=100)))
        await first.__anext__()
        waiting = engine.generate(request("second", "say:never|"))
        assert engine.stats().waiting == 1
        assert engine.cancel("second")
        events = [e async for e in waiting]
        await first.aclose()
        return events

    events = run(scenario())
    assert len(events) == 1 and events[0].finish_reason == "cancelled"
    assert events[0].usage is not None and events[0].usage.completion_tokens == 0
    assert events[0].timings is not None and events[0].timings.ttft_s is None


# ------------------------------------------------------------------- submit-time errors


def test_full_queue_raises_overloaded(make_engine: EngineFactory) -> None:
    engine, _ = make_engine(num_slots=1, max_queue=1, delay=0.005)

    async def scenario() -> str:
        running = engine.generate(request("a", FREE_RUN, greedy(max_tokens=100)))
        await running.__anext__()  # admitted: the only slot is taken
        queued = engine.generate(request("b", "say:queued|"))
        with pytest.raises(EngineOverloaded) as info:
            engine.generate(request("c", "say:rejected|"))
        assert info.value.max_queue == 1 and info.value.waiting == 1
        await running.aclose()
        return text_of([e async for e in queued])  # the queue drains once the slot frees

    assert run(scenario()) == "queued"


def test_context_overflow_is_refused_not_truncated(make_engine: EngineFactory) -> None:
    engine, _ = make_engine(max_model_len=64)

    async def scenario() -> list[TokenEvent]:
        prompt = "p" * 60
        with pytest.raises(ContextLengthExceeded) as info:
            engine.generate(request("a", prompt, greedy(max_tokens=5)))
        err = info.value
        assert (err.prompt_tokens, err.max_tokens, err.context_length) == (60, 5, 64)
        assert "64" in str(err) and err.field == "max_tokens"
        with pytest.raises(ContextLengthExceeded) as info:
            engine.generate(request("b", "p" * 64, greedy(max_tokens=None)))
        assert info.value.field == "prompt"
        # max_tokens=None fills the context exactly.
        return await collect(engine, request("c", FREE_RUN + "p" * 50, greedy(max_tokens=None)))

    events = run(scenario())
    assert len(token_ids_of(events)) == 64 - len(FREE_RUN) - 50
    assert events[-1].finish_reason == "length"


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (GenerationRequest("", ids("x")), "request_id"),
        (GenerationRequest("a", []), "prompt_token_ids"),
        (GenerationRequest("a", [VOCAB_SIZE]), "prompt_token_ids"),
        (GenerationRequest("a", [-1]), "prompt_token_ids"),
        (GenerationRequest("a", ["x"]), "prompt_token_ids"),  # type: ignore[list-item]
        (GenerationRequest("a", ids("x"), SamplingParams(top_p=0.0)), "top_p"),
        (GenerationRequest("a", ids("x"), SamplingParams(temperature=-1.0)), "temperature"),
        (GenerationRequest("a", ids("x"), SamplingParams(stop_token_ids=[999])), "stop_token_ids"),
    ],
)
def test_bad_requests_raise_invalid_parameter(
    make_engine: EngineFactory, req: GenerationRequest, field: str
) -> None:
    engine, _ = make_engine()

    async def submit() -> None:
        engine.generate(req)

    with pytest.raises(InvalidParameter) as info:
        run(submit())
    assert info.value.field == field
    assert engine.stats().waiting == 0


def test_duplicate_request_id_in_flight(make_engine: EngineFactory) -> None:
    engine, _ = make_engine(delay=0.003)

    async def scenario() -> None:
        stream = engine.generate(request("dup", FREE_RUN, greedy(max_tokens=50)))
        with pytest.raises(InvalidParameter) as info:
            engine.generate(request("dup", FREE_RUN))
        assert info.value.field == "request_id"
        await stream.aclose()

    run(scenario())


def test_engine_stopped_before_start_and_after_shutdown(make_engine: EngineFactory) -> None:
    engine, _ = make_engine(start=False)

    async def submit() -> None:
        engine.generate(request("a", "say:x|"))

    with pytest.raises(EngineStopped, match="start"):
        run(submit())
    engine.start()
    run(submit())
    assert engine.shutdown(timeout=5.0)
    with pytest.raises(EngineStopped):
        run(submit())
    with pytest.raises(EngineStopped):
        engine.start()


# ---------------------------------------------------------------------- errors in a step


def test_decode_error_fails_only_the_sequence_at_fault(make_engine: EngineFactory) -> None:
    engine, runner = make_engine(delay=0.001)

    async def scenario() -> tuple[list[TokenEvent], list[TokenEvent]]:
        good = asyncio.create_task(collect(engine, request("good", "say:fine, thanks|")))
        await asyncio.sleep(0.005)
        bad = await collect(engine, request("bad", "say:ka-boom!|"))
        return bad, await good

    bad, good = run(scenario())
    assert bad[-1].finish_reason == "error"
    assert bad[-1].error is not None and "scripted step failure" in bad[-1].error
    assert text_of(good) == "fine, thanks" and good[-1].finish_reason == "stop"
    assert 2 in runner.attempts  # they did share a batch, which failed as a whole
    assert engine.stats().kv_blocks_used == 0 and engine.stats().running == 0
    assert text_of(run(collect(engine, request("later", "say:still here|")))) == "still here"


def test_nan_logits_fail_only_that_request(make_engine: EngineFactory) -> None:
    engine, _ = make_engine(delay=0.001)

    async def scenario() -> tuple[list[TokenEvent], list[TokenEvent]]:
        good = asyncio.create_task(collect(engine, request("good", "say:fine and well|")))
        await asyncio.sleep(0.01)
        bad = await collect(engine, request("bad", "say:x nan! y|"))
        return bad, await good

    bad, good = run(scenario())
    assert bad[-1].finish_reason == "error" and "non-finite" in (bad[-1].error or "")
    assert text_of(good) == "fine and well" and good[-1].finish_reason == "stop"


def test_prefill_error_fails_only_that_request(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()

    async def scenario() -> list[list[TokenEvent]]:
        return await asyncio.gather(
            collect(engine, request("bad", "fail-prefill")),
            collect(engine, request("good", "say:ok|")),
        )

    bad, good = run(scenario())
    assert bad[-1].finish_reason == "error" and "model step failed" in (bad[-1].error or "")
    assert text_of(good) == "ok"
    assert engine.stats().kv_blocks_used == 0


# ------------------------------------------------------------------------ lifecycle


def test_shutdown_ends_running_streams_as_cancelled(make_engine: EngineFactory) -> None:
    engine, _ = make_engine(num_slots=1, delay=0.003)

    async def scenario() -> tuple[list[TokenEvent], list[TokenEvent]]:
        running = engine.generate(request("r", FREE_RUN, greedy(max_tokens=400)))
        first = [await running.__anext__()]
        waiting = engine.generate(request("w", "say:x|"))
        assert await asyncio.to_thread(engine.shutdown, 5.0)
        return first + [e async for e in running], [e async for e in waiting]

    running_events, waiting_events = run(scenario())
    assert running_events[-1].finish_reason == "cancelled"
    assert waiting_events[-1].finish_reason == "cancelled"
    assert engine.stats().kv_blocks_used == 0


def test_idle_engine_does_not_spin(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()
    run(collect(engine, request("a", "say:x|")))
    before = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - before < 0.1


def test_model_info_and_chat_template(make_engine: EngineFactory) -> None:
    engine, _ = make_engine()
    info = engine.model_info
    assert info.vocab_size == VOCAB_SIZE and info.context_length == 512
    assert info.eos_token_ids == (EOS_ID,)
    prompt = engine.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == ids("user: hi\nassistant: ")
    for bad in ([], "hello", [{"content": "no role"}], ["not a dict"]):
        with pytest.raises(InvalidParameter) as info_err:
            engine.apply_chat_template(bad)  # type: ignore[arg-type]
        assert info_err.value.field == "messages"
    assert engine.encode("héllo", add_special_tokens=False) == ids("héllo")


# ------------------------------------------------------------------ paging and prefix cache


def _outputs(engine: Engine, reqs: list[GenerationRequest]) -> list[list[int]]:
    async def scenario() -> list[list[TokenEvent]]:
        return await asyncio.gather(*(collect(engine, r) for r in reqs))

    results = run(scenario())
    assert all(events[-1].finish_reason == "length" for events in results)
    return [token_ids_of(events) for events in results]


def test_preempted_streams_match_unpreempted(make_engine: EngineFactory) -> None:
    # Four requests of 12 + 60 tokens need 5 blocks each; a pool of 10 blocks holds two, so the
    # newest running sequences are preempted and recomputed from their tokens.
    reqs = [request(f"r{i}", f"free-run {i:02d}: ", greedy(max_tokens=60)) for i in range(4)]
    roomy, _ = make_engine(num_slots=4, num_blocks=64)
    expected = _outputs(roomy, reqs)
    tight, runner = make_engine(num_slots=4, num_blocks=10)
    assert _outputs(tight, reqs) == expected
    stats = tight.stats()
    assert stats.preemptions_total > 0
    assert stats.kv_blocks_used == 0 and stats.running == 0
    assert max(sum(c.num_tokens for c in step) for step in runner.steps) <= 4096


def test_preemption_without_prefix_caching(make_engine: EngineFactory) -> None:
    reqs = [request(f"r{i}", f"free-run {i:02d}: ", greedy(max_tokens=40)) for i in range(3)]
    roomy, _ = make_engine(num_slots=3, num_blocks=64, prefix_caching=False)
    tight, _ = make_engine(num_slots=3, num_blocks=6, prefix_caching=False)
    assert _outputs(tight, reqs) == _outputs(roomy, reqs)
    assert tight.stats().preemptions_total > 0
    assert tight.stats().prefix_hit_tokens_total == 0


def test_request_that_can_never_fit_the_pool_is_refused(make_engine: EngineFactory) -> None:
    engine, runner = make_engine(num_blocks=4)  # 64 tokens of KV, a 512-token context
    prompt = ids(FREE_RUN)  # 10 tokens

    async def submit(max_tokens: int | None) -> list[TokenEvent]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        return await collect(engine, GenerationRequest("big", prompt, params))

    with pytest.raises(KVCacheTooSmall) as refused:
        run(submit(56))
    assert (refused.value.needed_tokens, refused.value.capacity_tokens) == (65, 64)
    assert refused.value.field == "max_tokens"
    assert "65" in str(refused.value) and "64" in str(refused.value)
    assert runner.steps == []
    exact = run(submit(55))  # 10 + 55 - 1 = 64 KV rows: exactly the pool
    assert len(token_ids_of(exact)) == 55
    unbounded = run(submit(None))  # defaults to what the pool holds
    assert exact[-1].finish_reason == unbounded[-1].finish_reason == "length"
    assert token_ids_of(unbounded) == token_ids_of(exact)


def test_shared_prefix_is_computed_once(make_engine: EngineFactory) -> None:
    system = "system: " + "be brief. " * 5  # 58 tokens: three full blocks
    first, second = request("a", system + "say:one|"), request("b", system + "say:two|")
    engine, runner = make_engine()
    assert text_of(run(collect(engine, first))) == "one"
    steps_before = len(runner.steps)
    assert text_of(run(collect(engine, second))) == "two"
    stats = engine.stats()
    assert stats.prefix_hit_tokens_total == 48
    assert stats.prefix_query_tokens_total == len(first.prompt_token_ids) * 2
    # The second prompt's first chunk starts after the cached blocks.
    assert runner.steps[steps_before][0].start == 48

    uncached, plain = make_engine(prefix_caching=False)
    run(collect(uncached, first))
    steps_before = len(plain.steps)
    assert text_of(run(collect(uncached, second))) == "two"
    assert uncached.stats().prefix_hit_tokens_total == 0
    assert plain.steps[steps_before][0].start == 0


def test_identical_prompt_reuses_all_but_its_last_token(make_engine: EngineFactory) -> None:
    prompt = "say:" + "r" * 27 + "|"  # 32 tokens: two full blocks
    engine, runner = make_engine()
    once = token_ids_of(run(collect(engine, request("a", prompt))))
    steps_before = len(runner.steps)
    again = token_ids_of(run(collect(engine, request("b", prompt))))
    assert again == once
    # The block ending at the last prompt token is not reused: its token must give logits.
    assert runner.steps[steps_before][0].start == 16
    assert engine.stats().prefix_hit_tokens_total == 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_samples_on_cuda_logits() -> None:
    runner = ScriptedRunner(ScriptedSpec(max_model_len=512, num_blocks=128), device="cuda")
    engine = Engine(runner, TOKENIZER, EngineConfig(max_num_seqs=4, warmup=True))
    engine.warmup()
    engine.start()
    try:
        seeded = SamplingParams(max_tokens=30, temperature=6.0, top_k=100, seed=5, logprobs=2)

        async def scenario() -> list[list[TokenEvent]]:
            return await asyncio.gather(
                collect(engine, request("greedy", "say:on the GPU 😀|")),
                collect(engine, request("seeded", FREE_RUN, seeded)),
                collect(engine, request("other", "other: ", SamplingParams(max_tokens=20))),
            )

        greedy_events, seeded_events, _ = run(scenario())
        assert text_of(greedy_events) == "on the GPU 😀"
        alone = run(collect(engine, request("seeded", FREE_RUN, seeded)))
        assert token_ids_of(alone) == token_ids_of(seeded_events)
        assert seeded_events[0].logprobs is not None
    finally:
        assert engine.shutdown(timeout=5.0)
