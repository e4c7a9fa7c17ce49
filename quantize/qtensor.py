"""The in-memory result of quantizing one Linear weight: integers, scales, zeros and g_idx.

This is what GPTQ and RTN produce and what `quantize.format` packs. Shapes follow the checkpoint
(groups x out for scales and zeros, one group index per input column) but stay unpacked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    """A weight W [out, in] stored as scales[g_idx[j], i] * (qint[i, j] - zeros[g_idx[j], i])."""

    qint: torch.Tensor  # uint8 [out, in], values 0..2**bits-1
    scales: torch.Tensor  # float32 [groups, out], every value exactly representable in fp16
    zeros: torch.Tensor  # uint8 [groups, out], values 0..2**bits-1 (the true zero point)
    g_idx: torch.Tensor  # int32 [in], group of each input column
    bits: int

    @property
    def out_features(self) -> int:
        return self.qint.shape[0]

    @property
    def in_features(self) -> int:
        return self.qint.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] the integers stand for, computed as the quantizer computed it."""
        # Gather along the input axis of [out, groups] tables: the result is [out, in] in one
        # pass (indexing [groups, out] rows and transposing is ~2x slower on a CPU).
        g = self.g_idx.long()
        scale = self.scales.float().t().contiguous().index_select(1, g)
        zero = self.zeros.float().t().contiguous().index_select(1, g)
        return (self.qint.float() - zero).mul_(scale).to(dtype)

    def split_rows(self, sizes: Sequence[int]) -> list[QuantizedWeight]:
        """Cut a fused weight (say q, k and v quantized together) back into its Linears."""
        if sum(sizes) != self.out_features:
            raise ValueError(f"row sizes {list(sizes)} do not add up to {self.out_features}")
        parts = []
        start = 0
        for size in sizes:
            stop = start + size
            parts.append(
                QuantizedWeight(
                    qint=self.qint[start:stop].contiguous(),
                    scales=self.scales[:, start:stop].contiguous(),
                    zeros=self.zeros[:, start:stop].contiguous(),
                    g_idx=self.g_idx,
                    bits=self.bits,
                )
            )
            start = stop
        return parts

    @staticmethod
    def cat_rows(parts: Sequence[QuantizedWeight]) -> QuantizedWeight:
        """The inverse of `split_rows`: row blocks quantized separately on one Hessian (so with
        the same g_idx) joined into one weight."""
        first = parts[0]
        for part in parts[1:]:
            if part.bits != first.bits or not torch.equal(part.g_idx, first.g_idx):
                raise ValueError("row blocks differ in bits or g_idx and cannot be joined")
        return QuantizedWeight(
            qint=torch.cat([p.qint for p in parts], dim=0),
            scales=torch.cat([p.scales for p in parts], dim=1),
            zeros=torch.cat([p.zeros for p in parts], dim=1),
            g_idx=first.g_idx,
            bits=first.bits,
        )

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(
            qint=self.qint.to(device),
            scales=self.scales.to(device),
            zeros=self.zeros.to(device),
            g_idx=self.g_idx.to(device),
            bits=self.bits,
        )


def row_errors(
    weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row, (W - Q) H (W - Q)^T and W H W^T: the squared output error and energy.

    With H proportional to X X^T their sums give ||(W - Q) X||^2 / ||W X||^2, the relative output
    error on the calibration inputs that GPTQ minimises, comparable across layers and methods.
    """
    h = hessian.to(device=weight.device, dtype=torch.float32)
    w = weight.float()
    e = w - approx.float()
    return ((e @ h) * e).sum(dim=1), ((w @ h) * w).sum(dim=1)
