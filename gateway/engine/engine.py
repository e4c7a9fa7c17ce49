"""The engine: a loop thread that owns the runner; continuous batching over a paged KV cache.

Each step: take new requests and cancellations, ask the `Scheduler` (gateway/engine/scheduler.py)
which tokens to compute within the step's token budget (decode rows of the running sequences
first, then prompt chunks of waiting ones, reusing cached prefix blocks), run them all in one
`runner.execute` forward, sample the sequences whose last token was computed, then detokenize.
The step's events are published once the next step is launched (at once when nothing keeps
running). Requests join and leave the batch at every step; a finished or cancelled request gives
its blocks back at once. When blocks run out, the scheduler preempts the
newest running sequences, which are recomputed later from their tokens.

Threads: asyncio code calls `generate`, `cancel` and `stats`, which only take a short lock; the loop
thread blocks on a condition variable when there is nothing to do.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from gateway.engine.block_manager import BlockManager
from gateway.engine.detokenizer import make_decoders
from gateway.engine.errors import (
    ContextLengthExceeded,
    EngineError,
    EngineOverloaded,
    EngineStopped,
    InvalidParameter,
    KVCacheTooSmall,
)
from gateway.engine.grammar import (
    GrammarCompiler,
    GuidedState,
    MaskFiller,
    TokenMask,
    tokenizer_info,
)
from gateway.engine.params import GuidedDecoding, SamplingParams
from gateway.engine.runner import Runner, RunnerFactory, RunnerOptions
from gateway.engine.sampler import RowLogprobs, Sampler, SampleResult
from gateway.engine.scheduler import ScheduledChunk, ScheduledSequence, Scheduler, StepPlan
from gateway.engine.sequence import SequenceState
from gateway.engine.step_timing import StepClock, StepTimings
from gateway.engine.stream import AsyncSink, ListSink, RequestStream, Sink, publish
from gateway.engine.tool_format import detect_tool_call_format
from gateway.engine.types import (
    EngineStats,
    GenerationRequest,
    ModelInfo,
    TokenEvent,
    TokenLogprob,
    TopLogprob,
)
from gateway.model.step_batch import SeqChunk
from quantize.errors import UserInputError

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

_NEW, _RUNNING, _STOPPING, _STOPPED = "new", "running", "stopping", "stopped"
# Tokens per step when --max-num-batched-tokens is not given: enough to keep a GPU's matmuls
# compute-bound during prefill; on CPU a smaller step keeps decoding streams responsive.
DEFAULT_BATCHED_TOKENS = {"cuda": 2048, "cpu": 512}
DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"  # "auto" (cuda when available), "cuda", "cuda:N" or "cpu"
    max_num_seqs: int = 64  # most sequences in the running batch
    max_queue: int = 256  # requests allowed to wait for a place; past it, EngineOverloaded
    max_model_len: int | None = None  # None: the model's own context length
    kernel: str = "auto"
    # Tokens computed per step across requests (prompt chunks plus decode rows); a longer prompt
    # is prefilled in chunks so the running streams get a token between chunks. None: by device.
    max_num_batched_tokens: int | None = None
    kv_cache_bytes: int | None = None  # None: a share of the device memory left after weights
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_cache_dtype: str = "auto"  # "auto" (the compute dtype), "fp16" or "fp8" (e4m3 + scales)
    prefix_caching: bool = True
    warmup: bool = True
    verify_checksums: bool = True  # check the checkpoint's recorded tensor checksums at load
    # False: special-token text in prompts and chat messages ("<|im_end|>") is tokenized as
    # plain text, so a client cannot forge control tokens; True trusts clients' text.
    allow_special_tokens: bool = False

    def validate(self) -> None:
        positive = {
            "max_num_seqs": self.max_num_seqs,
            "block_size": self.block_size,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "kv_cache_bytes": self.kv_cache_bytes,
        }
        for name, value in positive.items():
            if value is None and name in ("max_num_batched_tokens", "kv_cache_bytes"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidParameter(name, f"must be an integer >= 1, got {value!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise InvalidParameter("max_queue", f"must be >= 0, got {self.max_queue!r}")
        if self.max_model_len is not None and (
            not isinstance(self.max_model_len, int) or self.max_model_len < 2
        ):
            raise InvalidParameter("max_model_len", f"must be >= 2, got {self.max_model_len!r}")


@dataclass(eq=False)
class _Entry:
    seq: SequenceState
    sched: ScheduledSequence  # key, token ids (prompt + sampled) and KV progress
    sink: Sink
    place: int | None = None  # the sampler's row of per-request state, while admitted
    grammar: Future[Any] | None = None  # guided decoding: the compiled grammar, maybe pending
    guided: GuidedState | None = None  # its matcher, from admission on (loop thread only)

    @property
    def key(self) -> int:
        return self.sched.key


@dataclass
class _Counters:
    running: int = 0
    waiting: int = 0
    blocks_used: int = 0
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0
    steps_total: int = 0
    step_tokens_total: int = 0


@dataclass
class _StepWork:
    outbox: list[tuple[Sink, TokenEvent]] = field(default_factory=list)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    computed_tokens: int = 0


class Engine:
    """Continuous-batching generation over a `Runner`. See docs/ARCHITECTURE.md, contract 3."""

    def __init__(
        self,
        runner: Runner,
        tokenizer: Any,
        config: EngineConfig | None = None,
        *,
        model_name: str | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.config.validate()
        self.runner = runner
        self.tokenizer = tokenizer
        spec = runner.spec
        self._vocab_size = int(spec.vocab_size)
        self._context_length = int(spec.max_model_len)
        eos = {int(t) for t in (spec.eos_token_ids or ())}
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        self._eos_token_ids = frozenset(eos)
        self.model_info = ModelInfo(
            name=model_name or str(getattr(spec, "name", "model")),
            context_length=self._context_length,
            vocab_size=self._vocab_size,
            quantization=_as_dict(getattr(spec, "quantization", None)),
            eos_token_ids=tuple(sorted(self._eos_token_ids)),
            bos_token_id=getattr(spec, "bos", None),
            tool_call_format=detect_tool_call_format(getattr(tokenizer, "chat_template", None)),
        )
        runner_device = torch.device(getattr(runner, "device", None) or "cpu")
        self._blocks = BlockManager(
            int(spec.num_blocks), int(spec.block_size), prefix_caching=self.config.prefix_caching
        )
        self._capacity_tokens = self._blocks.num_blocks * self._blocks.block_size
        if self._capacity_tokens < self._context_length:
            logger.warning(
                "the KV cache holds %d tokens, fewer than the context length %d: longer "
                "requests are refused (raise --kv-cache-memory to serve them)",
                self._capacity_tokens,
                self._context_length,
            )
        budget = self.config.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS.get(
            runner_device.type, DEFAULT_BATCHED_TOKENS["cpu"]
        )
        self._max_num_seqs = self.config.max_num_seqs
        self._scheduler = Scheduler(
            self._blocks, max_num_seqs=self._max_num_seqs, max_num_batched_tokens=budget
        )
        # The loop thread decodes with its own tokenizer copy (the Rust tokenizer is not safe to
        # share with a thread that encodes).
        self._decode_text, self._decode_piece = make_decoders(tokenizer)
        self._piece_cache: dict[int, str] = {}
        self._sampler = Sampler(self._max_num_seqs, self._vocab_size, self._eos_token_ids)
        self._free_places = list(range(self._max_num_seqs - 1, -1, -1))  # loop thread only

        self._cond = threading.Condition()
        self._state = _NEW
        self._stop_reason = "engine not started: call start()"
        self._inbox: list[_Entry] = []  # submitted, not yet handed to the scheduler
        self._num_unadmitted = 0  # inbox plus the scheduler's never-admitted waiting sequences
        self._active: dict[str, _Entry] = {}  # request_id -> entry, waiting or running
        self._by_key: dict[int, _Entry] = {}
        self._keys = itertools.count()
        # Reentrant-safe, so RequestStream.__del__ can cancel from any thread or finalizer.
        self._cancel_queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._counters = _Counters()
        self._clock = StepClock(runner_device)  # loop thread only; stats() copies its totals
        # Loop thread only: the last step's events, published once the next step is on the GPU.
        self._held: list[tuple[Sink, TokenEvent]] = []
        # GPTQGW_DEFER_DELIVERY=0 publishes at once (the order before; for A/B measurements).
        self._hold_events = os.environ.get("GPTQGW_DEFER_DELIVERY", "1") != "0"
        self._thread: threading.Thread | None = None
        # Tokenizing and chat templating run here, off the callers' event loop (a 4 MB prompt
        # takes seconds). One thread: the transformers tokenizer flips shared backend state
        # (split_special_tokens) per call, so its calls must not overlap.
        self._text_executor = ThreadPoolExecutor(1, thread_name_prefix="gateway-tokenizer")
        # Guided decoding: grammars compile on their own threads; a request waits in
        # _compiling (not in the inbox) until its grammar is ready, so nobody else waits.
        self._grammars = GrammarCompiler(self._grammar_tokenizer_info)
        self._masks = MaskFiller(self._max_num_seqs, self._vocab_size)
        self._compiling: set[_Entry] = set()  # guarded by self._cond

    # ----------------------------------------------------------------------------- building

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        config: EngineConfig | None = None,
        *,
        runner_factory: RunnerFactory | None = None,
    ) -> Engine:
        """Load a checkpoint (ours, AutoGPTQ/GPTQModel, or FP16) through `runner_factory` (default:
        gateway.model's), and its tokenizer; warm up."""
        from transformers import AutoTokenizer

        config = config or EngineConfig()
        config.validate()
        if runner_factory is None:
            from gateway.model import load_runner as runner_factory
        options = RunnerOptions(
            device=resolve_device(config.device),
            max_model_len=config.max_model_len,
            kernel=config.kernel,
            kv_cache_bytes=config.kv_cache_bytes,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            kv_cache_dtype=config.kv_cache_dtype,
            verify_checksums=config.verify_checksums,
        )
        runner = runner_factory(path, options)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise UserInputError(f"cannot load a tokenizer from {path}: {exc}") from exc
        engine = cls(runner, tokenizer, config, model_name=_model_name(path, runner))
        if config.warmup:
            engine.warmup()
        return engine

    def warmup(self) -> None:
        """Run two short requests (greedy, and sampled with every option) through every stage."""
        prompt = self.encode("Warm-up: the quick brown fox") or [0]
        prompt = [t for t in prompt if 0 <= t < self._vocab_size] or [0]
        greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        sampled = SamplingParams(
            max_tokens=4,
            temperature=0.8,
            top_p=0.9,
            top_k=40,
            seed=0,
            repetition_penalty=1.1,
            presence_penalty=0.1,
            frequency_penalty=0.1,
            stop=("\n\n\n",),
            logprobs=2,
            ignore_eos=True,
        )
        results = self.run_batch(
            [
                GenerationRequest("__warmup_greedy__", prompt, greedy),
                GenerationRequest("__warmup_sampled__", prompt, sampled),
            ]
        )
        for events in results:
            if events and events[-1].finish_reason == "error":
                raise EngineError(f"warm-up failed: {events[-1].error}")
        self._reset_counters()
        # In the background: the grammar library's import and vocabulary (about a second) are
        # paid now rather than by the first guided request.
        self._grammars.compile(GuidedDecoding("json_object"))

    # ------------------------------------------------------------------------ text helpers

    def encode(
        self,
        text: str,
        *,
        add_special_tokens: bool = True,
        split_special_tokens: bool | None = None,
    ) -> list[int]:
        """Token ids of `text`. `split_special_tokens` (default: not config.allow_special_tokens)
        tokenizes special-token strings in `text` as plain text."""
        if not isinstance(text, str):
            raise InvalidParameter("prompt", f"must be a string, got {type(text).__name__}")
        split = self._split_special(split_special_tokens)
        backend = _rust_backend(self.tokenizer)
        if backend is not None:
            # Straight to Rust: encode_batch releases the GIL while it works (encode does not),
            # and skips transformers' per-token Python lists (attention mask, ...).
            if backend.encode_special_tokens != split:
                backend.encode_special_tokens = split
            return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return list(
            self.tokenizer.encode(
                text, add_special_tokens=add_special_tokens, split_special_tokens=split
            )
        )

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        for token_id in token_ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise InvalidParameter("token_ids", f"must be non-negative integers: {token_id!r}")
        return self.tokenizer.decode(
            list(token_ids),
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        split_special_tokens: bool | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """Token ids of `messages` rendered by the tokenizer's chat template.

        With `split_special_tokens` (default: not config.allow_special_tokens) special tokens are
        only those the template writes; the same strings inside messages are plain text.
        """
        _check_messages(messages)
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidParameter("messages", "this model's tokenizer has no chat template")
        flagged = self._special_text_field(
            messages, split_special_tokens, template_kwargs.get("tools")
        )
        if flagged is None:  # nothing to sanitize: render, then encode off the GIL (see encode)
            text = self._render(messages, add_generation_prompt, tokenize=False, **template_kwargs)
            # Any special token in `text` is the template's (or a trusted client's).
            return self.encode(text, add_special_tokens=False, split_special_tokens=False)
        if not _supports_sanitizing(self.tokenizer):
            raise InvalidParameter(flagged, "contains special-token text such as <|im_end|>")
        template_kwargs["sanitize_control_tokens"] = True
        rendered = self._render(messages, add_generation_prompt, tokenize=True, **template_kwargs)
        if isinstance(rendered, Mapping):  # transformers 5 returns a BatchEncoding
            rendered = rendered["input_ids"]
        ids = list(rendered)
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(t) for t in ids]

    def _render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        **kwargs: Any,
    ) -> Any:
        try:
            return self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=add_generation_prompt, **kwargs
            )
        except Exception as exc:  # jinja raises TemplateError for roles it does not accept
            raise InvalidParameter("messages", f"the chat template rejected them: {exc}") from exc

    def _split_special(self, split_special_tokens: bool | None) -> bool:
        if split_special_tokens is None:
            return not self.config.allow_special_tokens
        return bool(split_special_tokens)

    def _special_text_field(
        self,
        messages: Sequence[Mapping[str, Any]],
        split_special_tokens: bool | None,
        tools: Any = None,
    ) -> str | None:
        """The first message field holding special-token text, when such text must be split.

        Only then is transformers' `sanitize_control_tokens` (>= 5.24) needed: it marks those
        strings before rendering and encodes them as plain text, leaving the template's own
        markers special. Its regex split of the whole render holds the GIL for a long chat, so
        ordinary chats take the plain path."""
        if not self._split_special(split_special_tokens):
            return None
        pattern = self._special_pattern
        if pattern is None:
            return None
        for i, message in enumerate(messages):
            for key, value in message.items():
                if isinstance(value, str):
                    if pattern.search(value):
                        return f"messages[{i}].{key}"
                elif _nested_text_matches(value, pattern):  # tool_calls' names and arguments
                    return f"messages[{i}].{key}"
        if tools is not None and _nested_text_matches(tools, pattern):
            return "tools"
        return None

    @functools.cached_property
    def _special_pattern(self) -> re.Pattern[str] | None:
        # Every added token (a superset of what sanitizing treats as control tokens).
        tokens = sorted(getattr(self.tokenizer, "added_tokens_encoder", {}), key=len, reverse=True)
        tokens = [t for t in tokens if t]
        return re.compile("|".join(map(re.escape, tokens))) if tokens else None

    # Off the event loop: the same helpers, run on the engine's tokenizer thread.

    async def _off_loop(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._text_executor, lambda: fn(*args, **kwargs))

    async def encode_async(self, text: str, **kwargs: Any) -> list[int]:
        return await self._off_loop(self.encode, text, **kwargs)

    async def apply_chat_template_async(
        self, messages: Sequence[Mapping[str, Any]], **kwargs: Any
    ) -> list[int]:
        return await self._off_loop(self.apply_chat_template, messages, **kwargs)

    async def decode_async(self, token_ids: Sequence[int], **kwargs: Any) -> str:
        return await self._off_loop(self.decode, token_ids, **kwargs)

    # Guided decoding.

    async def prepare_guided(self, guided: GuidedDecoding) -> None:
        """Compile `guided` (or find it cached) without blocking the event loop; raises
        InvalidParameter("guided", ...) for a spec the grammar library refuses. A caller that
        awaits this before `generate` gets that error at submission, as a status."""
        if not isinstance(guided, GuidedDecoding):
            raise InvalidParameter("guided", "must be GuidedDecoding")
        await asyncio.wrap_future(self._grammars.compile(guided))

    def _grammar_tokenizer_info(self) -> Any:
        # On the tokenizer thread: the Rust tokenizer must not be read while another thread
        # encodes with it.
        build = functools.partial(
            tokenizer_info, self.tokenizer, self._vocab_size, self._eos_token_ids
        )
        return self._text_executor.submit(build).result()

    # ----------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        with self._cond:
            if self._state == _RUNNING:
                return
            if self._state != _NEW:
                raise EngineStopped("the engine was shut down and cannot be restarted")
            self._state = _RUNNING
            self._stop_reason = "engine stopped"
            self._thread = threading.Thread(target=self._loop, name="gateway-engine", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._state == _RUNNING

    def shutdown(self, timeout: float | None = 10.0) -> bool:
        """Stop the loop; unfinished streams end with finish_reason "cancelled".

        Returns False if the loop thread is still inside a runner call after `timeout` seconds
        (it ends the streams when that call returns).
        """
        with self._cond:
            if self._state == _STOPPED:
                return True
            started = self._thread is not None
            self._state = _STOPPING
            self._stop_reason = "engine is shutting down"
            self._cond.notify_all()
        if not started:
            self._abort_everything("cancelled", "engine is shutting down")
            with self._cond:
                self._state = _STOPPED
            return True
        self._text_executor.shutdown(wait=False, cancel_futures=True)
        self._grammars.shutdown()
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        with self._cond:
            self._state = _STOPPED
        return True

    # ------------------------------------------------------------------------ requests

    def generate(self, request: GenerationRequest) -> RequestStream:
        """Submit a request; iterate the returned stream with `async for`.

        Raises at once (before any event): InvalidParameter, ContextLengthExceeded,
        EngineOverloaded, EngineStopped. Must be called from a running asyncio event loop.
        """
        loop = asyncio.get_running_loop()
        sink = AsyncSink(loop, asyncio.Queue())
        entry = self._submit(request, sink, require_running=True, bounded=True)
        key = entry.key
        return RequestStream(request.request_id, sink.queue, lambda: self._cancel_queue.put(key))

    def cancel(self, request_id: str) -> bool:
        """Cancel a request (thread-safe). Returns False if no such request is in flight."""
        with self._cond:
            entry = self._active.get(request_id)
            if entry is None:
                return False
            self._cancel_queue.put(entry.key)
            self._cond.notify_all()
            return True

    def run_batch(self, requests: Sequence[GenerationRequest]) -> list[list[TokenEvent]]:
        """Generate synchronously in the calling thread (before `start`): warm-up, benchmarks."""
        with self._cond:
            if self._state != _NEW:
                raise EngineError("run_batch is only available before start()")
        sinks = [ListSink() for _ in requests]
        for request, sink in zip(requests, sinks, strict=True):
            self._submit(request, sink, require_running=False, bounded=False)
        with torch.inference_mode():
            while True:
                with self._cond:
                    while self._compiling and not self._has_work():
                        self._cond.wait()
                if not self._has_work():
                    break
                self._step()
        return [sink.events for sink in sinks]

    def stats(self) -> EngineStats:
        with self._cond:
            c = self._counters
            prefix = self._blocks.stats
            return EngineStats(
                running=c.running,
                waiting=self._num_unadmitted,
                max_num_seqs=self._max_num_seqs,
                kv_blocks_used=c.blocks_used,
                kv_blocks_total=self._blocks.num_blocks,
                block_size=self._blocks.block_size,
                prompt_tokens_total=c.prompt_tokens_total,
                generated_tokens_total=c.generated_tokens_total,
                prefix_query_tokens_total=prefix.queries,
                prefix_hit_tokens_total=prefix.hits,
                preemptions_total=self._scheduler.preemptions_total,
                steps_total=c.steps_total,
                step_tokens_total=c.step_tokens_total,
                steps_by_kind=dict(self._clock.totals.steps),
                step_phase_seconds=dict(self._clock.totals.seconds),
            )

    def _submit(
        self, request: GenerationRequest, sink: Sink, *, require_running: bool, bounded: bool
    ) -> _Entry:
        submitted_at = time.perf_counter()
        if not isinstance(request, GenerationRequest):
            raise InvalidParameter("request", "must be a GenerationRequest")
        if not isinstance(request.request_id, str) or not request.request_id:
            raise InvalidParameter("request_id", "must be a non-empty string")
        self._refuse_overlong_prompt(request)
        prompt = self._checked_prompt(request.prompt_token_ids)
        params = request.params
        if not isinstance(params, SamplingParams):
            raise InvalidParameter("params", "must be SamplingParams")
        params.validate(self._vocab_size)
        max_tokens = self._checked_max_tokens(len(prompt), params.max_tokens)
        grammar = self._grammar_for(params)
        seq = SequenceState(
            request.request_id,
            prompt,
            params,
            max_tokens,
            self._eos_token_ids,
            self._decode_text,
            submitted_at,
        )
        with self._cond:
            if require_running and self._state != _RUNNING:
                raise EngineStopped(self._stop_reason)
            if request.request_id in self._active:
                raise InvalidParameter(
                    "request_id", f"request {request.request_id!r} is already in flight"
                )
            # Waiting requests that free places will take at the next step do not count.
            free_places = self._max_num_seqs - self._counters.running
            if bounded and self._num_unadmitted >= self.config.max_queue + max(free_places, 0):
                raise EngineOverloaded(
                    max(0, self._num_unadmitted - free_places), self.config.max_queue
                )
            sched = ScheduledSequence(next(self._keys), list(prompt), len(prompt))
            entry = _Entry(seq, sched, sink, grammar=grammar)
            if grammar is None or grammar.done():
                self._inbox.append(entry)
            else:
                self._compiling.add(entry)
            self._num_unadmitted += 1
            self._active[request.request_id] = entry
            self._by_key[entry.key] = entry
            self._cond.notify_all()
        if entry in self._compiling:
            # Outside the lock: the callback runs at once if the compile has just finished.
            grammar.add_done_callback(lambda _: self._grammar_ready(entry))  # type: ignore[union-attr]
        return entry

    def _grammar_for(self, params: SamplingParams) -> Future[Any] | None:
        """The compile of the request's grammar (None without one); a spec already known to be
        bad raises InvalidParameter here, at submission."""
        if params.guided is None:
            return None
        grammar = self._grammars.compile(params.guided)
        if grammar.done() and grammar.exception() is not None:
            raise grammar.exception()  # type: ignore[misc]
        return grammar

    def _grammar_ready(self, entry: _Entry) -> None:
        """A compile finished (any thread): the request goes to the inbox, failed or not; the
        loop thread ends it there if its grammar did not compile."""
        with self._cond:
            if entry not in self._compiling:  # cancelled while compiling
                return
            self._compiling.discard(entry)
            self._inbox.append(entry)
            self._cond.notify_all()

    def _refuse_overlong_prompt(self, request: GenerationRequest) -> None:
        """ContextLengthExceeded for a prompt longer than the context, before the O(n) checks:
        they run on the caller's event loop, and a 4 MB prompt has ~1M tokens."""
        ids = request.prompt_token_ids
        prompt_tokens = len(ids) if isinstance(ids, (list, tuple)) else 0
        if prompt_tokens < self._context_length:
            return
        max_tokens = getattr(request.params, "max_tokens", None)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            max_tokens = 1  # what the context would need at least
        raise ContextLengthExceeded(prompt_tokens, max_tokens, self._context_length)

    def _checked_prompt(self, prompt_token_ids: Sequence[int]) -> list[int]:
        try:
            prompt = list(prompt_token_ids)
        except TypeError:
            raise InvalidParameter("prompt_token_ids", "must be a list of token ids") from None
        if not prompt:
            raise InvalidParameter("prompt_token_ids", "the prompt must not be empty")
        for token_id in prompt:
            if isinstance(token_id, bool) or not isinstance(token_id, int):
                raise InvalidParameter(
                    "prompt_token_ids", f"must be integers, got {type(token_id).__name__}"
                )
        low, high = min(prompt), max(prompt)
        if low < 0 or high >= self._vocab_size:
            bad = low if low < 0 else high
            raise InvalidParameter(
                "prompt_token_ids",
                f"token id {bad} is outside the vocabulary [0, {self._vocab_size})",
            )
        return prompt

    def _checked_max_tokens(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """max_tokens, defaulted to what the context (and the KV pool) leaves after the prompt.

        A sequence holds KV for prompt + max_tokens - 1 tokens: the last sampled one is never
        computed."""
        capacity = self._capacity_tokens
        if max_tokens is None:
            if prompt_tokens >= self._context_length:
                raise ContextLengthExceeded(prompt_tokens, 1, self._context_length)
            if prompt_tokens > capacity:
                raise KVCacheTooSmall(prompt_tokens, capacity)
            return min(self._context_length, capacity + 1) - prompt_tokens
        if prompt_tokens + max_tokens > self._context_length:
            raise ContextLengthExceeded(prompt_tokens, max_tokens, self._context_length)
        if prompt_tokens + max_tokens - 1 > capacity:
            raise KVCacheTooSmall(prompt_tokens + max_tokens - 1, capacity)
        return max_tokens

    # ------------------------------------------------------------------------ loop thread

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while self._state == _RUNNING and not self._has_work():
                        self._cond.wait()
                    if self._state != _RUNNING:
                        break
                try:
                    self._step()
                except Exception:  # a bug here must not hang every stream: fail the batch
                    logger.exception("engine step failed; ending the running requests")
                    self._abort_admitted("error", "internal engine error (see the server log)")
        self._abort_everything("cancelled", self._stop_reason)

    def _has_work(self) -> bool:
        return bool(self._inbox or self._scheduler.has_work() or not self._cancel_queue.empty())

    def _step(self) -> None:
        work = _StepWork()
        self._clock.begin()
        self._take_inbox_and_cancellations(work)
        plan = self._scheduler.schedule()
        self._place_admitted(plan)
        if plan.chunks:
            self._run(plan, work)
        # Counters first: a consumer that sees a final event also sees its blocks freed.
        self._refresh_counters(work)
        # While sequences keep running, this step's events wait until the next step is launched
        # (_run): waking the consumers' event loops now would have them (grpc-python, some 80 us
        # of CPU per message) contend for the GIL with this thread's scheduling and launch, on
        # the critical path; after the launch they run while the GPU computes.
        self._deliver(work, hold=bool(plan.chunks and self._scheduler.running))
        self._clock.end()

    def _take_inbox_and_cancellations(self, work: _StepWork) -> None:
        with self._cond:
            inbox, self._inbox = self._inbox, []
        for entry in inbox:
            failure = entry.grammar.exception() if entry.grammar is not None else None
            if failure is not None:
                message = getattr(failure, "message", None) or str(failure)
                self._finish(entry, entry.seq.abort("error", f"guided: {message}"), work)
                continue
            self._scheduler.add(entry.sched)
        while True:
            try:
                key = self._cancel_queue.get_nowait()
            except queue.Empty:
                break
            entry = self._by_key.get(key)
            # A request cancelled twice before this step must be freed once.
            if entry is not None and not entry.seq.finished:
                self._finish(entry, entry.seq.abort("cancelled"), work)

    def _place_admitted(self, plan: StepPlan) -> None:
        now = time.perf_counter()
        for sched in plan.newly_admitted:
            entry = self._by_key[sched.key]
            entry.place = self._free_places.pop()
            entry.seq.admitted_at = now
            self._sampler.add(entry.place, entry.seq.params, entry.seq.prompt_token_ids)
            if entry.grammar is not None and entry.guided is None:
                entry.guided = GuidedState(entry.grammar.result(), self._end_tokens(entry))
        if plan.newly_admitted:
            with self._cond:  # both at once, or a submit in between sees a free place twice
                self._num_unadmitted -= len(plan.newly_admitted)
                self._counters.running = self._scheduler.num_admitted

    def _run(self, plan: StepPlan, work: _StepWork) -> None:
        """One forward over the plan's chunks; if it fails, each chunk alone finds the culprit
        (recomputing a chunk rewrites the same KV rows, so the retry is safe)."""
        try:
            self._clock.before_forward(all(c.num_tokens == 1 for c in plan.chunks))
            logits = self.runner.execute([self._seq_chunk(c) for c in plan.chunks])
            self._clock.after_forward()
        except Exception as exc:
            self._deliver(_StepWork())
            logger.exception("a step of %d chunks failed", len(plan.chunks))
            if len(plan.chunks) == 1:
                entry = self._by_key[plan.chunks[0].seq.key]
                self._finish(entry, entry.seq.abort("error", f"model step failed: {exc}"), work)
                return
            for chunk in plan.chunks:
                self._run(StepPlan(chunks=[chunk]), work)
            return
        self._deliver(_StepWork())  # the previous step's events, while this one computes
        self._scheduler.commit(plan)
        work.computed_tokens += plan.num_tokens
        sampled = [c for c in plan.chunks if c.sample]
        for chunk in plan.chunks:
            if chunk.sample and chunk.seq.num_computed == chunk.seq.prompt_len:
                work.prompt_tokens += chunk.seq.prompt_len
        if sampled:
            self._sample_and_apply(sampled, logits, work)
        else:
            self._clock.mark()  # no wait phase

    def _seq_chunk(self, chunk: ScheduledChunk) -> SeqChunk:
        return SeqChunk(
            chunk.token_ids, chunk.start, self._blocks.table(chunk.seq.key), chunk.sample
        )

    def _sample_and_apply(
        self, chunks: list[ScheduledChunk], logits: torch.Tensor, work: _StepWork
    ) -> None:
        entries = [self._by_key[c.seq.key] for c in chunks]
        places = [e.place for e in entries]
        try:
            # Filled on the host while the device still computes this step's logits.
            mask = self._grammar_mask(entries, logits.device)
            result = self._sampler.sample(places, logits, mask)  # type: ignore[arg-type]
            self._clock.mark()  # the wait for the GPU ends with the sampled ids on the host
        except Exception as exc:
            logger.exception("sampling failed for a batch of %d", len(entries))
            for entry in entries:
                self._finish(entry, entry.seq.abort("error", f"sampling failed: {exc}"), work)
            return
        for row, entry in enumerate(entries):
            self._apply_sample(entry, result, row, work)

    def _apply_sample(self, entry: _Entry, result: SampleResult, row: int, work: _StepWork) -> None:
        seq = entry.seq
        error = result.errors[row]
        if error is not None:
            self._finish(entry, seq.abort("error", error), work)
            return
        token_id = result.token_ids[row]
        guided = entry.guided
        if guided is not None and not guided.accept(token_id):
            message = f"guided: the grammar rejected the sampled token {token_id}"
            self._finish(entry, seq.abort("error", message), work)
            return
        event = seq.on_token(
            token_id,
            self._token_logprob(token_id, result.logprobs[row]),
            grammar_ended=guided is not None and guided.terminated,
        )
        work.generated_tokens += 1
        if event.finish_reason is None:
            entry.sched.token_ids.append(token_id)  # computed by the next step
            work.outbox.append((entry.sink, event))
        else:
            self._finish(entry, event, work)

    def _grammar_mask(self, entries: list[_Entry], device: torch.device) -> TokenMask | None:
        rows = [row for row, entry in enumerate(entries) if entry.guided is not None]
        if not rows:
            return None
        states = [entries[row].guided for row in rows]
        return self._masks.fill(rows, states, device)  # type: ignore[arg-type]

    def _end_tokens(self, entry: _Entry) -> list[int]:
        params = entry.seq.params
        end = set(params.stop_token_ids) | (set() if params.ignore_eos else self._eos_token_ids)
        return sorted(t for t in end if 0 <= t < self._vocab_size)

    def _token_logprob(self, token_id: int, row: RowLogprobs | None) -> TokenLogprob | None:
        if row is None:
            return None
        top = [
            TopLogprob(t, self._piece(t), lp)
            for t, lp in zip(row.top_ids, row.top_logprobs, strict=True)
        ]
        return TokenLogprob(token_id, self._piece(token_id), row.logprob, top)

    def _piece(self, token_id: int) -> str:
        piece = self._piece_cache.get(token_id)
        if piece is None:
            piece = self._decode_piece([token_id])
            self._piece_cache[token_id] = piece
        return piece

    def _finish(self, entry: _Entry, event: TokenEvent, work: _StepWork) -> None:
        """Publish the final event and give the blocks and the sampler place back at once."""
        entry.seq.finished = True
        work.outbox.append((entry.sink, event))
        never_admitted = not entry.sched.admitted
        self._scheduler.finish(entry.sched)
        if entry.place is not None:
            self._sampler.remove(entry.place)
            self._free_places.append(entry.place)
            entry.place = None
        entry.guided = None
        with self._cond:
            if entry in self._inbox:
                self._inbox.remove(entry)
            self._compiling.discard(entry)
            if never_admitted:
                self._num_unadmitted -= 1
            self._forget(entry)

    def _forget(self, entry: _Entry) -> None:
        # Caller holds self._cond.
        if self._active.get(entry.seq.request_id) is entry:
            del self._active[entry.seq.request_id]
        self._by_key.pop(entry.key, None)

    def _deliver(self, work: _StepWork, *, hold: bool = False) -> None:
        """Publish the held events, then `work`'s; with `hold`, keep them all for later."""
        outbox = self._held + work.outbox if self._held else work.outbox
        self._held = []
        if hold and self._hold_events:
            self._held = outbox
            return
        if not outbox:
            return
        undelivered = publish(outbox)
        for event in undelivered:  # the consumer's event loop is closed: stop generating
            if event.finish_reason is None:
                with self._cond:
                    entry = self._active.get(event.request_id)
                    if entry is not None:
                        self._cancel_queue.put(entry.key)

    def _refresh_counters(self, work: _StepWork | None = None) -> None:
        with self._cond:
            c = self._counters
            if work is not None:
                c.prompt_tokens_total += work.prompt_tokens
                c.generated_tokens_total += work.generated_tokens
                if work.computed_tokens:
                    c.steps_total += 1
                    c.step_tokens_total += work.computed_tokens
            c.running = self._scheduler.num_admitted
            c.blocks_used = self._blocks.num_used_blocks

    def _reset_counters(self) -> None:
        self._counters = _Counters()
        self._clock.totals = StepTimings()
        self._scheduler.preemptions_total = 0
        self._blocks.stats.queries = self._blocks.stats.hits = 0
        self._refresh_counters()

    def _abort_admitted(self, reason: str, message: str) -> None:
        work = _StepWork()
        for entry in list(self._by_key.values()):
            if entry.sched.admitted and not entry.seq.finished:
                self._finish(entry, entry.seq.abort(reason, message), work)  # type: ignore[arg-type]
        self._refresh_counters()
        self._deliver(work)

    def _abort_everything(self, reason: str, message: str) -> None:
        work = _StepWork()
        with self._cond:
            entries = list(self._by_key.values())
        for entry in entries:
            if not entry.seq.finished:
                self._finish(entry, entry.seq.abort(reason, message), work)  # type: ignore[arg-type]
        self._refresh_counters()
        self._deliver(work)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"device {device!r} requested but CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise InvalidParameter("device", f"must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return device


def _model_name(path: str | os.PathLike[str], runner: Runner) -> str:
    name = getattr(runner.spec, "name", None)
    return str(name) if name else Path(path).name


def _as_dict(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return dict(value)
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if hasattr(value, "to_dict"):
        return dict(value.to_dict())
    return {"quant_method": str(value)}


def _rust_backend(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind a fast transformers tokenizer, else None."""
    backend = getattr(tokenizer, "_tokenizer", None)
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers ships with transformers
        return None
    return backend if isinstance(backend, Tokenizer) else None


@functools.cache
def _sanitizing_supported(tokenizer_type: type) -> bool:
    try:
        parameters = inspect.signature(tokenizer_type.apply_chat_template).parameters
    except (TypeError, ValueError):
        return False
    return "sanitize_control_tokens" in parameters


def _supports_sanitizing(tokenizer: Any) -> bool:
    return _sanitizing_supported(type(tokenizer))


def _nested_text_matches(value: Any, pattern: re.Pattern[str]) -> bool:
    """Whether a string anywhere inside `value` (lists, dicts: keys and values) matches."""
    pending = [value]
    while pending:  # iterative: a client's deeply nested tool schema cannot exhaust the stack
        item = pending.pop()
        if isinstance(item, str):
            if pattern.search(item):
                return True
        elif isinstance(item, Mapping):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return False


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InvalidParameter("messages", "must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidParameter("messages", f"message {i} must be an object")
        if not isinstance(message.get("role"), str) or not message.get("role"):
            raise InvalidParameter("messages", f"message {i} has no 'role' string")
