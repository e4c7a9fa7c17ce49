"""Test doubles for the engine's logic tests (the real runner is used by test_engine_smollm2.py).

`byte_tokenizer()` is a real Hugging Face fast tokenizer, byte-level BPE with no merges: one token
per UTF-8 byte (ids 0-255), so every character above U+007F spans several tokens.

`ScriptedRunner` is a TEST DOUBLE of gateway.model's runner. Its logits are a deterministic function
of each slot's own token history (never of the batch), and it checks the runner contract (slots,
positions, start_pos, free) on every call. A prompt "say:TEXT|" makes it emit TEXT then EOS under
greedy decoding; any other prompt makes it emit pseudo-random bytes, never EOS. Histories that
contain "boom" make `decode` raise, "nan!" makes that row's logits NaN, "fail-prefill" makes
`prefill` raise.
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
    num_slots: int = 4
    eos_token_ids: tuple[int, ...] = (EOS_ID,)
    bos: int | None = BOS_ID
    name: str = "scripted-test-double"
    quantization: Any = None
    weight_bytes: int = 0
    kv_pool_bytes: int = 0


@dataclass
class ScriptedRunner:
    """Deterministic fake runner (see module docstring). Thread-safe call log for assertions."""

    spec: ScriptedSpec = field(default_factory=ScriptedSpec)
    delay_s: float = 0.0  # per call, to keep requests in flight while a test acts
    device: str = "cpu"  # where the logits are returned (the engine samples there)
    histories: list[list[int] | None] = field(default_factory=list)
    decode_batch_sizes: list[int] = field(default_factory=list)  # successful decodes
    decode_attempts: list[int] = field(default_factory=list)  # every call, failed ones too
    prefill_calls: list[tuple[int, int, int]] = field(default_factory=list)  # slot, start, len
    freed: list[int] = field(default_factory=list)
    # Contract breaches seen (the engine catches runner exceptions, so tests check this list).
    violations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.histories = [None] * self.spec.num_slots

    @property
    def num_slots(self) -> int:
        return self.spec.num_slots

    def prefill(self, slot: int, token_ids: Sequence[int], start_pos: int = 0) -> torch.Tensor:
        self._pause()
        self._check_slot(slot)
        history = self.histories[slot]
        if start_pos == 0:
            if history is not None:
                self._violation(f"prefill at 0 into busy slot {slot}")
            history = []
        elif history is None or len(history) != start_pos:
            self._violation(f"prefill start_pos {start_pos} does not continue slot {slot}")
        history = [*history, *token_ids]
        if len(history) > self.spec.max_model_len:
            self._violation("prefill past max_model_len")
        if _contains(history, "fail-prefill"):
            self.histories[slot] = []  # a failed prefill leaves the slot in use until free()
            raise RuntimeError("scripted prefill failure")
        self.histories[slot] = history
        with self.lock:
            self.prefill_calls.append((slot, start_pos, len(token_ids)))
        return next_logits(history).to(self.device)

    def decode(
        self, slots: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        self._pause()
        if not (slots.dtype == tokens.dtype == positions.dtype == torch.long):
            self._violation("decode inputs must be LongTensors")
        if not (slots.shape == tokens.shape == positions.shape) or slots.dim() != 1:
            self._violation("decode inputs must be 1-D of equal length")
        slot_list = slots.tolist()
        with self.lock:
            self.decode_attempts.append(len(slot_list))
        if len(set(slot_list)) != len(slot_list):
            self._violation(f"duplicate slots in a decode batch: {slot_list}")
        updated: dict[int, list[int]] = {}
        for slot, token, position in zip(
            slot_list, tokens.tolist(), positions.tolist(), strict=True
        ):
            self._check_slot(slot)
            history = self.histories[slot]
            if history is None:
                self._violation(f"decode on free slot {slot}")
            if position != len(history):
                self._violation(f"slot {slot}: position {position} != {len(history)}")
            if position >= self.spec.max_model_len:
                self._violation("decode past max_model_len")
            updated[slot] = [*history, token]
            if _contains(updated[slot], "boom"):
                # Raised before any slot is updated, as a real runner's rewritten KV would be.
                raise RuntimeError("scripted decode failure")
        rows = [next_logits(updated[slot]) for slot in slot_list]
        for slot, history in updated.items():
            self.histories[slot] = history
        with self.lock:
            self.decode_batch_sizes.append(len(slot_list))
        return torch.stack(rows).to(self.device)

    def free(self, slot: int) -> None:
        self._check_slot(slot)
        if self.histories[slot] is None:
            self._violation(f"double free of slot {slot}")
        self.histories[slot] = None
        with self.lock:
            self.freed.append(slot)

    def busy_slots(self) -> int:
        return sum(h is not None for h in self.histories)

    def _violation(self, message: str) -> NoReturn:
        with self.lock:
            self.violations.append(message)
        raise AssertionError(message)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.spec.num_slots:
            self._violation(f"slot {slot} out of range")

    def _pause(self) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)


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
