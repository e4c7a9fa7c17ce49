"""Attention, RoPE and the KV write of one layer, and the elementwise ops around the matmuls.

The runner's one layer loop (gateway/model/llama.py) calls an `Ops` for everything that is not a
matmul. `TorchOps` (CPU, and GPUs whose head size the Triton kernels do not take) does it in torch:
attention gathers each sequence's blocks from the paged cache and runs SDPA. `TritonOps` (CUDA)
uses the fused kernels of gateway/kernels/triton_ops.py, so the same loop is what a CUDA graph
captures for decode.

Gemma's quirks live here too: a query scale other than 1/sqrt(head_dim), attention-score
soft-capping (which SDPA cannot do, so capped layers use `softcapped_attention`; the Triton
kernels do not cap either, so the runner keeps `TorchOps` for such models, see
`TritonOps.supports`), and a second rope table for local layers (`Geometry.rope_index`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from gateway.model.kv_cache import KVCache, fp8_round_trip
from gateway.model.layers import rms_norm
from gateway.model.rope import apply_rope
from gateway.model.step_batch import StepBatch

# (layer index, fused q|k|v projection output [T, (H + 2 * KVH) * D]) -> attention output [T, H * D]
AttendFn = Callable[[int, torch.Tensor], torch.Tensor]


class Geometry:
    """Head counts, per-layer sliding windows (None = full attention) and rope tables (index into
    the runner's stacked cos/sin), the score scale (None: 1/sqrt(head_dim)) and soft-cap."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        windows: tuple[int | None, ...],
        *,
        scale: float | None = None,
        softcap: float | None = None,
        rope_index: tuple[int, ...] | None = None,
    ) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.windows = windows
        self.gqa = num_heads != num_kv_heads
        self.scale = scale
        self.softcap = softcap
        self.rope_index = rope_index if rope_index is not None else (0,) * len(windows)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, (H + 2 KVH) D] -> q [T, H, D], k and v [T, KVH, D] (views)."""
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
        rows = qkv.shape[0]
        return q.view(rows, h, d), k.view(rows, kvh, d), v.view(rows, kvh, d)


def qk_rms_norm(
    geo: Geometry, qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """The fused q|k|v projection [T, (H + 2 KVH) D] with each q and k head RMS-normalised over
    its D values (weights [D]) and v untouched: Qwen3's q_norm/k_norm (Gemma 3's too, whose
    1 + w weights come in fp32), applied before RoPE.

    Plain torch ops on every backend, ahead of the attention function (which applies RoPE, in
    torch or in the Triton rope+cache kernel), so the eager loop and the captured CUDA graphs
    compute it the same way."""
    h, kvh, d = geo.num_heads, geo.num_kv_heads, geo.head_dim
    rows = qkv.shape[0]
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    q = rms_norm(q.reshape(rows, h, d), q_weight, eps).reshape(rows, h * d)
    k = rms_norm(k.reshape(rows, kvh, d), k_weight, eps).reshape(rows, kvh * d)
    return torch.cat([q, k, v], dim=-1)


def attention(
    geo: Geometry,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
) -> torch.Tensor:
    """SDPA over q [B, H, Tq, D] and k, v [B, KVH, Tk, D] (mask: bool [Tq, Tk], True = keep),
    with the geometry's scale and, when set, its soft-cap."""
    if geo.softcap is not None:
        return softcapped_attention(q, k, v, mask, is_causal, geo.scale, geo.softcap)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=geo.scale, enable_gqa=geo.gqa
    )


def softcapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    cap: float,
) -> torch.Tensor:
    """Attention whose scores are soft-capped, cap * tanh(scores / cap), before the mask and an
    fp32 softmax (Gemma 2). Written out because SDPA has no hook between scores and softmax."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap
    if is_causal:
        rows, cols = scores.shape[-2:]
        mask = torch.ones(rows, cols, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class TorchOps:
    name = "torch"

    def add_rmsnorm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rmsnorm(x + residual) * weight, x + residual)."""
        hidden = x if residual is None else x + residual
        return rms_norm(hidden, weight, eps), hidden

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def paged_attention(
        self,
        geo: Geometry,
        cache: KVCache,
        batch: StepBatch,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> AttendFn:
        return _TorchPagedAttention(geo, cache, batch, cos, sin)


def causal_attention(
    geo: Geometry,
    batch_size: int,
    length: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    fp8_kv: bool = False,
) -> AttendFn:
    """Attention with no cache over [batch_size, length] sequences flattened to rows (perplexity
    evaluation). cos, sin: [ropes, length, D] (the stacked tables, see Geometry.rope_index).
    `fp8_kv`: k and v go through the fp8 cache's rounding, so perplexity measures its cost."""
    device = cos.device
    query = torch.arange(length, device=device)[:, None]
    keys = torch.arange(length, device=device)[None, :]
    masks: dict[int | None, torch.Tensor | None] = {}
    for window in set(geo.windows):
        masks[window] = (
            None
            if window is None or window >= length
            else ((keys <= query) & (keys > query - window))
        )

    def attend(layer: int, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.view(batch_size, length, -1, geo.head_dim) for t in geo.split(qkv))
        rope = geo.rope_index[layer]
        q = apply_rope(q.transpose(1, 2), cos[rope], sin[rope])
        k = apply_rope(k.transpose(1, 2), cos[rope], sin[rope])
        if fp8_kv:
            k, v = fp8_round_trip(k), fp8_round_trip(v)
        mask = masks[geo.windows[layer]]
        out = attention(geo, q, k, v.transpose(1, 2), mask, mask is None)
        return out.transpose(1, 2).reshape(batch_size * length, -1)

    return attend


class _TorchPagedAttention:
    """Rotate q and k, write k and v at the batch's slots, then attend per sequence over its
    gathered blocks. Masks and block indices depend on the window only, so they are built once
    per step for each distinct window and reused by every layer."""

    def __init__(
        self, geo: Geometry, cache: KVCache, batch: StepBatch, cos: torch.Tensor, sin: torch.Tensor
    ) -> None:
        self.geo = geo
        self.cache = cache
        self.batch = batch
        # [ropes, T, 1, D]: each token's rotation in every rope table.
        self.cos = cos[:, batch.positions][:, :, None, :]
        self.sin = sin[:, batch.positions][:, :, None, :]
        self.plans = {w: self._plan(w) for w in set(geo.windows)}

    def _plan(
        self, window: int | None
    ) -> list[tuple[torch.Tensor, int, torch.Tensor | None, bool]]:
        """Per sequence: (block ids to gather, keys to keep, mask or None, is_causal)."""
        batch, block_size = self.batch, self.cache.shape.block_size
        device = batch.input_ids.device
        plans = []
        for i, start in enumerate(batch.host_starts):
            count = batch.host_query_starts[i + 1] - batch.host_query_starts[i]
            end = start + count
            first = 0 if window is None else max(0, start - window + 1) // block_size
            table = batch.host_tables[i][first : -(-end // block_size)]
            offset = first * block_size
            kept = end - offset
            mask: torch.Tensor | None = None
            causal = False
            needs_window = window is not None and start + 1 - window > offset
            if count == 1 and not needs_window:
                pass  # one query sees every kept key
            elif offset == 0 and start == 0 and (window is None or window >= end):
                causal = True
            else:
                key_pos = torch.arange(offset, end, device=device)[None, :]
                query_pos = torch.arange(start, end, device=device)[:, None]
                mask = key_pos <= query_pos
                if window is not None:
                    mask &= key_pos > query_pos - window
            index = torch.tensor(table, dtype=torch.int64, device=device)
            plans.append((index, kept, mask, causal))
        return plans

    def __call__(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        geo, batch = self.geo, self.batch
        q, k, v = geo.split(qkv)
        cos, sin = self.cos[geo.rope_index[layer]], self.sin[geo.rope_index[layer]]
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        self.cache.write(layer, batch.slot_mapping, k, v)
        d = geo.head_dim
        outs = []
        for i, (index, kept, mask, causal) in enumerate(self.plans[geo.windows[layer]]):
            lo, hi = batch.host_query_starts[i], batch.host_query_starts[i + 1]
            keys, values = self.cache.gather(layer, index, kept, q.dtype)
            out = attention(
                geo,
                q[lo:hi].transpose(0, 1)[None],
                keys.transpose(0, 1)[None],
                values.transpose(0, 1)[None],
                mask,
                causal,
            )
            outs.append(out[0].transpose(0, 1))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.reshape(q.shape[0], geo.num_heads * d)


class TritonOps:
    """The fused GPU kernels (gateway/kernels/triton_ops.py); power-of-two head sizes only, and
    no attention soft-capping."""

    name = "triton"

    def __init__(self, max_model_len: int) -> None:
        from gateway.kernels import triton_ops

        self.kernels = triton_ops
        self.max_model_len = max_model_len

    @staticmethod
    def supports(geo: Geometry) -> bool:
        return geo.head_dim & (geo.head_dim - 1) == 0 and geo.softcap is None

    def add_rmsnorm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.add_rmsnorm(x, weight, eps, residual)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.kernels.silu_mul(gate_up)

    def paged_attention(
        self,
        geo: Geometry,
        cache: KVCache,
        batch: StepBatch,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        static_kv_len: bool = False,
    ) -> AttendFn:
        kernels = self.kernels
        # A captured graph must not depend on this step's lengths: it bounds them by the context.
        kv_len = self.max_model_len if static_kv_len else batch.max_seq_len

        def attend(layer: int, qkv: torch.Tensor) -> torch.Tensor:
            k_flat, v_flat = cache.flat(layer)
            rope, window = geo.rope_index[layer], geo.windows[layer]
            kv_scales = cache.layer_scales(layer)
            q = kernels.rope_and_cache(
                qkv, cos[rope], sin[rope], batch.positions, batch.slot_mapping, k_flat, v_flat,
                geo.num_heads, geo.num_kv_heads, kv_scales=kv_scales,
            )  # fmt: skip
            if batch.decode_only:
                return kernels.paged_decode_attention(
                    q, cache.k[layer], cache.v[layer], batch.block_tables, batch.seq_lens,
                    kv_len=kv_len, window=window, scale=geo.scale, kv_scales=kv_scales,
                )  # fmt: skip
            return kernels.paged_prefill_attention(
                q, cache.k[layer], cache.v[layer], batch.block_tables, batch.query_starts,
                batch.seq_lens, max_query_len=batch.max_query_len, window=window, scale=geo.scale,
                kv_scales=kv_scales,
            )  # fmt: skip

        return attend
