"""GPTQ matmul on tensor cores for batched decode (9 to 64 rows).

Each program dequantizes a [BLOCK_N, BLOCK_K] tile of packed weights to fp16 in registers and feeds
it to `tl.dot`, so the fp16 weights never touch HBM. Few rows leave few output tiles, so K is split
across programs (split-K) to fill the GPU. gateway/kernels/gpu_backend.py chooses between this, the
CUDA GEMV and dequantize-then-cuBLAS by row count, from measurements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gateway.kernels.triton_layout import GpuQuantWeight


@triton.jit
def _gemm_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    perm_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    KW,
    G,
    stride_xm,
    stride_om,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UNPACK_3D: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: programs that run together share weight tiles in L2.
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = qw_ptr + offs_n[:, None].to(tl.int64) * KW
    shifts = (offs_k % PACK) * BITS
    offs_w = tl.arange(0, BLOCK_K // PACK)
    offs_j = tl.arange(0, PACK)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Split-K: few rows leave too few output tiles to fill the GPU, so K is cut into SPLIT_K
    # ranges whose partial sums are added atomically into an fp32 output.
    k_tiles = tl.cdiv(K, BLOCK_K)
    k_begin = split * tl.cdiv(k_tiles, SPLIT_K) * BLOCK_K
    k_end = tl.minimum(k_begin + tl.cdiv(k_tiles, SPLIT_K) * BLOCK_K, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        if HAS_PERM:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
            kx = tl.load(perm_ptr + k, mask=k_mask, other=0)
        else:
            kx = k
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kx[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float16)
        if UNPACK_3D:
            # One vector load per word, nibbles spread by a reshape (no re-loads of a word).
            kw = k0 // PACK + offs_w
            words = tl.load(
                w_rows + kw[None, :], mask=n_mask[:, None] & (kw < KW)[None, :], other=0
            )
            q3 = (words[:, :, None] >> (offs_j * BITS)[None, None, :]) & ((1 << BITS) - 1)
            # 0x6400 is fp16 1024.0: OR-ing a value below 1024 into its mantissa gives 1024 + q
            # exactly, without an int->float conversion; the 1024 is cancelled with the zero below.
            q16 = (q3 | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            q = tl.reshape(q16, (BLOCK_N, BLOCK_K))
        else:
            # PACK neighbouring k share a word; the repeated loads hit L1.
            words = tl.load(
                w_rows + (k // PACK)[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0
            )
            q = ((words >> shifts[None, :]) & ((1 << BITS) - 1)).to(tl.float16) + 1024.0
        g = k0 // GROUP
        scale = tl.load(s_ptr + offs_n * G + g, mask=n_mask, other=0.0)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + offs_n * G + g, mask=n_mask, other=0.0) + 1024.0
        else:
            zero = tl.full([BLOCK_N], 1024 + (1 << (BITS - 1)), tl.float16)
        b = (q - zero[:, None]) * scale[:, None]
        acc = tl.dot(a, tl.trans(b), acc)
    if HAS_BIAS:  # noqa: SIM102 (constexpr outer test, run-time inner one)
        if split == 0:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    else:
        tl.atomic_add(out_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :], sem="relaxed")


def _block_k(w: GpuQuantWeight, want: int) -> int:
    # A K tile must not straddle groups (one scale per tile row) unless there is only one group.
    if w.scales_t.shape[1] == 1:
        return want
    return min(want, w.group_size)


def gemm(
    x: torch.Tensor,
    w: GpuQuantWeight,
    out: torch.Tensor | None = None,
    *,
    block_m: int = 64,
    block_n: int = 128,
    block_k: int = 64,
    group_m: int = 8,
    num_warps: int = 4,
    num_stages: int = 3,
    unpack_3d: bool = True,
    split_k: int = 1,
) -> torch.Tensor:
    """x [M, in] fp16 -> [M, out] fp16 on tensor cores."""
    if x.dim() != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"x must be [M, {w.in_features}], got {tuple(x.shape)}")
    x = x.contiguous()
    m = x.shape[0]
    if split_k > 1:
        result, out = out, torch.zeros((m, w.out_features), device=x.device, dtype=torch.float32)
    elif out is None:
        out = torch.empty((m, w.out_features), device=x.device, dtype=x.dtype)
    bk = _block_k(w, block_k)
    if w.scales_t.shape[1] > 1 and w.group_size % bk:
        raise ValueError(f"BLOCK_K {bk} must divide the group size {w.group_size}")
    grid = (triton.cdiv(m, block_m) * triton.cdiv(w.out_features, block_n), split_k)
    _gemm_kernel[grid](
        x,
        w.qweight_t,
        w.scales_t,
        w.zeros_t if w.zeros_t is not None else w.scales_t,
        w.perm if w.perm is not None else w.qweight_t,
        w.bias if w.bias is not None else w.scales_t,
        out,
        m,
        w.out_features,
        w.in_features,
        w.qweight_t.shape[1],
        w.scales_t.shape[1],
        x.stride(0),
        out.stride(0),
        BITS=w.bits,
        GROUP=w.group_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=bk,
        GROUP_M=group_m,
        HAS_ZEROS=w.zeros_t is not None,
        HAS_PERM=w.perm is not None,
        HAS_BIAS=w.bias is not None,
        UNPACK_3D=unpack_3d,
        SPLIT_K=split_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if split_k > 1:
        if result is None:
            return out.to(x.dtype)
        result.copy_(out)
        return result
    return out
