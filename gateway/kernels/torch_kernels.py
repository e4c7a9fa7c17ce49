"""Kernels written in plain torch: the CPU path, and the GPU fallback when Triton is missing.

Each backend is built once per layer at load (`Backend(layer)`) and then only computes
`matmul(x2d) -> [M, out]`, bias included. They are pure tensor code (no host syncs, no
shape-dependent allocation beyond temporaries), so they can also sit inside a captured CUDA graph.

- `TorchUnpack` ("torch"): unpacks the int words and dequantizes on every call. No memory beyond
  the packed weight; several passes over an [in, out] temporary per call.
- `TorchDequantCache` ("torch_dequant"): dequantizes once at load and keeps a dense copy in the
  compute dtype (fp32 on CPU: 8x the bytes of a 4-bit weight), then it is a plain GEMM. Act-order
  is folded into the copy, so no activation permutation is needed.
- `TorchInt4Cpu` ("torch_int4"): torch's own CPU int4 kernel (`_weight_int4pack_mm_for_cpu`),
  which reads the 4-bit weight directly. 4 bits only, groups a multiple of 32 rows (SmolLM2's short
  last group is handled by splitting groups into kernel groups of gcd(group size, in_features)).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from gateway.kernels.packing import unpack_rows
from gateway.kernels.quant_linear import QuantLinear


class Backend(Protocol):
    name: str
    extra_bytes: int

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor: ...


class TorchUnpack:
    name = "torch"
    extra_bytes = 0

    def __init__(self, layer: QuantLinear) -> None:
        self.layer = layer

    @staticmethod
    def supports(layer: QuantLinear) -> bool:
        return True

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if layer.perm is not None:
            x2d = x2d.index_select(1, layer.perm)
        weight = layer.dequantize_kernel_order(x2d.dtype)
        if layer.bias is None:
            return x2d @ weight
        return torch.addmm(layer.bias, x2d, weight)


class TorchDequantCache:
    name = "torch_dequant"

    def __init__(self, layer: QuantLinear) -> None:
        # [out, in] in the original input order: F.linear's layout, and act-order costs nothing.
        self.weight = layer.dequantize().t().contiguous()
        self.bias = layer.bias
        self.extra_bytes = self.weight.numel() * self.weight.element_size()

    @staticmethod
    def supports(layer: QuantLinear) -> bool:
        return True

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        return F.linear(x2d, self.weight, self.bias)


_INT4_CPU_GROUPS = (256, 128, 64, 32)


def _int4_cpu_group(layer: QuantLinear) -> int | None:
    """Largest kernel group size that tiles every layer group (whole groups and the short tail)."""
    if layer.row_group is not None:
        return None
    span = math.gcd(layer.group_size, layer.in_features)
    return next((g for g in _INT4_CPU_GROUPS if span % g == 0), None)


class TorchInt4Cpu:
    name = "torch_int4"

    def __init__(self, layer: QuantLinear) -> None:
        kernel_group = _int4_cpu_group(layer)
        assert kernel_group is not None, "check supports() first"
        self.layer = layer
        self.kernel_group = kernel_group
        codes = unpack_rows(layer.qweight, 4).t().contiguous()  # [out, in], kernel order
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        # Kernel groups inherit their layer group's scale and zero. The kernel computes
        # (q - 8) * scale + offset, so offset = (8 - zero) * scale reproduces (q - zero) * scale.
        group_of_kernel_group = (
            torch.arange(layer.in_features // kernel_group, device=layer.scales.device)
            * kernel_group
        ) // layer.group_size
        scales = layer.scales[group_of_kernel_group]
        offsets = (8 - layer.zeros[group_of_kernel_group]) * scales
        self.scales_and_zeros = torch.stack([scales, offsets], dim=-1).contiguous()
        self.extra_bytes = (
            self.packed.numel() * self.packed.element_size()
            + self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()
        )

    @staticmethod
    def supports(layer: QuantLinear) -> bool:
        return (
            layer.bits == 4
            and layer.qweight.device.type == "cpu"
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and _int4_cpu_group(layer) is not None
        )

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if layer.perm is not None:
            x2d = x2d.index_select(1, layer.perm)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2d.contiguous(), self.packed, self.kernel_group, self.scales_and_zeros
        )
        if layer.bias is not None:
            out += layer.bias
        return out


TORCH_BACKENDS = {b.name: b for b in (TorchUnpack, TorchDequantCache, TorchInt4Cpu)}
