"""Guided decoding (gateway/engine/grammar.py): the bitmask, the compile cache and its errors, and
the engine over the ScriptedRunner test double with a byte-level tokenizer (one token per byte),
so that every constraint is checked character by character and fast. The real model behind the
gRPC server and the REST shim is tested in test_openai_structured.py."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import torch
from fixtures_engine import EOS_ID, VOCAB_SIZE, ScriptedRunner, ScriptedSpec, byte_tokenizer, ids

from gateway.engine import Engine, EngineConfig, GenerationRequest, InvalidParameter, TokenEvent
from gateway.engine.grammar import GrammarCompiler, apply_token_bitmask, bitmask_words
from gateway.engine.params import GuidedDecoding, SamplingParams

xgrammar = pytest.importorskip("xgrammar")

TOKENIZER = byte_tokenizer()
FREE_RUN = "free-run: "  # the double emits pseudo-random bytes for it, never EOS
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "bb"]}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["zip"],
        },
    },
    "required": ["name", "age", "tags", "home"],
}


def guided(kind: str, spec: Any = "") -> GuidedDecoding:
    return GuidedDecoding(kind, spec if isinstance(spec, str) else json.dumps(spec))


def params(g: GuidedDecoding | None, max_tokens: int = 200, **kwargs: Any) -> SamplingParams:
    kwargs.setdefault("temperature", 0.0)
    return SamplingParams(max_tokens=max_tokens, guided=g, **kwargs)


async def collect(engine: Engine, request: GenerationRequest) -> list[TokenEvent]:
    return [event async for event in engine.generate(request)]


def text_of(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)


@pytest.fixture
def make_engine() -> Iterator[Any]:
    engines: list[tuple[Engine, ScriptedRunner]] = []

    def factory(num_slots: int = 4, num_blocks: int = 128, delay: float = 0.0) -> Engine:
        runner = ScriptedRunner(ScriptedSpec(max_model_len=512, num_blocks=num_blocks), delay)
        config = EngineConfig(max_num_seqs=num_slots, max_num_batched_tokens=4096, warmup=False)
        engine = Engine(runner, TOKENIZER, config)
        engine.start()
        engines.append((engine, runner))
        return engine

    yield factory
    for engine, runner in engines:
        assert engine.shutdown(timeout=5.0)
        assert runner.violations == []
        engine._blocks.check_invariants()


def generate(engine: Engine, *requests: GenerationRequest) -> list[list[TokenEvent]]:
    async def scenario() -> list[list[TokenEvent]]:
        for request in requests:
            if request.params.guided is not None:
                await engine.prepare_guided(request.params.guided)
        return list(await asyncio.gather(*(collect(engine, r) for r in requests)))

    return asyncio.run(scenario())


# ------------------------------------------------------------------------------ bitmask


@pytest.mark.parametrize("vocab", [32, 260, 49152])
def test_bitmask_matches_xgrammars_own_apply(vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    words = bitmask_words(vocab)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), dtype=torch.int32, generator=generator)
    logits = torch.randn(3, vocab, generator=generator)
    ours, theirs = logits.clone(), logits.clone()
    apply_token_bitmask(ours, bitmask)
    xgrammar.apply_token_bitmask_inplace(theirs, bitmask, vocab_size=vocab)
    assert torch.equal(ours, theirs)
    # Bit j of word w is token 32 w + j.
    one = torch.zeros(1, words, dtype=torch.int32)
    one[0, 0] = 1 << 5
    row = torch.zeros(1, vocab)
    apply_token_bitmask(row, one)
    assert torch.isfinite(row[0]).nonzero().flatten().tolist() == [5]


# ------------------------------------------------------------------------------ compiler


def _compiler() -> GrammarCompiler:
    info = xgrammar.TokenizerInfo.from_huggingface(TOKENIZER, vocab_size=VOCAB_SIZE)
    return GrammarCompiler(lambda: info, max_entries=2)


def test_keyword_names_used_as_property_names_or_data_are_fine() -> None:
    compiler = _compiler()
    schema = {
        "type": "object",
        "properties": {"not": {"type": "integer"}, "if": {"enum": [{"not": 1}]}},
        "required": ["not"],
    }
    assert compiler.compile(guided("json_schema", schema)).result(timeout=30) is not None
    compiler.shutdown()


def test_compiles_every_kind_and_caches_per_spec() -> None:
    compiler = _compiler()
    specs = [
        guided("json_schema", PERSON),
        guided("json_object"),
        guided("regex", "[0-9]{3}"),
        guided("grammar", 'start: "yes" | "no"'),
    ]
    futures = [compiler.compile(spec) for spec in specs]
    assert all(future.result(timeout=30).compiled is not None for future in futures)
    again = guided("grammar", 'start: "yes" | "no"')
    assert compiler.compile(again) is futures[3]  # the same future: compiled once
    # Only JSON grammars carry the control-character filter.
    assert [f.result().token_filter is not None for f in futures] == [True, True, False, False]
    # An LRU of two entries: the oldest specs were dropped and compile again.
    assert len(compiler._cache) == 2
    assert compiler.compile(specs[0]) is not futures[0]
    compiler.shutdown()


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (guided("json_schema", "{not json"), "not valid JSON"),
        (guided("json_schema", {"type": "florp"}), 'Unsupported type "florp"'),
        (guided("json_schema", [1, 2]), "should be an object or bool"),
        (guided("json_schema", {"$ref": "#/$defs/missing"}), "$defs"),
        (guided("json_schema", {"type": "integer", "minimum": 5, "maximum": 1}), "minimum"),
        (guided("json_schema", {"properties": {"a": {"not": {}}}}), "'not' (at #/properties/a)"),
        (guided("json_schema", {"type": "string", "format": "regex"}), "format 'regex'"),
        (guided("json_schema", {"allOf": [{"type": "integer"}, {"minimum": 3}]}), "allOf"),
        (guided("json_schema", {"items": [{"uniqueItems": True}]}), "#/items/0"),
        (guided("json_schema", {"$defs": {"d": {"if": {}}}}), "'if' (at #/$defs/d)"),
        (guided("regex", "a(b"), "parenthesis"),
        (guided("grammar", "start: undefined_rule"), "unknown name"),
    ],
)
def test_bad_specs_are_invalid_parameter_with_a_clean_reason(
    spec: GuidedDecoding, reason: str
) -> None:
    compiler = _compiler()
    with pytest.raises(InvalidParameter) as info:
        compiler.compile(spec).result(timeout=30)
    assert info.value.field == "guided"
    assert reason in info.value.message
    assert ".cc:" not in info.value.message and "\n" not in info.value.message
    compiler.shutdown()


# ------------------------------------------------------------------------------ engine


def test_json_schema_output_validates(make_engine: Any) -> None:
    engine = make_engine()
    request = GenerationRequest("j", ids(FREE_RUN), params(guided("json_schema", PERSON)))
    (events,) = generate(engine, request)
    assert events[-1].finish_reason == "stop", text_of(events)
    jsonschema.validate(json.loads(text_of(events)), PERSON)
    assert events[-1].token_ids == [EOS_ID]  # EOS came only once the object was complete


def test_regex_and_grammar_and_json_object(make_engine: Any) -> None:
    engine = make_engine()
    requests = [
        GenerationRequest("r", ids(FREE_RUN), params(guided("regex", "[a-c]{2,5}-[0-9]{3}"))),
        GenerationRequest("g", ids(FREE_RUN), params(guided("grammar", 'start: "yes" | "no"'))),
        GenerationRequest("o", ids(FREE_RUN), params(guided("json_object"))),
    ]
    regex, lark, obj = generate(engine, *requests)
    assert re.fullmatch("[a-c]{2,5}-[0-9]{3}", text_of(regex))
    assert text_of(lark) in ("yes", "no")
    assert isinstance(json.loads(text_of(obj)), dict)
    assert all(events[-1].finish_reason == "stop" for events in (regex, lark, obj))


def test_sampled_constrained_output_is_valid_and_seeded(make_engine: Any) -> None:
    engine = make_engine()
    g = guided("json_schema", PERSON)
    requests = [
        GenerationRequest(f"s{i}", ids(FREE_RUN), params(g, temperature=1.0, seed=7))
        for i in range(2)
    ]
    first, second = generate(engine, *requests)
    jsonschema.validate(json.loads(text_of(first)), PERSON)
    assert text_of(first) == text_of(second)


def test_constrained_rows_share_a_batch_with_unconstrained_ones(make_engine: Any) -> None:
    engine = make_engine()
    plain = [
        GenerationRequest(f"p{i}", ids(f"free-run {i}: "), params(None, max_tokens=40))
        for i in range(2)
    ]
    alone = generate(engine, *plain)
    mixed = generate(
        engine,
        GenerationRequest("c", ids(FREE_RUN), params(guided("regex", "[0-9]{30}"))),
        *[GenerationRequest(f"q{i}", r.prompt_token_ids, r.params) for i, r in enumerate(plain)],
    )
    assert re.fullmatch("[0-9]{30}", text_of(mixed[0]))
    assert [text_of(e) for e in mixed[1:]] == [text_of(e) for e in alone]
    runner_steps = engine.runner.steps  # type: ignore[attr-defined]
    assert any(sum(1 for c in step if c.sample) == 3 for step in runner_steps)


def test_ignore_eos_ends_when_the_grammar_does(make_engine: Any) -> None:
    engine = make_engine()
    p = params(guided("regex", "[0-9]{4}"), ignore_eos=True)
    (events,) = generate(engine, GenerationRequest("i", ids(FREE_RUN), p))
    assert text_of(events) == text_of(events)[:4] and re.fullmatch("[0-9]{4}", text_of(events))
    assert events[-1].finish_reason == "stop" and events[-1].usage.completion_tokens == 4


def test_max_tokens_cuts_a_constrained_output(make_engine: Any) -> None:
    engine = make_engine()
    p = params(guided("regex", "[0-9]{50}"), max_tokens=5)
    (events,) = generate(engine, GenerationRequest("m", ids(FREE_RUN), p))
    assert events[-1].finish_reason == "length" and re.fullmatch("[0-9]{5}", text_of(events))


def test_preempted_constrained_streams_match_unpreempted(make_engine: Any) -> None:
    def requests() -> list[GenerationRequest]:
        return [
            GenerationRequest(
                f"r{i}",
                ids(f"free-run {i:02d}: "),
                params(guided("regex", "[a-z]{60}"), max_tokens=61),
            )
            for i in range(4)
        ]

    roomy = make_engine(num_blocks=64)
    expected = [text_of(e) for e in generate(roomy, *requests())]
    tight = make_engine(num_blocks=10)
    assert [text_of(e) for e in generate(tight, *requests())] == expected
    assert tight.stats().preemptions_total > 0
    assert all(re.fullmatch("[a-z]{60}", t) for t in expected)


def test_bad_spec_is_refused_at_submission(make_engine: Any) -> None:
    engine = make_engine()
    bad = params(guided("json_schema", {"type": "florp"}))

    async def scenario() -> list[TokenEvent]:
        with pytest.raises(InvalidParameter) as info:
            await engine.prepare_guided(bad.guided)  # type: ignore[arg-type]
        assert info.value.field == "guided"
        # Known bad now (the failure is cached): generate refuses at once.
        with pytest.raises(InvalidParameter):
            engine.generate(GenerationRequest("b", ids(FREE_RUN), bad))
        # Never prepared: refused at once if its compile is already done, else the stream
        # ends with an error once it is.
        other = params(guided("regex", "[z-a]"))
        try:
            return await collect(engine, GenerationRequest("c", ids(FREE_RUN), other))
        except InvalidParameter as exc:
            return [TokenEvent("c", "", [], None, "error", f"guided: {exc.message}")]

    events = asyncio.run(scenario())
    assert events[-1].finish_reason == "error"
    assert "guided: regex:" in (events[-1].error or ""), events[-1].error
    assert engine.stats().running == 0 and engine.stats().waiting == 0


def test_a_slow_compile_stalls_nobody_and_can_be_cancelled(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    original = GrammarCompiler._compile

    def slow(self: GrammarCompiler, g: GuidedDecoding) -> Any:
        if "slow" in g.spec:
            assert release.wait(30)
        return original(self, g)

    monkeypatch.setattr(GrammarCompiler, "_compile", slow)
    engine = make_engine()

    async def scenario() -> tuple[list[TokenEvent], list[TokenEvent], list[TokenEvent]]:
        slow_a = asyncio.ensure_future(
            collect(engine, GenerationRequest("a", ids(FREE_RUN), params(guided("regex", "slow"))))
        )
        slow_b = engine.generate(
            GenerationRequest("b", ids(FREE_RUN), params(guided("regex", "slow|x")))
        )
        plain = await collect(
            engine, GenerationRequest("p", ids("say:hi|"), params(None, max_tokens=8))
        )
        assert not slow_a.done()  # still compiling; the plain request did not wait for it
        assert engine.stats().waiting == 2
        assert engine.cancel("b")
        release.set()
        cancelled = [event async for event in slow_b]
        return await slow_a, plain, cancelled

    done, plain, cancelled = asyncio.run(scenario())
    assert text_of(plain) == "hi"
    assert text_of(done) == "slow" and done[-1].finish_reason == "stop"
    assert cancelled[-1].finish_reason == "cancelled"
    assert engine.stats().waiting == 0
