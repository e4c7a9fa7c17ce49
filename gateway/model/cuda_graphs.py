"""Decode on CUDA: fused kernels around the matmuls, one CUDA graph per batch-size bucket.

A decode step of a 7B model is about 400 small kernels. Launched from Python they would leave the
GPU idle between them, so the step is captured once per bucket (1, 2, 4, ... up to the slot count)
over static input buffers and replayed; a batch is padded up to its bucket by repeating its last
row, whose duplicate KV write stores the same values at the same place.

Everything between the matmuls is fused (gateway/kernels/triton_ops.py): residual add + RMSNorm,
RoPE + KV-cache write, attention over each slot's cache, SiLU(gate) * up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gateway.kernels.triton_ops import add_rmsnorm, decode_attention, rope_and_cache, silu_mul
from gateway.model.layers import FusedProjection

if TYPE_CHECKING:
    from gateway.model.llama import LlamaRunner

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def _project(projection: FusedProjection, x: torch.Tensor) -> torch.Tensor:
    """The fused q|k|v (or gate|up) output as one [B, total] tensor."""
    if projection.is_fused:
        return projection.parts[0](x)
    return torch.cat([part(x) for part in projection.parts], dim=-1)


class CudaGraphDecoder:
    @staticmethod
    def supports(config) -> bool:
        # The attention and RoPE kernels take power-of-two head sizes (Llama, Mistral, Qwen2,
        # SmolLM2 all are); anything else keeps the eager decode.
        return config.head_dim & (config.head_dim - 1) == 0

    def __init__(self, runner: LlamaRunner) -> None:
        self.runner = runner
        self.buckets = sorted({b for b in BUCKETS if b < runner.num_slots} | {runner.num_slots})
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    # ---- the step itself (eager; this is what gets captured) ----------------------------------

    def step(
        self, slots: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """[B] int64 device tensors -> [B, vocab] fp32 logits, writing each row's KV."""
        runner, cfg, weights = self.runner, self.runner.config, self.runner.weights
        k_cache, v_cache = runner.cache.k, runner.cache.v
        lengths = positions + 1
        hidden = F.embedding(tokens, weights.embed)
        residual = None
        for i, layer in enumerate(weights.layers):
            x, residual = add_rmsnorm(hidden, layer.input_norm, cfg.rms_norm_eps, residual)
            qkv = _project(layer.qkv, x)
            q = rope_and_cache(
                qkv, runner.cos, runner.sin, positions, slots, k_cache[i], v_cache[i],
                cfg.num_heads, cfg.num_kv_heads,
            )  # fmt: skip
            attn = decode_attention(
                q, k_cache[i], v_cache[i], slots, lengths,
                kv_len=runner.max_model_len, window=cfg.sliding_windows[i],
            )  # fmt: skip
            hidden = layer.o_proj(attn)
            x, residual = add_rmsnorm(hidden, layer.post_attention_norm, cfg.rms_norm_eps, residual)
            hidden = layer.down_proj(silu_mul(_project(layer.gate_up, x)))
        x, _ = add_rmsnorm(hidden, weights.final_norm, cfg.rms_norm_eps, residual)
        return weights.lm_head(x).float()

    # ---- graphs -------------------------------------------------------------------------------

    def capture_all(self) -> None:
        """Capture every bucket. Call before serving: warm-up steps write KV into slot 0."""
        for bucket in self.buckets:
            self._capture(bucket)

    def _capture(self, bucket: int) -> None:
        device = self.runner.device
        inputs = torch.zeros(
            (3, bucket), dtype=torch.int64, device=device
        )  # slots, tokens, positions
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # compile and autotune outside the capture
                self.step(*inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.inference_mode():
            logits = self.step(*inputs)
        self.graphs[bucket] = (graph, inputs, logits)

    def decode(
        self, slots: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Replay the bucket's graph. The returned logits are valid until the next decode."""
        batch = slots.shape[0]
        bucket = next(b for b in self.buckets if b >= batch)
        graph, inputs, logits = self.graphs[bucket]  # all captured at load: capture writes slot 0
        for row, values in enumerate((slots, tokens, positions)):
            inputs[row, :batch].copy_(values, non_blocking=True)
            if batch < bucket:
                inputs[row, batch:].copy_(values[-1:].expand(bucket - batch), non_blocking=True)
        graph.replay()
        return logits[:batch]
