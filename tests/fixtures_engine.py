"""Test doubles for the engine's logic tests (the real runner is used by test_engine_smollm2.py).

`byte_tokenizer()` is a real Hugging Face fast tokenizer, byte-level BPE with no merges: one token
per UTF-8 byte (ids 0-255), so every character above U+007F spans several tokens.

`ScriptedRunner` is a TEST DOUBLE of gateway.model's paged runner. Its logits are a deterministic
function of each sequence's own token history (never of the batch), read back through the block
table, and it checks the runner contract (tables cover the chunk, no unwritten reads, no two
chunks writing one place) on every call. A prompt "say:TEXT|" makes it emit TEXT then EOS under
greedy decoding; any other prompt makes it emit pseudo-random bytes, never EOS. A step raises
when a chunk's history contains "fail-prefill", or "boom" in the tokens after the prompt's "|"
(so "say:ka-boom!|" fails in decode); "nan!" makes that row's logits NaN.

`plain_greedy_decode(runner, prompt, count)` is the reference for a real runner: prefill, then one
decode step per token, with no engine in between.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

EOS_ID = 256
BOS_ID = 257
VOCAB_SIZE = 260  # 256 bytes, <eos>, <bos>, two never-used ids (a padded vocab)
SCRIPT_BOOST = 12.0  # logit margin of the scripted token over the noise


def plain_greedy_decode(
    runner: Any, prompt: list[int], count: int
) -> tuple[list[int], list[float]]:
    """Greedy ids and their logprobs, on pool blocks 0.. (which a fresh runner has not used)."""
    from gateway.model.step_batch import SeqChunk

    tokens: list[int] = []
    logprobs: list[float] = []
    size = runner.spec.block_size
    table = list(range(-(-(len(prompt) + count) // size)))
    with torch.inference_mode():
        logits = runner.execute([SeqChunk(prompt, 0, table)])[0]
        for i in range(count):
            token = int(logits.argmax())
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits.double(), -1)[token]))
            logits = runner.execute([SeqChunk([token], len(prompt) + i, table)])[0]
    return tokens, logprobs


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map used by ByteLevel BPE.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def byte_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab["<eos>"] = EOS_ID
    vocab["<bos>"] = BOS_ID
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", bos_token="<bos>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return tokenizer


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@dataclass
class ScriptedSpec:
    vocab_size: int = VOCAB_SIZE
    max_model_len: int = 128
    num_blocks: int = 64
    block_size: int = 16
    eos_token_ids: tuple[int, ...] = (EOS_ID,)
    bos: int | None = BOS_ID
    name: str = "scripted-test-double"
    quantization: Any = None
    weight_bytes: int = 0
    kv_pool_bytes: int = 0


@dataclass(frozen=True)
class ChunkRecord:
    start: int
    num_tokens: int
    sample: bool


@dataclass
class ScriptedRunner:
    """Deterministic fake paged runner (see module docstring). Its "KV cache" stores each
    position's token id in the block and offset the chunk's block table maps it to; a chunk's
    history is read back through its table, so a wrong table, a reused block that holds other
    tokens or an unwritten position changes the output or records a violation."""

    spec: ScriptedSpec = field(default_factory=ScriptedSpec)
    delay_s: float = 0.0  # per call, to keep requests in flight while a test acts
    device: str = "cpu"  # where the logits are returned (the engine samples there)
    kv: list[list[int | None]] = field(default_factory=list)
    steps: list[list[ChunkRecord]] = field(default_factory=list)  # successful steps
    attempts: list[int] = field(default_factory=list)  # chunks per call, failed calls too
    # Contract breaches seen (the engine catches runner exceptions, so tests check this list).
    violations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.kv = [[None] * self.spec.block_size for _ in range(self.spec.num_blocks)]

    def execute(self, chunks: Sequence[Any]) -> torch.Tensor:
        self._pause()
        with self.lock:
            self.attempts.append(len(chunks))
        if not chunks:
            self._violation("a step with no chunks")
        size = self.spec.block_size
        histories, writes = [], {}
        for chunk in chunks:
            start, tokens, table = chunk.start_pos, list(chunk.token_ids), list(chunk.block_table)
            end = start + len(tokens)
            if not tokens or start < 0:
                self._violation(f"bad chunk: start {start}, {len(tokens)} tokens")
            if end > self.spec.max_model_len:
                self._violation("a chunk past max_model_len")
            if len(table) * size < end or any(not 0 <= b < self.spec.num_blocks for b in table):
                self._violation(f"block table {table} does not cover {end} positions")
            history = []
            for pos in range(start):
                token = self.kv[table[pos // size]][pos % size]
                if token is None:
                    self._violation(f"position {pos} read before it was written")
                history.append(token)
            history += tokens
            for pos, token in zip(range(start, end), tokens, strict=True):
                where = (table[pos // size], pos % size)
                if where in writes:
                    self._violation(f"two chunks of one step write block {where[0]}")
                writes[where] = token
            histories.append(history)
        if any(_contains(h, "fail-prefill") or _generated_contains(h, "boom") for h in histories):
            raise RuntimeError("scripted step failure")  # before any KV is written
        for (block, offset), token in writes.items():
            self.kv[block][offset] = token
        rows = [next_logits(h) for h, c in zip(histories, chunks, strict=True) if c.sample]
        with self.lock:
            self.steps.append(
                [ChunkRecord(c.start_pos, len(c.token_ids), c.sample) for c in chunks]
            )
        if not rows:
            return torch.empty(0, VOCAB_SIZE, device=self.device)
        return torch.stack(rows).to(self.device)

    def decode_rows(self) -> list[int]:
        """Per successful step, its one-token chunks past position 0 (decode rows)."""
        return [sum(c.num_tokens == 1 and c.start > 0 for c in step) for step in self.steps]

    def _violation(self, message: str) -> NoReturn:
        with self.lock:
            self.violations.append(message)
        raise AssertionError(message)

    def _pause(self) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)


def _generated_contains(history: list[int], marker: str) -> bool:
    """`marker` in what came after the prompt's "|" (the tokens a "say:" prompt produced)."""
    raw = bytes(t for t in history if t < 256)
    return marker.encode() in raw[raw.find(b"|") + 1 :] if b"|" in raw else False


def _contains(history: list[int], marker: str) -> bool:
    return marker.encode() in bytes(t for t in history if t < 256)


def scripted_next_token(history: list[int]) -> int:
    """The token greedy decoding picks after `history`."""
    raw = bytes(t if t < 256 else 0 for t in history)
    start = raw.find(b"say:")
    end = raw.find(b"|", start + 4) if start >= 0 else -1
    if start >= 0 and end >= 0:
        target = raw[start + 4 : end]
        produced = len(raw) - (end + 1)
        return target[produced] if produced < len(target) else EOS_ID
    return hash(tuple(history)) % 256


def next_logits(history: list[int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(hash(tuple(history)) & 0x7FFFFFFF)
    logits = torch.randn(VOCAB_SIZE, generator=generator)
    logits[scripted_next_token(history)] += SCRIPT_BOOST
    if _contains(history, "nan!"):
        logits[:] = float("nan")
    return logits
