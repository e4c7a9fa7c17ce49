"""One forward step's input: the chunks of several sequences flattened into one token batch.

The engine hands the runner a list of `SeqChunk`s (a prompt chunk, or the one token a decoding
sequence sampled last); the runner flattens them so every matmul runs once over all their tokens,
and attention reads each sequence's KV through its block table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeqChunk:
    token_ids: Sequence[int]  # the tokens computed in this step
    start_pos: int  # position of token_ids[0]; positions before it are already in the cache
    block_table: Sequence[int]  # blocks covering positions 0 .. start_pos + len(token_ids) - 1
    sample: bool = True  # return the logits of the chunk's last token


@dataclass
class StepBatch:
    """Flat device tensors for one step, plus the host copies attention loops need on CPU."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: flat cache row each token's k and v go to
    block_tables: torch.Tensor  # [N, max_blocks] int32, padded with 0
    seq_lens: torch.Tensor  # [N] int32: positions in the cache after this step
    query_starts: torch.Tensor  # [N + 1] int32: chunk i is tokens query_starts[i]:[i+1]
    logits_rows: torch.Tensor  # [S] int64: the flat rows whose logits are returned
    host_starts: list[int]  # start_pos per chunk
    host_query_starts: list[int]
    host_tables: list[list[int]]
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.host_starts)

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1


def build_step_batch(
    chunks: Sequence[SeqChunk], block_size: int, device: torch.device
) -> StepBatch:
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_starts = [0]
    logits_rows: list[int] = []
    for chunk in chunks:
        count = len(chunk.token_ids)
        input_ids.extend(chunk.token_ids)
        table = chunk.block_table
        for pos in range(chunk.start_pos, chunk.start_pos + count):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        query_starts.append(query_starts[-1] + count)
        if chunk.sample:
            logits_rows.append(query_starts[-1] - 1)
    width = max(len(c.block_table) for c in chunks)
    tables = [list(c.block_table) + [0] * (width - len(c.block_table)) for c in chunks]
    seq_lens = [c.start_pos + len(c.token_ids) for c in chunks]
    pinned = device.type == "cuda"

    def tensor(values: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        host = torch.tensor(values, dtype=dtype)
        if not pinned:
            return host
        return host.pin_memory().to(device, non_blocking=True)

    return StepBatch(
        input_ids=tensor(input_ids, torch.int64),
        positions=tensor(positions, torch.int64),
        slot_mapping=tensor(slots, torch.int64),
        block_tables=tensor(tables, torch.int32),
        seq_lens=tensor(seq_lens, torch.int32),
        query_starts=tensor(query_starts, torch.int32),
        logits_rows=tensor(logits_rows, torch.int64),
        host_starts=[c.start_pos for c in chunks],
        host_query_starts=query_starts,
        host_tables=[list(c.block_table) for c in chunks],
        max_query_len=max(len(c.token_ids) for c in chunks),
        max_seq_len=max(seq_lens),
    )
