"""What the engine needs from a model runner, and how it gets one.

The engine owns scheduling and the block tables; the runner owns the weights and the paged KV
pool. One `execute` call computes a step: every `SeqChunk` (a prompt chunk, or the one token a
decoding sequence sampled last) writes its KV at the positions its block table maps, reads the
KV before it through the same table, and the chunks marked `sample` return their last token's
logits. gateway/model's `LlamaRunner` is one runner; tests use a scripted double.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gateway.model.step_batch import SeqChunk


class RunnerSpec(Protocol):
    vocab_size: int
    max_model_len: int
    eos_token_ids: Sequence[int]
    bos: int | None
    name: str
    quantization: Any
    num_blocks: int  # KV blocks in the pool
    block_size: int  # tokens per block


class Runner(Protocol):
    spec: RunnerSpec

    def execute(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Fp32 logits [number of chunks with sample=True, vocab], in chunk order."""
        ...


@dataclass(frozen=True)
class RunnerOptions:
    device: str
    max_model_len: int | None
    kernel: str
    kv_cache_bytes: int | None  # None: the device default (gateway/model/kv_cache.py)
    block_size: int
    max_num_seqs: int  # bounds the CUDA-graph batch buckets
    kv_cache_dtype: str = "auto"  # "auto" (the compute dtype), "fp16" or "fp8" (e4m3 + scales)
    verify_checksums: bool = True  # False: load without checking recorded tensor checksums


RunnerFactory = Callable[[str | os.PathLike[str], RunnerOptions], Runner]
