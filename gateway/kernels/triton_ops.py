"""Fused decode-step kernels around the quantized matmuls (GPU, Triton).

A decode step is a few hundred small kernels; inside a CUDA graph each still costs a few
microseconds, so the ones that only reshuffle activations are fused: residual add + RMSNorm, RoPE +
KV-cache write, SiLU(gate) * up, and attention over the paged cache: for decode split along the
sequence so a single sequence still spreads over the GPU, then combined; for prompt chunks (and the
decode rows batched with them) one tile of queries per program, causal from each chunk's start.

Paged KV cache layout (gateway/model/kv_cache.py): per layer [num_blocks, block_size, kv_heads,
head_dim]; a token's flat row is block * block_size + offset, and a sequence's blocks come from
its row of the block table. An fp8 cache's scales are [num_blocks, kv_heads, block_size] per
layer (`_scale_index`), so the scales of one head's keys in a block are contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gateway.model.kv_cache import FP8_MAX

_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    H,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    h = tl.load(x_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(res_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(res_out_ptr + row * H + offs, h.to(res_out_ptr.dtype.element_ty), mask=mask)
    inv = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / H + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * H + offs, (h * inv * w).to(out_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rmsnorm(x + residual) * weight, x + residual); without residual, (norm(x), x)."""
    x = x.contiguous()
    rows, hidden = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    _add_rmsnorm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        res_out,
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=triton.next_power_of_2(hidden),
    )
    return out, res_out


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, INTER, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    gate = tl.load(gu_ptr + row * 2 * INTER + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * 2 * INTER + INTER + offs, mask=mask, other=0.0).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * INTER + offs, act.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[B, 2I] laid out gate | up -> silu(gate) * up, [B, I]."""
    rows, double = gate_up.shape
    inter = double // 2
    out = torch.empty((rows, inter), device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](
        gate_up.contiguous(), out, inter, BLOCK=block
    )
    return out


@triton.jit
def _scale_index(slot, kv_head, NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    # The fp8 scale of (flat cache row `slot`, kv head) in a [num_blocks, kv_heads, block_size]
    # layer: a block's scales are grouped by head, so a run of keys reads whole sectors.
    return (slot // BLOCK_SIZE * NUM_KV_HEADS + kv_head) * BLOCK_SIZE + slot % BLOCK_SIZE


@triton.jit
def _rope_cache_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    slot_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    q_out_ptr,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr,
):
    # One program per (token, head) of the fused qkv output, heads ordered q | k | v.
    row = tl.program_id(0)
    head = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    width = (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    pos = tl.load(pos_ptr + row)
    offs = tl.arange(0, HALF)
    base = qkv_ptr + row * width + head * HEAD_DIM
    lo = tl.load(base + offs).to(tl.float32)
    hi = tl.load(base + HALF + offs).to(tl.float32)
    if head < NUM_HEADS + NUM_KV_HEADS:
        # rotate_half convention (Hugging Face Llama): pairs (i, i + HEAD_DIM/2).
        cos = tl.load(cos_ptr + pos * HEAD_DIM + offs).to(tl.float32)
        sin = tl.load(sin_ptr + pos * HEAD_DIM + offs).to(tl.float32)
        lo, hi = lo * cos - hi * sin, hi * cos + lo * sin
    slot = tl.load(slot_ptr + row).to(tl.int64)
    kv_head = (head - NUM_HEADS) % NUM_KV_HEADS
    head_row = slot * NUM_KV_HEADS + kv_head
    scale_at = _scale_index(slot, kv_head, NUM_KV_HEADS, BLOCK_SIZE)
    if head < NUM_HEADS:
        dst = q_out_ptr + (row * NUM_HEADS + head) * HEAD_DIM
        tl.store(dst + offs, lo.to(q_out_ptr.dtype.element_ty))
        tl.store(dst + HALF + offs, hi.to(q_out_ptr.dtype.element_ty))
    elif head < NUM_HEADS + NUM_KV_HEADS:
        _store_head(k_cache_ptr, k_scale_ptr + scale_at, head_row, offs, lo, hi, HEAD_DIM, FP8)
    else:
        _store_head(v_cache_ptr, v_scale_ptr + scale_at, head_row, offs, lo, hi, HEAD_DIM, FP8)


@triton.jit
def _store_head(
    cache_ptr, scale_ptr, head_row, offs, lo, hi, HEAD_DIM: tl.constexpr, FP8: tl.constexpr
):
    # One kv head's two halves at its flat cache row; fp8: divided by the head's scale (stored at
    # scale_ptr), which maps its amax to e4m3's largest value (kv_cache.quantize_kv does the same).
    if FP8:
        amax = tl.maximum(tl.max(tl.abs(lo), axis=0), tl.max(tl.abs(hi), axis=0))
        scale = tl.maximum(amax / _FP8_MAX, 1e-12)
        tl.store(scale_ptr, scale)
        lo = lo / scale
        hi = hi / scale
    dst = cache_ptr + head_row * HEAD_DIM
    tl.store(dst + offs, lo.to(cache_ptr.dtype.element_ty))
    tl.store(dst + HEAD_DIM // 2 + offs, hi.to(cache_ptr.dtype.element_ty))


def rope_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Rotate q and k of each token, write k and v at the token's flat cache row, and return the
    rotated q as [T, num_heads, head_dim].

    qkv: [T, (H + 2 KVH) D]; cos, sin: [max_len, head_dim] tables (the HF layout, halves
    repeated); positions, slot_mapping: [T]; k_cache, v_cache: one layer's flat
    [num_blocks * block_size, kv_heads, head_dim] views; kv_scales: an fp8 cache's k and v scales
    [num_blocks, kv_heads, block_size], written beside the values.
    """
    rows = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    block_size = kv_scales[0].shape[-1] if kv_scales is not None else 1
    q = torch.empty((rows, num_heads, head_dim), device=qkv.device, dtype=qkv.dtype)
    _rope_cache_kernel[(rows, num_heads + 2 * num_kv_heads)](
        qkv.contiguous(),
        cos,
        sin,
        positions,
        slot_mapping,
        k_cache,
        v_cache,
        *(kv_scales if kv_scales is not None else (k_cache, v_cache)),  # unread unless FP8
        q,
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        FP8=kv_scales is not None,
    )
    return q


