"""The GPU kernels' weight layout, made once at load time from a QuantLinear.

QuantLinear keeps GPTQ's `qweight` int32 [in/pack, out] (input rows already in kernel order for
act-order checkpoints): each word packs `pack = 32 // bits` consecutive input channels of one
output channel. The GPU kernels read one output channel's words contiguously, so their layout is
the transpose, int32 [out, in/pack], with scales as [out, groups]. Symmetric checkpoints (every
zero point 2**(bits-1)) carry no zeros tensor at all: the kernels subtract the constant, which saves
VRAM and a load per group. Act-order layers keep `perm`: kernel input k reads activation perm[k].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gateway.kernels.packing import unpack_rows
from gateway.kernels.quant_linear import QuantLinear


@dataclass
class GpuQuantWeight:
    qweight_t: torch.Tensor  # int32 [out, in // pack]
    scales_t: torch.Tensor  # fp16 [out, groups]
    zeros_t: torch.Tensor | None  # fp16 [out, groups] true zero points; None when symmetric
    perm: torch.Tensor | None  # int32 [in]: kernel input k reads activation column perm[k]
    bits: int
    group_size: int  # effective: in_features when the checkpoint says -1
    in_features: int
    out_features: int
    bias: torch.Tensor | None = None  # fp16 [out]

    @property
    def sym_zero(self) -> int:
        return 1 << (self.bits - 1)


def from_layer(layer: QuantLinear) -> GpuQuantWeight:
    """The kernel layout of a 4- or 8-bit QuantLinear whose groups are regular."""
    sym_zero = 1 << (layer.bits - 1)
    symmetric = bool((layer.zeros == sym_zero).all())
    return GpuQuantWeight(
        qweight_t=layer.qweight.t().contiguous(),
        scales_t=layer.scales.to(torch.float16).t().contiguous(),
        zeros_t=None if symmetric else layer.zeros.to(torch.float16).t().contiguous(),
        perm=None if layer.perm is None else layer.perm.to(torch.int32),
        bits=layer.bits,
        group_size=layer.group_size,
        in_features=layer.in_features,
        out_features=layer.out_features,
        bias=None if layer.bias is None else layer.bias.to(torch.float16),
    )


def dequantize_reference(w: GpuQuantWeight) -> torch.Tensor:
    """fp32 [out, in] in the ORIGINAL input-channel order (tests and benchmark checks)."""
    vals = unpack_rows(w.qweight_t.t().contiguous(), w.bits).t().float()  # [out, in] kernel order
    group_of_k = torch.arange(w.in_features, device=vals.device) // w.group_size
    scales = w.scales_t.float()[:, group_of_k]
    zeros = (
        torch.full_like(scales, float(w.sym_zero))
        if w.zeros_t is None
        else w.zeros_t.float()[:, group_of_k]
    )
    dense = (vals - zeros) * scales
    if w.perm is None:
        return dense
    out = torch.empty_like(dense)
    out[:, w.perm.long()] = dense
    return out
