"""Fixed per-slot block tables over a runner: `prefill(slot, ...)` and `decode(slots, ...)` for
tests and runner-level benchmarks that drive sequences without the engine's scheduler.

Slot s owns blocks [s * per_slot, (s + 1) * per_slot), enough for `max_len` positions, so this is
the old static cache expressed through the paged runner's one `execute` call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gateway.model.kv_cache import DEFAULT_BLOCK_SIZE
from gateway.model.llama import LlamaRunner
from gateway.model.step_batch import SeqChunk


class SlotRunner:
    def __init__(self, runner: LlamaRunner, num_slots: int, max_len: int | None = None) -> None:
        self.runner = runner
        self.num_slots = num_slots
        self.max_len = max_len or runner.max_model_len
        per_slot = -(-self.max_len // runner.block_size)
        if num_slots * per_slot > runner.spec.num_blocks:
            raise ValueError(
                f"{num_slots} slots of {self.max_len} tokens need {num_slots * per_slot} blocks, "
                f"the pool has {runner.spec.num_blocks}"
            )
        self.tables = [list(range(s * per_slot, (s + 1) * per_slot)) for s in range(num_slots)]

    @classmethod
    def load(
        cls, path: str | Path, num_slots: int, max_model_len: int, **kwargs: Any
    ) -> SlotRunner:
        """A runner whose pool is exactly `num_slots` sequences of `max_model_len` tokens."""
        block_size = kwargs.pop("block_size", DEFAULT_BLOCK_SIZE)
        per_slot = -(-max_model_len // block_size)
        runner = LlamaRunner.load(
            path,
            max_model_len=max_model_len,
            num_blocks=num_slots * per_slot,
            block_size=block_size,
            max_num_seqs=kwargs.pop("max_num_seqs", num_slots),
            **kwargs,
        )
        return cls(runner, num_slots)

    def __getattr__(self, name: str) -> Any:
        # Everything else (spec, forward_logits, device, ...) is the runner's.
        return getattr(self.runner, name)

    def prefill(self, slot: int, token_ids: Sequence[int], start_pos: int = 0) -> torch.Tensor:
        """Logits [vocab] of the last of `token_ids`, written at start_pos.. of `slot`."""
        self._check_slot(slot)
        chunk = SeqChunk(list(token_ids), start_pos, self.tables[slot])
        return self.runner.execute([chunk])[0]

    def decode(
        self,
        slots: Sequence[int] | torch.Tensor,
        tokens: Sequence[int] | torch.Tensor,
        positions: Sequence[int] | torch.Tensor,
    ) -> torch.Tensor:
        """One token per row: tokens[b] at positions[b] of slots[b]. Returns [B, vocab]."""
        rows = [_ints(v) for v in (slots, tokens, positions)]
        if len({len(r) for r in rows}) != 1 or not rows[0]:
            raise ValueError("slots, tokens and positions must have the same non-zero length")
        if len(set(rows[0])) != len(rows[0]):
            raise ValueError(f"slots must be distinct within a decode batch, got {rows[0]}")
        for slot in rows[0]:
            self._check_slot(slot)
        chunks = [
            SeqChunk([token], pos, self.tables[slot])
            for slot, token, pos in zip(*rows, strict=True)
        ]
        return self.runner.execute(chunks)

    def free(self, slot: int) -> None:
        """Nothing to release: a slot's stale KV is never read past the positions rewritten next."""
        self._check_slot(slot)

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot must be an integer in [0, {self.num_slots}), got {slot!r}")


def _ints(values: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(values, torch.Tensor):
        return [int(v) for v in values.tolist()]
    return [int(v) for v in values]