@triton.jit
def _attn_partial_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    table_ptr,
    len_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    scale,
    TABLE_WIDTH,
    NUM_SPLITS,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_L: tl.constexpr,
    SPLIT_LEN: tl.constexpr,
    WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
    FP8: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    # One program per (row, kv head, split of the sequence): the GROUP query heads sharing this kv
    # head attend to keys [split * SPLIT_LEN, ...) of the row's sequence with an online softmax.
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(len_ptr + row)
    start = split * SPLIT_LEN
    lo = start
    if WINDOW > 0:
        lo = tl.maximum(start, length - WINDOW)
    end = tl.minimum(start + SPLIT_LEN, length)
    # A CUDA graph launches splits for the whole context; those past the sequence (or before its
    # window) store nothing, and the combine kernel skips them by the same rule.
    if lo < end:
        offs_h = tl.arange(0, BLOCK_H)
        h_mask = offs_h < GROUP
        heads = kv_head * GROUP + offs_h
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(
            q_ptr + (row * NUM_HEADS + heads)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=h_mask[:, None],
            other=0.0,
        )
        table = table_ptr + row.to(tl.int64) * TABLE_WIDTH
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
        for pos0 in range(lo, end, BLOCK_L):
            offs_l = pos0 + tl.arange(0, BLOCK_L)
            l_mask = offs_l < end
            block = tl.load(table + offs_l // BLOCK_SIZE, mask=l_mask, other=0).to(tl.int64)
            cache_row = block * BLOCK_SIZE + offs_l % BLOCK_SIZE
            head_row = cache_row * NUM_KV_HEADS + kv_head
            scale_at = _scale_index(cache_row, kv_head, NUM_KV_HEADS, BLOCK_SIZE)
            kv_off = head_row[:, None] * HEAD_DIM + offs_d[None, :]
            k = tl.load(k_cache_ptr + kv_off, mask=l_mask[:, None], other=0.0)
            if FP8:  # e4m3 values times a scale per key: scale the scores, not the tile
                k = k.to(q.dtype)
            if not USE_DOT:  # few query heads per kv head: fp32 products, no padded mma rows
                s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], 2) * scale
            elif IEEE:  # fp32 caches: full-precision dot, not TF32
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            if FP8:
                s = s * tl.load(k_scale_ptr + scale_at, mask=l_mask, other=0.0)[None, :]
            s = tl.where(l_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_cache_ptr + kv_off, mask=l_mask[:, None], other=0.0)
            if FP8:  # weights times each value row's scale; the denominator above stays unscaled
                v = v.to(q.dtype)
                p = p * tl.load(v_scale_ptr + scale_at, mask=l_mask, other=0.0)[None, :]
            if not USE_DOT:
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
            elif IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        part = (row * NUM_HEADS + heads) * NUM_SPLITS + split
        tl.store(m_ptr + part, m_i, mask=h_mask)
        tl.store(l_ptr + part, l_i, mask=h_mask)
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=h_mask[:, None])


