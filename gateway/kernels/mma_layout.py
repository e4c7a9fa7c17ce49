"""The tensor-core kernel's weight layout (gateway/kernels/cuda/mma_gemm.cu), made once at load.

mma.sync m16n8k16 gives lane l = 4 * g + t of a warp the weights of output column g of an n8 tile
at inputs {2t, 2t+1, 2t+8, 2t+9} of each k16 slice. `qfrag` int32 [N/8, K/128, 32, 4] stores, for
each (n8 tile, k128 step, lane), four words (one per k32 sub-block) whose nibble j is input
8 * (j % 4) + 2t + j // 4 of that sub-block: nibbles (i, i + 4) are then the two fp16 halves of B
register i, so the kernel turns a word into fragments with one lop3 per register and no shuffles.
A warp's 32 lanes read 512 contiguous bytes per tile and step.

Only 4-bit weights whose in_features and group size are multiples of 128 take this layout; the
others keep gateway/kernels/triton_layout.py's (the CUDA GEMV and Triton kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gateway.kernels.triton_layout import GpuQuantWeight

STEP_K = 128
# [n8 tile, column g, k128 step, k32 word, a, t, b] -> [tile, step, g, t, word, b, a]: input
# 8a + 2t + b of a word goes to lane 4g + t, nibble 4b + a.
_TO_FRAG = (0, 2, 1, 5, 3, 6, 4)
_ROWS_PER_CHUNK = 2048  # bounds the temporaries of a large layer (lm_head) at load


@dataclass
class FragWeight:
    qfrag: torch.Tensor  # int32 [out/8, in/128, 32, 4]
    scales: torch.Tensor  # fp16 [groups, out]
    zeros: torch.Tensor | None  # fp16 [groups, out] true zero points; None when symmetric
    perm: torch.Tensor | None  # int32 [in]: kernel input k reads activation column perm[k]
    group_size: int
    in_features: int
    out_features: int
    bias: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        tensors = (self.qfrag, self.scales, self.zeros, self.perm, self.bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def supports(bits: int, in_features: int, out_features: int, group_size: int) -> bool:
    return (
        bits == 4
        and in_features % STEP_K == 0
        and group_size % STEP_K == 0
        and in_features % group_size == 0
        and out_features % 8 == 0
    )


def frag_from_codes(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] (kernel input order, any int dtype) -> qfrag int32 [N/8, K/128, 32, 4]."""
    n, k = codes.shape
    shifts = torch.arange(0, 32, 4, device=codes.device, dtype=torch.int64)
    nibbles = codes.to(torch.int64).view(n // 8, 8, k // STEP_K, 4, 4, 4, 2).permute(_TO_FRAG)
    words = ((nibbles.reshape(n // 8, k // STEP_K, 32, 4, 8) & 0xF) << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def codes_from_frag(qfrag: torch.Tensor) -> torch.Tensor:
    """The inverse of frag_from_codes: int32 codes [N, K] in [0, 16)."""
    tiles, steps = qfrag.shape[:2]
    shifts = torch.arange(0, 32, 4, device=qfrag.device, dtype=torch.int64)
    nibbles = (qfrag.to(torch.int64)[..., None] >> shifts) & 0xF  # [tile, step, lane, word, j]
    nibbles = nibbles.view(tiles, steps, 8, 4, 4, 2, 4)  # [tile, step, g, t, word, b, a]
    inverse = [_TO_FRAG.index(d) for d in range(7)]
    return nibbles.permute(inverse).reshape(tiles * 8, steps * STEP_K).to(torch.int32)


def from_gpu_weight(w: GpuQuantWeight) -> FragWeight:
    """The fragment layout of a weight in the GEMV/Triton layout (same device)."""
    shifts = torch.arange(0, 32, 4, device=w.qweight_t.device, dtype=torch.int32)
    parts = []
    for rows in w.qweight_t.split(_ROWS_PER_CHUNK):
        codes = (rows[:, :, None] >> shifts) & 0xF  # word nibble j is input 8 * word + j
        parts.append(frag_from_codes(codes.reshape(rows.shape[0], w.in_features)))
    return FragWeight(
        qfrag=torch.cat(parts),
        scales=w.scales_t.t().contiguous(),
        zeros=None if w.zeros_t is None else w.zeros_t.t().contiguous(),
        perm=w.perm,
        group_size=w.group_size,
        in_features=w.in_features,
        out_features=w.out_features,
        bias=w.bias,
    )
