"""The engine: a loop thread that owns the runner and runs continuous batching.

Each step: apply cancellations, admit waiting requests into free slots and prefill them (chunked by
a per-step prompt-token budget so running streams keep flowing), then one batched decode for every
running sequence, then sample, detokenize and publish that step's events. Requests join and leave
the batch at every step; a finished or cancelled request gives its slot back at once.

Threads: asyncio code calls `generate`, `cancel` and `stats`, which only take a short lock; the loop
thread blocks on a condition variable when there is nothing to do.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch

from gateway.engine.detokenizer import make_decoders
from gateway.engine.errors import (
    ContextLengthExceeded,
    EngineError,
    EngineOverloaded,
    EngineStopped,
    InvalidParameter,
)
from gateway.engine.params import SamplingParams
from gateway.engine.runner import Runner
from gateway.engine.sampler import RowLogprobs, Sampler, SampleResult
from gateway.engine.sequence import SequenceState
from gateway.engine.stream import AsyncSink, ListSink, RequestStream, Sink, publish
from gateway.engine.types import (
    EngineStats,
    GenerationRequest,
    ModelInfo,
    TokenEvent,
    TokenLogprob,
    TopLogprob,
)
from quantize.errors import UserInputError

logger = logging.getLogger(__name__)

_NEW, _RUNNING, _STOPPING, _STOPPED = "new", "running", "stopping", "stopped"


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"  # "auto" (cuda when available), "cuda", "cuda:N" or "cpu"
    max_batch_size: int = 32  # = KV slots = most sequences decoded together
    max_queue: int = 256  # requests allowed to wait for a slot; past it, EngineOverloaded
    max_model_len: int | None = None  # None: the model's own context length
    kernel: str = "auto"
    # Prompt tokens prefilled per step, across requests; a longer prompt is prefilled in chunks
    # so the running streams get a token between chunks. None: whole prompts, no limit.
    prefill_chunk_tokens: int | None = 512
    warmup: bool = True

    def validate(self) -> None:
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise InvalidParameter("max_batch_size", f"must be >= 1, got {self.max_batch_size!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise InvalidParameter("max_queue", f"must be >= 0, got {self.max_queue!r}")
        if self.max_model_len is not None and (
            not isinstance(self.max_model_len, int) or self.max_model_len < 2
        ):
            raise InvalidParameter("max_model_len", f"must be >= 2, got {self.max_model_len!r}")
        if self.prefill_chunk_tokens is not None and (
            not isinstance(self.prefill_chunk_tokens, int) or self.prefill_chunk_tokens < 1
        ):
            raise InvalidParameter(
                "prefill_chunk_tokens", f"must be >= 1 or None, got {self.prefill_chunk_tokens!r}"
            )


@dataclass(eq=False)
class _Entry:
    key: int  # engine-internal id: request ids may be reused once a request is done
    seq: SequenceState
    sink: Sink


@dataclass
class _Counters:
    running: int = 0
    slots_used: int = 0
    kv_tokens_used: int = 0
    prompt_tokens_total: int = 0
    generated_tokens_total: int = 0


@dataclass
class _StepWork:
    cancelled: list[_Entry] = field(default_factory=list)
    outbox: list[tuple[Sink, TokenEvent]] = field(default_factory=list)
    prompt_tokens: int = 0
    generated_tokens: int = 0


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
        self._num_slots = int(runner.num_slots)
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
        )
        runner_device = getattr(runner, "device", None)
        self._input_device = torch.device(runner_device) if runner_device is not None else None
        # The loop thread decodes with its own tokenizer copy (the Rust tokenizer is not safe to
        # share with a thread that encodes).
        self._decode_text, self._decode_piece = make_decoders(tokenizer)
        self._piece_cache: dict[int, str] = {}
        self._sampler = Sampler(self._num_slots, self._vocab_size, self._eos_token_ids)

        self._cond = threading.Condition()
        self._state = _NEW
        self._stop_reason = "engine not started: call start()"
        self._waiting: deque[_Entry] = deque()
        self._active: dict[str, _Entry] = {}  # request_id -> entry, waiting or running
        self._by_key: dict[int, _Entry] = {}
        self._keys = itertools.count()
        # Reentrant-safe, so RequestStream.__del__ can cancel from any thread or finalizer.
        self._cancel_queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._free_slots: list[int] = list(range(self._num_slots - 1, -1, -1))
        self._prefilling: list[_Entry] = []  # loop thread only
        self._running: dict[int, _Entry] = {}  # slot -> entry; loop thread only
        self._counters = _Counters()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------- building

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike[str], config: EngineConfig | None = None
    ) -> Engine:
        """Load a checkpoint (ours, AutoGPTQ/GPTQModel, or FP16) and its tokenizer; warm up."""
        from transformers import AutoTokenizer

        from gateway.model.checkpoint import checkpoint_dir
        from gateway.model.config import load_model_config
        from gateway.model.slots import SlotRunner

        config = config or EngineConfig()
        config.validate()
        # The paged runner with one fixed block table per slot; the scheduler that shares
        # blocks between sequences (gateway/engine/scheduler.py) is the next step of engine v2.
        max_len = (
            config.max_model_len or load_model_config(checkpoint_dir(path)).max_position_embeddings
        )
        runner = SlotRunner.load(
            path,
            num_slots=config.max_batch_size,
            max_model_len=max_len,
            device=resolve_device(config.device),
            kernel=config.kernel,
        )
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
        self._counters = _Counters()

    # ------------------------------------------------------------------------ text helpers

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidParameter("prompt", f"must be a string, got {type(text).__name__}")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

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
        **template_kwargs: Any,
    ) -> list[int]:
        """Token ids of `messages` rendered by the tokenizer's chat template."""
        _check_messages(messages)
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidParameter("messages", "this model's tokenizer has no chat template")
        try:
            rendered = self.tokenizer.apply_chat_template(
                list(messages),
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                **template_kwargs,
            )
        except Exception as exc:  # jinja raises TemplateError for roles it does not accept
            raise InvalidParameter("messages", f"the chat template rejected them: {exc}") from exc
        if isinstance(rendered, Mapping):  # transformers 5 returns a BatchEncoding
            rendered = rendered["input_ids"]
        ids = list(rendered)
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(t) for t in ids]

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
            while self._has_work():
                self._step()
        return [sink.events for sink in sinks]

    def stats(self) -> EngineStats:
        with self._cond:
            c = self._counters
            return EngineStats(
                running=c.running,
                waiting=len(self._waiting),
                slots_total=self._num_slots,
                slots_used=c.slots_used,
                kv_tokens_used=c.kv_tokens_used,
                kv_tokens_total=self._num_slots * self._context_length,
                prompt_tokens_total=c.prompt_tokens_total,
                generated_tokens_total=c.generated_tokens_total,
            )

    def _submit(
        self, request: GenerationRequest, sink: Sink, *, require_running: bool, bounded: bool
    ) -> _Entry:
        submitted_at = time.perf_counter()
        if not isinstance(request, GenerationRequest):
            raise InvalidParameter("request", "must be a GenerationRequest")
        if not isinstance(request.request_id, str) or not request.request_id:
            raise InvalidParameter("request_id", "must be a non-empty string")
        prompt = self._checked_prompt(request.prompt_token_ids)
        params = request.params
        if not isinstance(params, SamplingParams):
            raise InvalidParameter("params", "must be SamplingParams")
        params.validate(self._vocab_size)
        max_tokens = self._checked_max_tokens(len(prompt), params.max_tokens)
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
            # Waiting requests that free slots will take at the next step do not count.
            if bounded and len(self._waiting) >= self.config.max_queue + len(self._free_slots):
                raise EngineOverloaded(
                    max(0, len(self._waiting) - len(self._free_slots)), self.config.max_queue
                )
            entry = _Entry(next(self._keys), seq, sink)
            self._waiting.append(entry)
            self._active[request.request_id] = entry
            self._by_key[entry.key] = entry
            self._cond.notify_all()
        return entry

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
        if max_tokens is None:
            if prompt_tokens >= self._context_length:
                raise ContextLengthExceeded(prompt_tokens, 1, self._context_length)
            return self._context_length - prompt_tokens
        if prompt_tokens + max_tokens > self._context_length:
            raise ContextLengthExceeded(prompt_tokens, max_tokens, self._context_length)
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
        return bool(
            self._waiting or self._prefilling or self._running or not self._cancel_queue.empty()
        )

    def _step(self) -> None:
        work = self._take_cancellations_and_admit()
        for entry in work.cancelled:
            self._finish(entry, entry.seq.abort("cancelled"), work)
        self._prefill(work)
        self._decode(work)
        # Counters first: a consumer that sees a final event also sees its slot freed.
        self._refresh_counters(work)
        self._deliver(work)

    def _take_cancellations_and_admit(self) -> _StepWork:
        work = _StepWork()
        with self._cond:
            while True:
                try:
                    key = self._cancel_queue.get_nowait()
                except queue.Empty:
                    break
                entry = self._by_key.get(key)
                # A request cancelled twice before this step must free its slot once.
                if entry is None or entry.seq.finished or entry in work.cancelled:
                    continue
                if entry.seq.slot is None:  # still waiting: never got a slot
                    self._waiting.remove(entry)
                    entry.seq.finished = True
                    self._forget(entry)
                    work.outbox.append((entry.sink, entry.seq.abort("cancelled")))
                else:
                    work.cancelled.append(entry)
            now = time.perf_counter()
            while self._waiting and self._free_slots:
                entry = self._waiting.popleft()
                entry.seq.slot = self._free_slots.pop()
                entry.seq.admitted_at = now
                self._sampler.add(entry.seq.slot, entry.seq.params, entry.seq.prompt_token_ids)
                self._prefilling.append(entry)
        return work

    def _prefill(self, work: _StepWork) -> None:
        budget = self.config.prefill_chunk_tokens
        for entry in list(self._prefilling):
            if budget is not None and budget <= 0:
                break
            seq = entry.seq
            assert seq.slot is not None
            remaining = seq.prompt_len - seq.prefilled
            count = remaining if budget is None else min(remaining, budget)
            chunk = seq.prompt_token_ids[seq.prefilled : seq.prefilled + count]
            seq.runner_touched = True
            try:
                logits = self.runner.prefill(seq.slot, chunk, start_pos=seq.prefilled)
            except Exception as exc:
                logger.exception("prefill failed for request %s", seq.request_id)
                self._finish(entry, seq.abort("error", f"prefill failed: {exc}"), work)
                continue
            seq.prefilled += count
            if budget is not None:
                budget -= count
            if not seq.prefill_done:
                continue
            self._prefilling.remove(entry)
            self._running[seq.slot] = entry
            work.prompt_tokens += seq.prompt_len
            result = self._sample([seq.slot], logits.reshape(1, -1), [entry], work)
            if result is not None:
                self._apply_sample(entry, result, 0, work)

    def _decode(self, work: _StepWork) -> None:
        batch = [e for e in self._running.values() if e.seq.last_token is not None]
        if batch:
            self._decode_batch(batch, work)

    def _decode_batch(self, batch: list[_Entry], work: _StepWork) -> None:
        slots = [e.seq.slot for e in batch]
        device = self._input_device
        slot_t = torch.tensor(slots, dtype=torch.long, device=device)
        token_t = torch.tensor([e.seq.last_token for e in batch], dtype=torch.long, device=device)
        pos_t = torch.tensor([e.seq.position for e in batch], dtype=torch.long, device=device)
        try:
            logits = self.runner.decode(slot_t, token_t, pos_t)
        except Exception as exc:
            logger.exception("decode failed for a batch of %d", len(batch))
            if len(batch) == 1:
                self._finish(batch[0], batch[0].seq.abort("error", f"decode failed: {exc}"), work)
            else:
                # Find the sequence(s) at fault: a decode rewrites the same KV positions, so
                # running each row alone is safe, and the others keep their streams.
                for entry in batch:
                    self._decode_batch([entry], work)
            return
        result = self._sample(slots, logits, batch, work)  # type: ignore[arg-type]
        if result is None:
            return
        for row, entry in enumerate(batch):
            self._apply_sample(entry, result, row, work)

    def _sample(
        self, slots: list[int], logits: torch.Tensor, batch: list[_Entry], work: _StepWork
    ) -> SampleResult | None:
        try:
            return self._sampler.sample(slots, logits)
        except Exception as exc:
            logger.exception("sampling failed for a batch of %d", len(batch))
            for entry in batch:
                self._finish(entry, entry.seq.abort("error", f"sampling failed: {exc}"), work)
            return None

    def _apply_sample(self, entry: _Entry, result: SampleResult, row: int, work: _StepWork) -> None:
        seq = entry.seq
        error = result.errors[row]
        if error is not None:
            self._finish(entry, seq.abort("error", error), work)
            return
        token_id = result.token_ids[row]
        event = seq.on_token(token_id, self._token_logprob(token_id, result.logprobs[row]))
        work.generated_tokens += 1
        if event.finish_reason is None:
            work.outbox.append((entry.sink, event))
        else:
            self._finish(entry, event, work)

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
        """Publish the final event and give the slot back at once."""
        seq = entry.seq
        seq.finished = True
        work.outbox.append((entry.sink, event))
        slot = seq.slot
        if slot is not None:
            self._running.pop(slot, None)
            if entry in self._prefilling:
                self._prefilling.remove(entry)
            self._sampler.remove(slot)
            if seq.runner_touched:
                try:
                    self.runner.free(slot)
                except Exception:
                    logger.exception("runner.free(%d) failed", slot)
        with self._cond:
            if slot is not None:
                self._free_slots.append(slot)
            self._forget(entry)

    def _forget(self, entry: _Entry) -> None:
        # Caller holds self._cond.
        if self._active.get(entry.seq.request_id) is entry:
            del self._active[entry.seq.request_id]
        self._by_key.pop(entry.key, None)

    def _deliver(self, work: _StepWork) -> None:
        if not work.outbox:
            return
        undelivered = publish(work.outbox)
        for event in undelivered:  # the consumer's event loop is closed: stop generating
            if event.finish_reason is None:
                with self._cond:
                    entry = self._active.get(event.request_id)
                    if entry is not None:
                        self._cancel_queue.put(entry.key)

    def _refresh_counters(self, work: _StepWork | None = None) -> None:
        admitted = list(self._running.values()) + self._prefilling
        with self._cond:
            if work is not None:
                self._counters.prompt_tokens_total += work.prompt_tokens
                self._counters.generated_tokens_total += work.generated_tokens
            self._counters.running = len(admitted)
            self._counters.slots_used = self._num_slots - len(self._free_slots)
            self._counters.kv_tokens_used = sum(e.seq.position for e in admitted)

    def _abort_admitted(self, reason: str, message: str) -> None:
        work = _StepWork()
        for entry in list(self._running.values()) + list(self._prefilling):
            self._finish(entry, entry.seq.abort(reason, message), work)  # type: ignore[arg-type]
        self._refresh_counters()
        self._deliver(work)

    def _abort_everything(self, reason: str, message: str) -> None:
        self._abort_admitted(reason, message)
        work = _StepWork()
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
            for entry in waiting:
                entry.seq.finished = True
                self._forget(entry)
        for entry in waiting:
            work.outbox.append((entry.sink, entry.seq.abort(reason, message)))  # type: ignore[arg-type]
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


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InvalidParameter("messages", "must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidParameter("messages", f"message {i} must be an object")
        if not isinstance(message.get("role"), str) or not message.get("role"):
            raise InvalidParameter("messages", f"message {i} has no 'role' string")
