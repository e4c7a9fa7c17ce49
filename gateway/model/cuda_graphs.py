"""Decode-only steps on CUDA: the runner's one layer loop captured once per batch-size bucket.

A decode step of a 7B model is about 400 small kernels. Launched from Python they would leave the
GPU idle between them, so `LlamaRunner.forward_step` is captured per bucket (1, 2, 4, ... up to
max_num_seqs) over static input buffers (token ids, positions, slot mapping, block tables, lengths)
and replayed; a batch is padded up to its bucket by repeating its last row, whose duplicate KV
write stores the same values at the same place. Attention bounds every length by the context
length, so one graph serves any mix of sequence lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gateway.model.step_batch import SeqChunk, StepBatch

if TYPE_CHECKING:
    from gateway.model.llama import LlamaRunner

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class CudaGraphDecoder:
    def __init__(self, runner: LlamaRunner, max_num_seqs: int) -> None:
        self.runner = runner
        self.buckets = sorted({b for b in BUCKETS if b < max_num_seqs} | {max_num_seqs})
        self.table_width = -(-runner.max_model_len // runner.block_size)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, StepBatch, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self._host: dict[int, _HostInputs] = {}
        self._uploaded = torch.cuda.Event()

    def _static_batch(self, bucket: int) -> StepBatch:
        device = self.runner.device
        zeros = torch.zeros(bucket, dtype=torch.int64, device=device)
        return StepBatch(
            input_ids=zeros.clone(),
            positions=zeros.clone(),
            slot_mapping=zeros.clone(),
            block_tables=torch.zeros((bucket, self.table_width), dtype=torch.int32, device=device),
            seq_lens=torch.ones(bucket, dtype=torch.int32, device=device),
            query_starts=torch.arange(bucket + 1, dtype=torch.int32, device=device),
            logits_rows=torch.arange(bucket, dtype=torch.int64, device=device),
            host_starts=[0] * bucket,
            host_query_starts=list(range(bucket + 1)),
            host_tables=[[0]] * bucket,
            max_query_len=1,
            max_seq_len=self.runner.max_model_len,
        )

    def capture_all(self) -> None:
        """Capture every bucket. Call before serving: capture writes KV into block 0."""
        for bucket in self.buckets:
            self._capture(bucket)

    def _capture(self, bucket: int) -> None:
        device = self.runner.device
        batch = self._static_batch(bucket)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # compile and autotune outside the capture
                self.runner.forward_step(batch, static_kv_len=True)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.inference_mode():
            logits = self.runner.forward_step(batch, static_kv_len=True)
        self.graphs[bucket] = (graph, batch, logits)

    def decode(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        """Replay the bucket's graph for one-token chunks (all sampled). The returned logits are
        valid until the next decode."""
        rows = len(chunks)
        bucket = next((b for b in self.buckets if b >= rows), None)
        if bucket is None:  # more rows than max_num_seqs: the engine never does this
            raise ValueError(f"{rows} decode rows exceed the largest graph bucket {bucket}")
        graph, batch, logits = self.graphs[bucket]
        host = self._host_inputs(bucket)
        # The previous step's uploads read these pinned buffers: wait for them before rewriting.
        self._uploaded.synchronize()
        block_size = self.runner.block_size
        scalars, lens, tables = host.scalars.numpy(), host.lens.numpy(), host.tables.numpy()
        padded = list(chunks) + [chunks[-1]] * (bucket - rows)
        for row, chunk in enumerate(padded):
            pos = chunk.start_pos
            table = chunk.block_table
            scalars[0, row] = chunk.token_ids[0]
            scalars[1, row] = pos
            scalars[2, row] = table[pos // block_size] * block_size + pos % block_size
            lens[row] = pos + 1
            # Entries past the sequence's blocks are never read (attention stops at its length).
            tables[row, : len(table)] = table
        batch.input_ids.copy_(host.scalars[0], non_blocking=True)
        batch.positions.copy_(host.scalars[1], non_blocking=True)
        batch.slot_mapping.copy_(host.scalars[2], non_blocking=True)
        batch.seq_lens.copy_(host.lens, non_blocking=True)
        batch.block_tables.copy_(host.tables, non_blocking=True)
        self._uploaded.record()
        graph.replay()
        return logits[:rows]

    def _host_inputs(self, bucket: int) -> _HostInputs:
        """Pinned staging buffers per bucket, allocated once (pinning memory is slow)."""
        host = self._host.get(bucket)
        if host is None:
            host = _HostInputs(
                torch.zeros((3, bucket), dtype=torch.int64).pin_memory(),
                torch.zeros(bucket, dtype=torch.int32).pin_memory(),
                torch.zeros((bucket, self.table_width), dtype=torch.int32).pin_memory(),
            )
            self._host[bucket] = host
        return host


@dataclass(frozen=True)
class _HostInputs:
    scalars: torch.Tensor  # [3, bucket] int64: token ids, positions, slot mapping
    lens: torch.Tensor  # [bucket] int32 sequence lengths after the step
    tables: torch.Tensor  # [bucket, table_width] int32 block tables
