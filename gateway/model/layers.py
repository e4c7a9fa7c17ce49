"""Small building blocks of the Llama block: RMSNorm, gated activations, a dense Linear, and
fused projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gateway.kernels import QuantLinear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Statistics in fp32 whatever the compute dtype (as transformers does), output in x's dtype.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype == torch.float32:
        # An fp32 weight (Gemma's 1 + w, see norm_weight) multiplies before the cast, as Gemma does.
        return (x32 * weight).to(x.dtype)
    return weight * x32.to(x.dtype)  # Llama: cast, then multiply


def norm_weight(weight: torch.Tensor, form: str) -> torch.Tensor:
    """The tensor an RMSNorm multiplies by: w itself ("weight"), or 1 + w in fp32
    ("one_plus_weight", Gemma), which rms_norm and the Triton kernel apply in fp32."""
    if form == "one_plus_weight":
        return weight.float() + 1.0
    return weight


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up of the fused [T, 2 * I] gate|up output (Gemma's GLU)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


class DenseLinear(nn.Module):
    """An unquantized Linear (the FP16/BF16/FP32 baseline), weight [out, in]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @property
    def weight_bytes(self) -> int:
        tensors = [self.weight] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    @classmethod
    def concat_outputs(cls, layers: list[DenseLinear]) -> DenseLinear:
        if all(layer.bias is None for layer in layers):
            bias = None
        else:
            bias = torch.cat(
                [
                    layer.bias
                    if layer.bias is not None
                    else layer.weight.new_zeros(layer.out_features)
                    for layer in layers
                ]
            )
        return cls(torch.cat([layer.weight for layer in layers]), bias)


Linear = DenseLinear | QuantLinear


class FusedProjection(nn.Module):
    """Several Linears over the same input (q/k/v, gate/up) computed as one where possible.

    One matmul instead of three halves the kernel launches in decode; when the parts cannot be
    joined (act-order checkpoints whose parts were quantized in different input orders) they run
    one after another and the result is the same.
    """

    def __init__(self, parts: list[Linear]) -> None:
        super().__init__()
        self.sizes = [part.out_features for part in parts]
        fused: Linear | None = None
        if all(isinstance(p, DenseLinear) for p in parts):
            fused = DenseLinear.concat_outputs(parts)
        elif all(isinstance(p, QuantLinear) for p in parts):
            fused = QuantLinear.concat_outputs(parts)
        self.parts = nn.ModuleList([fused] if fused is not None else parts)

    @property
    def is_fused(self) -> bool:
        return len(self.parts) == 1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.is_fused:
            return list(self.parts[0](x).split(self.sizes, dim=-1))
        return [part(x) for part in self.parts]

    @property
    def weight_bytes(self) -> int:
        return sum(part.weight_bytes for part in self.parts)
