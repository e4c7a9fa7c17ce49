"""What the engine needs from a model runner (gateway/model/llama.py's `LlamaRunner` is one).

The engine owns scheduling; the runner owns weights and the per-slot KV cache. A slot holds one
sequence; `prefill` writes prompt tokens from `start_pos` on (so long prompts can be chunked) and
returns the logits of its last token; `decode` appends one token to each listed slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch


class RunnerSpec(Protocol):
    vocab_size: int
    max_model_len: int
    eos_token_ids: Sequence[int]
    bos: int | None
    name: str
    quantization: Any


class Runner(Protocol):
    spec: RunnerSpec
    num_slots: int

    def prefill(self, slot: int, token_ids: Sequence[int], start_pos: int = 0) -> torch.Tensor:
        """Fp32 logits [vocab] of the last token of `token_ids`."""
        ...

    def decode(
        self, slots: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Fp32 logits [B, vocab]: token i is written at positions[i] of slot slots[i]."""
        ...

    def free(self, slot: int) -> None: ...
