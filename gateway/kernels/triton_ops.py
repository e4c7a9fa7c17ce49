"""Fused decode-step kernels around the quantized matmuls (GPU, Triton).

A decode step is a few hundred small kernels; inside a CUDA graph each still costs a few
microseconds, so the ones that only reshuffle activations are fused: residual add + RMSNorm, RoPE +
KV-cache write, SiLU(gate) * up, and attention over each slot's cache (split along the sequence so a
single sequence still spreads over the GPU, then combined).

KV cache layout (gateway/model/kv_cache.py): per layer [slots, kv_heads, max_len, head_dim].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def _rope_cache_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    slot_ptr,
    k_cache_ptr,
    v_cache_ptr,
    q_out_ptr,
    MAX_LEN,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    # One program per (row, head) of the fused qkv output, heads ordered q | k | v.
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
    cache_off = (
        (slot * NUM_KV_HEADS + (head - NUM_HEADS) % NUM_KV_HEADS) * MAX_LEN + pos
    ) * HEAD_DIM
    if head < NUM_HEADS:
        dst = q_out_ptr + (row * NUM_HEADS + head) * HEAD_DIM
        tl.store(dst + offs, lo.to(q_out_ptr.dtype.element_ty))
        tl.store(dst + HALF + offs, hi.to(q_out_ptr.dtype.element_ty))
    elif head < NUM_HEADS + NUM_KV_HEADS:
        tl.store(k_cache_ptr + cache_off + offs, lo.to(k_cache_ptr.dtype.element_ty))
        tl.store(k_cache_ptr + cache_off + HALF + offs, hi.to(k_cache_ptr.dtype.element_ty))
    else:
        tl.store(v_cache_ptr + cache_off + offs, lo.to(v_cache_ptr.dtype.element_ty))
        tl.store(v_cache_ptr + cache_off + HALF + offs, hi.to(v_cache_ptr.dtype.element_ty))


def rope_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """Rotate q and k of one decode token per row, write k and v into the slot's cache at its
    position, and return the rotated q as [B, num_heads, head_dim].

    cos, sin: [max_len, head_dim] tables (the HF layout, halves repeated); k_cache, v_cache: one
    layer's [slots, kv_heads, max_len, head_dim].
    """
    rows = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    q = torch.empty((rows, num_heads, head_dim), device=qkv.device, dtype=qkv.dtype)
    _rope_cache_kernel[(rows, num_heads + 2 * num_kv_heads)](
        qkv.contiguous(),
        cos,
        sin,
        positions,
        slots,
        k_cache,
        v_cache,
        q,
        k_cache.shape[2],
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
    )
    return q


@triton.jit
def _attn_partial_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    len_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    scale,
    MAX_LEN,
    NUM_SPLITS,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_L: tl.constexpr,
    SPLIT_LEN: tl.constexpr,
    WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
):
    # One program per (row, kv head, split of the sequence): the GROUP query heads sharing this kv
    # head attend to keys [split * SPLIT_LEN, ...) of the row's slot with an online softmax.
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(len_ptr + row)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < GROUP
    heads = kv_head * GROUP + offs_h
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + (row * NUM_HEADS + heads)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=h_mask[:, None],
        other=0.0,
    )
    cache_base = (slot * NUM_KV_HEADS + kv_head) * MAX_LEN * HEAD_DIM
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    start = split * SPLIT_LEN
    lo = start
    if WINDOW > 0:
        lo = tl.maximum(start, length - WINDOW)
    end = tl.minimum(start + SPLIT_LEN, length)
    for pos0 in range(lo, end, BLOCK_L):
        offs_l = pos0 + tl.arange(0, BLOCK_L)
        l_mask = offs_l < end
        kv_off = cache_base + offs_l[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=l_mask[:, None], other=0.0)
        if IEEE:  # fp32 caches: full-precision dot, not TF32
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(l_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_cache_ptr + kv_off, mask=l_mask[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, axis=1)
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
    out_ptr,
    NUM_SPLITS,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row_head = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < NUM_SPLITS
    m = tl.load(m_ptr + row_head * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    denom = tl.load(l_ptr + row_head * NUM_SPLITS + offs_s, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    # Splits past the sequence end hold m = -inf and contribute nothing.
    weight = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.load(
        acc_ptr + (row_head * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_mask[:, None],
        other=0.0,
    )
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(denom * weight, axis=0)
    tl.store(out_ptr + row_head * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    *,
    kv_len: int,
    window: int | None = None,
    split_len: int = 256,
) -> torch.Tensor:
    """q [B, H, D]; one layer's caches [slots, KVH, max_len, D]; row b attends to keys
    0..lengths[b]-1 of slot slots[b] (the last `window` only, if given). `kv_len` bounds every
    length (a CUDA graph fixes it per bucket). Returns [B, H * D]."""
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    num_splits = triton.cdiv(kv_len, split_len)
    m = torch.empty((rows, num_heads, num_splits), device=q.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    acc = torch.empty((rows, num_heads, num_splits, head_dim), device=q.device, dtype=torch.float32)
    _attn_partial_kernel[(rows, num_kv_heads, num_splits)](
        q.contiguous(),
        k_cache,
        v_cache,
        slots,
        lengths,
        m,
        lsum,
        acc,
        head_dim**-0.5,
        k_cache.shape[2],
        num_splits,
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_L=64,
        SPLIT_LEN=split_len,
        WINDOW=window or 0,
        IEEE=q.dtype == torch.float32,
    )
    out = torch.empty((rows, num_heads * head_dim), device=q.device, dtype=q.dtype)
    _attn_combine_kernel[(rows * num_heads,)](
        m, lsum, acc, out, num_splits, HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits)
    )
    return out