@triton.jit
def _attn_combine_kernel(
    m_ptr,
    l_ptr,
    acc_ptr,
    len_ptr,
    out_ptr,
    NUM_SPLITS,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLIT_LEN: tl.constexpr,
    WINDOW: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row_head = tl.program_id(0)
    length = tl.load(len_ptr + row_head // NUM_HEADS)
    first = 0
    if WINDOW > 0:
        first = tl.maximum(length - WINDOW, 0) // SPLIT_LEN
    offs_s = tl.arange(0, BLOCK_S)
    # Exactly the splits the partial kernel wrote (see its rule).
    s_mask = (offs_s >= first) & (offs_s < tl.cdiv(length, SPLIT_LEN)) & (offs_s < NUM_SPLITS)
    m = tl.load(m_ptr + row_head * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    denom = tl.load(l_ptr + row_head * NUM_SPLITS + offs_s, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    weight = tl.where(s_mask, tl.exp(m - m_max), 0.0)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.load(
        acc_ptr + (row_head * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_mask[:, None],
        other=0.0,
    )
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(denom * weight, axis=0)
    tl.store(out_ptr + row_head * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True)
class DecodeAttentionConfig:
    """Launch shape of the decode attention's partial kernel: keys per loop step, warps,
    pipeline stages, and from how many query heads per kv head the scores use tl.dot (below it,
    fp32 products: an mma would pad the heads to 16 rows)."""

    block_l: int = 64
    num_warps: int = 4
    num_stages: int = 3
    dot_min_group: int = 1


DECODE_ATTENTION = DecodeAttentionConfig()


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    kv_len: int,
    window: int | None = None,
    split_len: int = 256,
    scale: float | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: DecodeAttentionConfig | None = None,
) -> torch.Tensor:
    """q [B, H, D]; one layer's caches [num_blocks, block_size, KVH, D]; row b attends to
    positions 0..seq_lens[b]-1 of its sequence, whose blocks are block_tables[b] (the last
    `window` only, if given). `kv_len` bounds every length (a CUDA graph fixes it to the context
    length). Scores are scaled by `scale` (None: 1/sqrt(D)). `kv_scales`: an fp8 cache's k and
    v scales [num_blocks, KVH, block_size]. `config`: launch shape (None: DECODE_ATTENTION).
    Returns [B, H * D]."""
    rows, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    cfg = config or DECODE_ATTENTION
    use_dot = group >= cfg.dot_min_group
    num_splits = triton.cdiv(kv_len, split_len)
    m = torch.empty((rows, num_heads, num_splits), device=q.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    acc = torch.empty((rows, num_heads, num_splits, head_dim), device=q.device, dtype=torch.float32)
    _attn_partial_kernel[(rows, num_kv_heads, num_splits)](
        q.contiguous(),
        k_cache,
        v_cache,
        *(kv_scales if kv_scales is not None else (k_cache, v_cache)),  # unread unless FP8
        block_tables,
        seq_lens,
        m,
        lsum,
        acc,
        head_dim**-0.5 if scale is None else scale,
        block_tables.shape[1],
        num_splits,
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        GROUP=group,
        BLOCK_H=max(16 if use_dot else 1, triton.next_power_of_2(group)),  # an mma needs 16
        BLOCK_L=cfg.block_l,
        SPLIT_LEN=split_len,
        WINDOW=window or 0,
        IEEE=q.dtype == torch.float32,
        FP8=kv_scales is not None,
        USE_DOT=use_dot,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    out = torch.empty((rows, num_heads * head_dim), device=q.device, dtype=q.dtype)
    _attn_combine_kernel[(rows * num_heads,)](
        m, lsum, acc, seq_lens, out, num_splits,
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, SPLIT_LEN=split_len, WINDOW=window or 0,
        BLOCK_S=triton.next_power_of_2(num_splits),
    )  # fmt: skip
    return out


@triton.jit
def _prefill_attn_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    table_ptr,
    query_start_ptr,
    len_ptr,
    out_ptr,
    scale,
    TABLE_WIDTH,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
    FP8: tl.constexpr,
):
    # One program per (sequence, tile of BLOCK_M of its queries, query head). The chunk's queries
    # sit at positions seq_len - q_len .. seq_len - 1; query j sees keys up to its own position.
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    q_first = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_first
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(len_ptr + seq)
    ctx = seq_len - q_len  # positions already cached before this chunk
    kv_head = head // (NUM_HEADS // NUM_KV_HEADS)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    q_pos = ctx + offs_m
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = (q_first + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + (q_rows * NUM_HEADS + head)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=m_mask[:, None],
        other=0.0,
    )
    table = table_ptr + seq.to(tl.int64) * TABLE_WIDTH
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    last = tl.minimum(ctx + tile * BLOCK_M + BLOCK_M, seq_len)  # past the tile's last query
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(0, ctx + tile * BLOCK_M - WINDOW + 1)
        lo = lo // BLOCK_N * BLOCK_N
    for pos0 in range(lo, last, BLOCK_N):
        offs_n = pos0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < last
        block = tl.load(table + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        cache_row = block * BLOCK_SIZE + offs_n % BLOCK_SIZE
        head_row = cache_row * NUM_KV_HEADS + kv_head
        scale_at = _scale_index(cache_row, kv_head, NUM_KV_HEADS, BLOCK_SIZE)
        kv_off = head_row[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=n_mask[:, None], other=0.0)
        if FP8:  # as in the decode kernel: scale the scores by each key's scale
            k = k.to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        if FP8:
            s = s * tl.load(k_scale_ptr + scale_at, mask=n_mask, other=0.0)[None, :]
        visible = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            visible = visible & (offs_n[None, :] > q_pos[:, None] - WINDOW)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with nothing visible yet keep m = -inf; exp(-inf - -inf) would be NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + kv_off, mask=n_mask[:, None], other=0.0)
        if FP8:
            v = v.to(q.dtype)
            p = p * tl.load(v_scale_ptr + scale_at, mask=n_mask, other=0.0)[None, :]
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + (q_rows * NUM_HEADS + head)[:, None] * HEAD_DIM + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None],
    )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    max_query_len: int,
    window: int | None = None,
    scale: float | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention for a step's chunks: q [T, H, D], chunk i's queries are rows
    query_starts[i]:query_starts[i+1] at the last positions before seq_lens[i] of its sequence
    (whose k and v, these queries' included, are already in the cache). Scores are scaled by
    `scale` (None: 1/sqrt(D)); `kv_scales` as in paged_decode_attention. Returns [T, H * D]."""
    tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    block_m = 16 if max_query_len <= 16 else 64
    out = torch.empty((tokens, num_heads * head_dim), device=q.device, dtype=q.dtype)
    grid = (num_seqs, triton.cdiv(max_query_len, block_m), num_heads)
    _prefill_attn_kernel[grid](
        q.contiguous(),
        k_cache,
        v_cache,
        *(kv_scales if kv_scales is not None else (k_cache, v_cache)),  # unread unless FP8
        block_tables,
        query_starts,
        seq_lens,
        out,
        head_dim**-0.5 if scale is None else scale,
        block_tables.shape[1],
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=64,
        WINDOW=window or 0,
        IEEE=q.dtype == torch.float32,
        FP8=kv_scales is not None,
    )
    return out
