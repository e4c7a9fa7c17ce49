"""Grammar-constrained decoding (xgrammar): compiling, one matcher per sequence, token masks.

- `GrammarCompiler` compiles a `GuidedDecoding` on its own threads and caches the result per
  (kind, spec) in an LRU of futures, so that the engine's step loop never waits for a compile and
  concurrent requests with the same schema compile it once. A spec xgrammar refuses becomes
  `InvalidParameter("guided", reason)`.
- `GuidedState` is one sequence's matcher (loop thread only): it advances by each sampled token
  and says when the grammar has ended.
- `MaskFiller` fills the bitmask of the constrained rows of a step on the host (every row in one
  xgrammar call, on its thread pool) and copies it to the logits' device in one transfer; the
  sampler applies it with `apply_token_bitmask` (a few batched tensor ops, no host sync).

The matcher's state is a function of the tokens it accepted, which are exactly the sequence's
sampled tokens: preemption recomputes the KV of those tokens but keeps them, so the matcher needs
no replay.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from gateway.engine.errors import InvalidParameter
from gateway.engine.params import GuidedDecoding

DEFAULT_CACHE_ENTRIES = 256
DEFAULT_COMPILE_THREADS = 2
# OpenAI's json_object: any JSON object.
JSON_OBJECT_SCHEMA = '{"type": "object"}'
# xgrammar prefixes C++ errors with "[hh:mm:ss] /path/file.cc:123: " and sometimes "Check failed".
_CPP_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")
_BITS = 32  # tokens per bitmask word
# JSON Schema keywords xgrammar 0.2.9 compiles without enforcing (checked one by one: an instance
# that breaks them is accepted), refused rather than silently not honoured.
_UNENFORCED = (
    "not",
    "contains",
    "minContains",
    "maxContains",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
)
# The `format`s it enforces; any other would pass unchecked.
_FORMATS = frozenset(
    [
        "date-time",
        "time",
        "date",
        "duration",
        "email",
        "hostname",
        "ipv4",
        "ipv6",
        "uri",
        "uri-reference",
        "uuid",
        "uri-template",
        "json-pointer",
        "relative-json-pointer",
    ]
)
# Where sub-schemas sit: maps of them, single ones, lists of them.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_VALUES = (
    "items",
    "additionalProperties",
    "additionalItems",
    "propertyNames",
    "unevaluatedProperties",
    "unevaluatedItems",
)
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
MAX_SCHEMA_DEPTH = 64


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + _BITS - 1) // _BITS


@dataclass(frozen=True)
class Grammar:
    """A compiled spec. `token_filter` ([words] int32, or None): tokens the output may contain
    at all, ANDed into every mask of this grammar (see `_control_free_tokens`)."""

    compiled: Any
    token_filter: torch.Tensor | None = None


class GrammarCompiler:
    """Compiles guided-decoding specs off the caller's thread; thread-safe.

    `tokenizer_info` builds xgrammar's view of the vocabulary; it is called once, on a compile
    thread, when the first spec arrives (engines that never see one never import xgrammar).
    """

    def __init__(
        self,
        tokenizer_info: Callable[[], Any],
        *,
        max_entries: int = DEFAULT_CACHE_ENTRIES,
        threads: int = DEFAULT_COMPILE_THREADS,
    ) -> None:
        self._tokenizer_info = tokenizer_info
        self._max_entries = max_entries
        self._threads = threads
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Future[Any]] = OrderedDict()
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="gateway-grammar")
        self._compiler: Any = None
        self._control_free: torch.Tensor | None = None
        self._compiler_lock = threading.Lock()

    def compile(self, guided: GuidedDecoding) -> Future[Any]:
        """A future of the compiled grammar; it raises InvalidParameter for a bad spec.

        Failures are cached too: a client that repeats a bad schema costs one compile."""
        key = (guided.kind, guided.spec)
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._executor.submit(self._compile, guided)
            self._cache[key] = future
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
            return future

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _xgrammar_compiler(self) -> Any:
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar

                # Our LRU is the cache (its keys are the specs as sent); xgrammar's would hold a
                # second copy of every grammar.
                info = self._tokenizer_info()
                self._control_free = _control_free_tokens(info)
                self._compiler = xgrammar.GrammarCompiler(
                    info, max_threads=self._threads, cache_enabled=False
                )
            return self._compiler

    def _compile(self, guided: GuidedDecoding) -> Grammar:
        compiler = self._xgrammar_compiler()
        try:
            compiled = _compile_spec(compiler, guided)
            json_kind = guided.kind in ("json_schema", "json_object")
            return Grammar(compiled, self._control_free if json_kind else None)
        except InvalidParameter:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with C++ messages
            raise InvalidParameter("guided", f"{guided.kind}: {_clean(str(exc))}") from None


def _compile_spec(compiler: Any, guided: GuidedDecoding) -> Any:
    import xgrammar

    kind, spec = guided.kind, guided.spec
    # No free whitespace (", " and ": " only): a small model given it can emit newlines
    # until max_tokens instead of closing the object.
    if kind == "json_schema":
        try:
            schema = json.loads(spec)
        except ValueError as exc:
            raise InvalidParameter("guided", f"json_schema is not valid JSON: {exc}") from None
        except RecursionError:
            raise InvalidParameter("guided", "json_schema is nested too deeply") from None
        problem = unsupported_schema_feature(schema)
        if problem is not None:
            raise InvalidParameter("guided", f"json_schema: {problem}")
        return compiler.compile_json_schema(spec, any_whitespace=False)
    if kind == "json_object":
        return compiler.compile_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=False)
    if kind == "regex":
        return compiler.compile_regex(spec)
    if kind == "grammar":
        return compiler.compile_grammar(xgrammar.Grammar.from_lark(spec))
    raise InvalidParameter("guided", f"unknown kind {kind!r}")


def unsupported_schema_feature(schema: Any, path: str = "#", depth: int = 0) -> str | None:
    """Why xgrammar would not honour `schema` in full (None: it would), naming where."""
    if not isinstance(schema, dict):
        return None
    if depth > MAX_SCHEMA_DEPTH:
        return f"nested deeper than {MAX_SCHEMA_DEPTH} levels at {path}"
    for keyword in _UNENFORCED:
        if keyword in schema:
            return f"{keyword!r} (at {path}) is not supported"
    if schema.get("uniqueItems") is True:
        return f"'uniqueItems' (at {path}) is not supported"
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        return f"'allOf' with more than one schema (at {path}) is not supported"
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt not in _FORMATS:
        return (
            f"format {fmt!r} (at {path}) is not supported; supported: {', '.join(sorted(_FORMATS))}"
        )
    children: list[tuple[str, Any]] = []
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            children += [(f"{path}/{key}/{name}", sub) for name, sub in schema[key].items()]
    children += [(f"{path}/{key}", schema[key]) for key in _SCHEMA_VALUES if key in schema]
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            children += [(f"{path}/{key}/{i}", sub) for i, sub in enumerate(schema[key])]
    for where, sub in children:
        problem = unsupported_schema_feature(sub, where, depth + 1)
        if problem is not None:
            return problem
    return None


def _control_free_tokens(info: Any) -> torch.Tensor:
    """Bitmask words of the tokens without a control byte (< 0x20), special tokens kept.

    xgrammar 0.2.9's JSON strings admit raw control characters (a form feed was seen), which
    JSON forbids; JSON without free whitespace has none anywhere, so no token holding one
    can ever be right."""
    vocab = int(info.vocab_size)
    allowed = torch.ones(bitmask_words(vocab) * _BITS, dtype=torch.bool)
    for token_id, piece in enumerate(info.decoded_vocab[:vocab]):
        if any(byte < 0x20 for byte in piece):
            allowed[token_id] = False
    for token_id in (*info.special_token_ids, *info.stop_token_ids):
        if 0 <= token_id < vocab:
            allowed[token_id] = True
    weights = torch.tensor([1 << i for i in range(_BITS)], dtype=torch.int64)
    words = (allowed.view(-1, _BITS).long() * weights).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _clean(message: str) -> str:
    """xgrammar's message without the C++ source location, on one line, bounded."""
    lines = [_CPP_PREFIX.sub("", line).strip() for line in message.strip().splitlines()]
    text = " ".join(line for line in lines if line)
    return text[:500] or "the grammar library refused it"


def tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int]) -> Any:
    """xgrammar's vocabulary view of a Hugging Face tokenizer, padded to the model's logits."""
    import xgrammar

    return xgrammar.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(set(stop_token_ids)) or None
    )


class GuidedState:
    """One sequence's matcher. `end_token_ids` are the tokens that end the request (EOS unless
    ignore_eos, plus stop_token_ids): the grammar allows them only once it accepts the output.
    With none, the matcher ends as soon as the grammar is complete."""

    def __init__(self, grammar: Grammar, end_token_ids: Iterable[int]) -> None:
        import xgrammar

        end = sorted(set(end_token_ids))
        self.matcher = xgrammar.GrammarMatcher(
            grammar.compiled, override_stop_tokens=end or None, terminate_without_stop_token=not end
        )
        self.token_filter = grammar.token_filter

    def accept(self, token_id: int) -> bool:
        return bool(self.matcher.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


@dataclass(frozen=True, slots=True)
class TokenMask:
    """The allowed tokens of some rows of a step: `rows` [n] (long) and `bitmask` [n, words]
    (int32), both on the logits' device."""

    rows: torch.Tensor
    bitmask: torch.Tensor


class MaskFiller:
    """Fills the constrained rows' bitmasks into one reused host buffer (pinned for a GPU) and
    ships them in one copy. Loop thread only."""

    def __init__(self, max_rows: int, vocab_size: int) -> None:
        self._max_rows = max_rows
        self._words = bitmask_words(vocab_size)
        self._host: torch.Tensor | None = None
        self._batch: Any = None  # xgrammar.BatchGrammarMatcher, made on first use

    def fill(
        self, rows: Sequence[int], states: Sequence[GuidedState], device: torch.device
    ) -> TokenMask:
        host = self._buffer(device)[: len(states)]
        if len(states) == 1:
            states[0].matcher.fill_next_token_bitmask(host, 0)
        else:
            if self._batch is None:
                import xgrammar

                self._batch = xgrammar.BatchGrammarMatcher()
            self._batch.batch_fill_next_token_bitmask([s.matcher for s in states], host)
        for i, state in enumerate(states):
            if state.token_filter is not None:
                host[i] &= state.token_filter
        # Non-blocking from pinned memory: the buffer is refilled only after the sampler's host
        # read of this step, which comes after this copy on the same stream.
        bitmask = host.to(device, non_blocking=True)
        index = torch.tensor(list(rows), dtype=torch.long).to(device, non_blocking=True)
        return TokenMask(index, bitmask)

    def _buffer(self, device: torch.device) -> torch.Tensor:
        pinned = device.type == "cuda"
        if self._host is None or self._host.is_pinned() != pinned:
            host = torch.empty((self._max_rows, self._words), dtype=torch.int32)
            self._host = host.pin_memory() if pinned else host
        return self._host


_BIT_VALUES: dict[torch.device, torch.Tensor] = {}


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set to -inf, in place, the logits whose bit is 0. `logits` [rows, vocab]; `bitmask`
    [rows, ceil(vocab / 32)] int32 on the same device, bit j of word w standing for token
    32 w + j (xgrammar's layout). Words are read as 4 little-endian bytes: byte operations move
    a quarter of the data of 32-bit shifts."""
    bits = _BIT_VALUES.get(logits.device)
    if bits is None:
        values = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
        bits = _BIT_VALUES[logits.device] = values.to(logits.device)
    rows, vocab = logits.shape
    allowed = (bitmask.view(torch.uint8).unsqueeze(-1) & bits).view(rows, -1)[:, :vocab]
    logits.masked_fill_(allowed == 0, float("-inf"))
