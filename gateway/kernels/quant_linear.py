"""QuantLinear: a Linear layer whose weight stays GPTQ-packed, computed by a pluggable kernel.

Canonical storage (what every kernel starts from; kernels derive their own layouts at load):
- `qweight` int32 [in*bits/32, out], AutoGPTQ packing, input rows in *kernel order*: the rows of
  each quantization group are contiguous. For act-order checkpoints kernel row i is the original
  input channel `perm[i]`, so the activation is permuted (`x[:, perm]`) before the matmul.
- `scales` [groups, out] and `zeros` [groups, out] in the compute dtype; `zeros` hold the real zero
  point (AutoGPTQ v1 stores zero-1; the +1 is applied at load). w = (q - zero) * scale.
- `row_group` int64 [in] (kernel order) only when groups are not `group_size` rows each after
  sorting (unusual g_idx); otherwise row i belongs to group i // group_size and the last group may
  be short (SmolLM2: 576 inputs with group size 128).
"""

from __future__ import annotations

import torch
from torch import nn

from gateway.kernels.packing import check_bits, decode_qzeros, pack_rows, unpack_rows
from quantize.errors import UserInputError


class QuantLinear(nn.Module):
    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        *,
        bits: int,
        group_size: int,
        in_features: int,
        bias: torch.Tensor | None = None,
        perm: torch.Tensor | None = None,
        row_group: torch.Tensor | None = None,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        check_bits(bits)
        self.bits = bits
        self.in_features = in_features
        self.out_features = qweight.shape[1]
        self.group_size = group_size if group_size > 0 else in_features
        self.kernel = kernel
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)
        self.register_buffer("perm", perm)
        self.register_buffer("row_group", row_group)
        # Set by gateway.kernels.dispatch.prepare(): the object whose .matmul(x2d) computes x @ W.
        self.backend = None

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_gptq(
        cls,
        name: str,
        *,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor | None,
        bias: torch.Tensor | None,
        bits: int,
        group_size: int,
        checkpoint_format: str = "gptq",
        dtype: torch.dtype = torch.float32,
        kernel: str = "auto",
    ) -> QuantLinear:
        """Build from checkpoint tensors (any device), validating shapes; `name` prefixes errors.

        `checkpoint_format` says how zeros are stored: "gptq" (v1, zero - 1) or "gptq_v2" (zero).
        """
        check_bits(bits)
        if qweight.dtype != torch.int32 or qweight.dim() != 2:
            raise UserInputError(
                f"{name}.qweight: expected a 2-D int32 tensor, got {_desc(qweight)}"
            )
        rows, out = qweight.shape
        if (rows * 32) % bits or (bits == 3 and rows % 3):
            raise UserInputError(
                f"{name}.qweight: {rows} packed rows is not a whole number of {bits}-bit blocks"
            )
        in_features = rows * 32 // bits
        if g_idx is not None and (g_idx.dim() != 1 or g_idx.shape[0] != in_features):
            raise UserInputError(
                f"{name}.g_idx: expected shape [{in_features}] (from qweight), got {_desc(g_idx)}"
            )
        gs = group_size if group_size > 0 else in_features
        groups = -(-in_features // gs)  # the format's rule; the last group may be short
        if (
            scales.dim() != 2
            or tuple(scales.shape) != (groups, out)
            or not scales.is_floating_point()
        ):
            raise UserInputError(
                f"{name}.scales: expected a float tensor [{groups}, {out}] ({groups} groups of "
                f"{in_features} inputs at group size {group_size}), got {_desc(scales)}"
            )
        if bits == 3 and out % 32:
            raise UserInputError(
                f"{name}.qzeros: 3-bit zeros need out_features % 32 == 0, got {out}"
            )
        zero_cols = out * bits // 32
        if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (groups, zero_cols):
            raise UserInputError(
                f"{name}.qzeros: expected int32 [{groups}, {zero_cols}], got {_desc(qzeros)}"
            )
        if bias is not None and tuple(bias.shape) != (out,):
            raise UserInputError(f"{name}.bias: expected shape [{out}], got {_desc(bias)}")

        zeros = decode_qzeros(qzeros, bits, checkpoint_format)
        perm = row_group = None
        if g_idx is not None:
            g_idx = g_idx.to(torch.int64)
            if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
                raise UserInputError(
                    f"{name}.g_idx: group indices must lie in [0, {groups}), got "
                    f"[{int(g_idx.min())}, {int(g_idx.max())}]"
                )
            sorted_groups, order = torch.sort(g_idx, stable=True)
            if not torch.equal(order, torch.arange(in_features, device=order.device)):
                perm = order
                q = unpack_rows(qweight, bits).index_select(0, perm)
                qweight = pack_rows(q, bits)
            uniform = torch.arange(in_features, device=g_idx.device) // gs
            if sorted_groups.shape != uniform.shape or not torch.equal(sorted_groups, uniform):
                row_group = sorted_groups

        return cls(
            qweight.contiguous(),
            scales.to(dtype).contiguous(),
            zeros.to(dtype).contiguous(),
            bits=bits,
            group_size=gs,
            in_features=in_features,
            bias=None if bias is None else bias.to(dtype),
            perm=perm,
            row_group=row_group,
            kernel=kernel,
        )

    @classmethod
    def concat_outputs(cls, layers: list[QuantLinear]) -> QuantLinear | None:
        """One layer computing all of `layers` side by side (fused qkv, gate/up), or None when
        they do not share bits, groups and input order (then the caller keeps them separate)."""
        first = layers[0]
        for other in layers[1:]:
            if (
                other.bits != first.bits
                or other.in_features != first.in_features
                or other.group_size != first.group_size
                or not _same_optional(other.perm, first.perm)
                or not _same_optional(other.row_group, first.row_group)
                or other.scales.shape[0] != first.scales.shape[0]
            ):
                return None
        if all(layer.bias is None for layer in layers):
            bias = None
        else:
            bias = torch.cat(
                [
                    layer.bias
                    if layer.bias is not None
                    else layer.scales.new_zeros(layer.out_features)
                    for layer in layers
                ]
            )
        return cls(
            torch.cat([layer.qweight for layer in layers], dim=1),
            torch.cat([layer.scales for layer in layers], dim=1),
            torch.cat([layer.zeros for layer in layers], dim=1),
            bits=first.bits,
            group_size=first.group_size,
            in_features=first.in_features,
            bias=bias,
            perm=first.perm,
            row_group=first.row_group,
            kernel=first.kernel,
        )

    # ---- math ---------------------------------------------------------------------------------

    def dequantize_kernel_order(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [in, out] with rows in kernel order (x[:, perm] @ W is the layer's output)."""
        if self.qweight.numel() == 0:
            raise RuntimeError(
                f"{self.extra_repr()}: the weights are held only in the GPU kernel's layout"
            )
        dtype = dtype or self.scales.dtype
        weight = unpack_rows(self.qweight, self.bits).to(dtype)
        scales, zeros = self.scales.to(dtype), self.zeros.to(dtype)
        if self.row_group is not None:
            return weight.sub_(zeros[self.row_group]).mul_(scales[self.row_group])
        gs, full = self.group_size, self.in_features // self.group_size
        # Views over whole groups, then the short last group, so no [in, out] scale map is built.
        head = weight[: full * gs].view(full, gs, self.out_features)
        head.sub_(zeros[:full, None]).mul_(scales[:full, None])
        if full * gs < self.in_features:
            weight[full * gs :].sub_(zeros[full]).mul_(scales[full])
        return weight

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [in, out] in the checkpoint's original input order (x @ W + bias is the output)."""
        weight = self.dequantize_kernel_order(dtype)
        if self.perm is None:
            return weight
        original = torch.empty_like(weight)
        original[self.perm] = weight
        return original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from gateway.kernels import dispatch

        if self.backend is None:
            dispatch.prepare(self)
        lead = x.shape[:-1]
        out = self.backend.matmul(x.reshape(-1, self.in_features))
        return out.view(*lead, self.out_features)

    @property
    def packed_bytes(self) -> int:
        """Bytes of the canonical packed weight, scales, zeros, bias and perm."""
        tensors = (self.qweight, self.scales, self.zeros, self.bias, self.perm, self.row_group)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def weight_bytes(self) -> int:
        """Bytes this layer holds in memory, kernel-specific copies included."""
        extra = self.backend.extra_bytes if self.backend is not None else 0
        return self.packed_bytes + extra

    def extra_repr(self) -> str:
        backend = self.backend.name if self.backend is not None else f"{self.kernel} (unprepared)"
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, act_order={self.perm is not None}, kernel={backend}"
        )


def _same_optional(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a, b)


def _desc(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
