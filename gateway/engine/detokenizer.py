"""Incremental detokenization: each new token yields only the text that is certainly final.

Byte-level BPE (GPT-2, Llama-3, SmolLM2) and SentencePiece byte fallback split multi-byte characters
over several tokens; decoding such a prefix ends in U+FFFD. We hold those bytes back until the
character completes. Leading-space conventions (SentencePiece drops the space of the first token of
a decode) are handled by decoding a small window that starts a few tokens back and emitting only
what lies beyond the window's already-known text, so each step costs O(window), not O(sequence).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

DecodeFn = Callable[[Sequence[int]], str]

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded ahead of the first output token, so its leading space comes out right.
PROMPT_CONTEXT_TOKENS = 5
# An incomplete character at the end of a decode shows as one U+FFFD (byte-level BPE decodes
# lossily) or up to three (SentencePiece byte fallback: one per byte of a 4-byte character), so
# only the last three replacement characters of a decode can still change; earlier ones are final.
MAX_INCOMPLETE_CHARS = 3
# Past this many tokens without a clean decode the window is moved anyway (the model is producing
# invalid bytes), so a long run of them cannot make each step's decode longer and longer.
MAX_PENDING_TOKENS = 16
# The window moves forward once it holds this many tokens (moving costs one extra decode, so it
# is not done on every token; a decode of a few more tokens costs about the same).
SLIDE_AFTER_TOKENS = 12
# Drop token ids before the window once this many have piled up (keeps memory O(window)).
TRIM_AFTER_TOKENS = 64


def make_decoders(tokenizer: Any) -> tuple[DecodeFn, DecodeFn]:
    """Return (text_decode, piece_decode) private to the calling thread.

    `text_decode` skips special tokens (what a client sees as text); `piece_decode` keeps them
    (a token's own string, for logprobs). Built on a private copy of the tokenizer, because the
    Rust tokenizer refuses concurrent use when another thread encodes with different settings.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers ships with transformers
        Tokenizer = None  # type: ignore[assignment,misc]
    if Tokenizer is not None and isinstance(backend, Tokenizer):
        own = Tokenizer.from_str(backend.to_str())

        def text_decode(ids: Sequence[int]) -> str:
            return own.decode(list(ids), skip_special_tokens=True)

        def piece_decode(ids: Sequence[int]) -> str:
            return own.decode(list(ids), skip_special_tokens=False)

        return text_decode, piece_decode

    slow = copy.deepcopy(tokenizer)

    def slow_text_decode(ids: Sequence[int]) -> str:
        return slow.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def slow_piece_decode(ids: Sequence[int]) -> str:
        return slow.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return slow_text_decode, slow_piece_decode


class IncrementalDetokenizer:
    """Turns one request's output token ids into text deltas.

    Invariant (byte-level tokenizers): the concatenation of everything returned by `push` and
    `flush` equals `decode(output_ids)`.
    """

    def __init__(self, decode: DecodeFn, prompt_ids: Sequence[int]) -> None:
        self._decode = decode
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix = 0  # window start, always at a character boundary
        self._read = len(self._ids)  # tokens before this are fully emitted
        self._boundary = self._read  # the previous value of _read: where the window moves to
        # Characters of decode(ids[prefix:]) already emitted (or belonging to the prompt).
        self._emitted = len(decode(self._ids)) if self._ids else 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final (maybe "")."""
        self._ids.append(token_id)
        text = self._decode(self._ids[self._prefix :])
        pending = len(self._ids) - self._read
        if text.endswith(REPLACEMENT_CHAR) and pending < MAX_PENDING_TOKENS:
            # Maybe an incomplete character: hold its replacement characters back, emit the rest.
            run = len(text) - len(text.rstrip(REPLACEMENT_CHAR))
            stable = len(text) - min(run, MAX_INCOMPLETE_CHARS)
            if stable <= self._emitted:
                return ""
            delta = text[self._emitted : stable]
            self._emitted = stable
            return delta
        delta = text[self._emitted :]
        self._emitted = len(text)
        self._advance()
        return delta

    def flush(self) -> str:
        """Return whatever is still held (an incomplete character comes out as U+FFFD)."""
        if len(self._ids) == self._read:
            return ""
        text = self._decode(self._ids[self._prefix :])
        delta = text[self._emitted :]
        self._emitted = len(text)
        self._advance()
        return delta

    def _advance(self) -> None:
        # Everything decoded so far is emitted: ids[read:] is empty and `read` is a character
        # boundary. Keep the window short by restarting it at the previous boundary.
        self._boundary, self._read = self._read, len(self._ids)
        if self._read - self._prefix >= SLIDE_AFTER_TOKENS:
            self._prefix = self._boundary
            self._emitted = len(self._decode(self._ids[self._prefix :]))
            if self._prefix >= TRIM_AFTER_TOKENS:
                del self._ids[: self._prefix]
                self._read -= self._prefix
                self._boundary -= self._prefix
                self._prefix = 0
