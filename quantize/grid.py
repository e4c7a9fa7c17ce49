"""The integer grid a group of weights is rounded onto: scale and zero point per output row.

A group of `group_size` input columns shares one (scale, zero) per output row. Weights map to
`q = clamp(round(w / scale) + zero, 0, maxq)` and back to `scale * (q - zero)`; these are the
AutoGPTQ conventions (zero is the unsigned integer that represents 0.0).

Scales are rounded to fp16 here, when they are chosen, because the checkpoint stores them in fp16:
GPTQ's error feedback must see exactly the weights the checkpoint will hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)

# Smallest positive scale that survives the trip through fp16 as a normal number.
_MIN_FP16_SCALE = 2.0**-14


@dataclass(frozen=True)
class QuantSpec:
    """How weights are rounded: bit width, grouping, symmetry and the clipping search.

    `clip_search` looks, per row and group, for the factor that shrinks the min-max range to the
    smallest rounding error (sum over the group of |q(w) - w| ** clip_norm): a coarse pass over
    factors 1.0 down to 1 - clip_max_shrink in steps of `clip_coarse_step`, then a fine pass in
    steps of `clip_fine_step` around each row's best coarse factor.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    clip_search: bool = True
    clip_max_shrink: float = 0.5
    clip_coarse_step: float = 0.04
    clip_fine_step: float = 0.01
    clip_norm: float = 2.0

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1, got {self.group_size}")
        if not 0.0 <= self.clip_max_shrink < 1.0:
            raise ValueError(f"clip_max_shrink must be in [0, 1), got {self.clip_max_shrink}")
        if not 0.0 < self.clip_fine_step <= self.clip_coarse_step:
            raise ValueError("clip steps must satisfy 0 < clip_fine_step <= clip_coarse_step")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_width(self, in_features: int) -> int:
        """Columns per group for a layer with `in_features` inputs (-1 means all of them)."""
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        """ceil(in / group_size): AutoGPTQ's count, the last group may be shorter."""
        width = self.group_width(in_features)
        return -(-in_features // width)


def quantize_to_int(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int):
    """Integers (as floats) in [0, maxq]; scale and zero broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def _range_to_params(
    xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for ranges [xmin, xmax] that contain 0 (any leading batch shape)."""
    maxq = spec.maxq
    if spec.sym:
        amax = torch.maximum(xmin.abs(), xmax)
        scale = 2.0 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        scale = (xmax - xmin) / maxq
        zero = torch.round(-xmin / scale.clamp_min(_MIN_FP16_SCALE))
    # A group of zeros gets any valid scale: every weight maps to `zero` and back to 0.0.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.clamp_min(_MIN_FP16_SCALE).to(torch.float16).to(scale.dtype)
    if not spec.sym:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero


def _clip_errors(
    w: torch.Tensor,
    xmin: torch.Tensor,
    xmax: torch.Tensor,
    factors: torch.Tensor,
    spec: QuantSpec,
    column_weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rounding error, scale and zero for each factor [k, rows] (or [k, 1]) and row: [k, rows].

    Rows are processed in chunks so that the [k, rows, cols] temporaries stay in cache on CPU.
    """
    k = factors.shape[0]
    rows, cols = w.shape
    budget = (1 << 26) if w.is_cuda else (1 << 17)
    step = max(1, budget // max(1, k * cols))
    errs, scales, zeros = [], [], []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        f = factors if factors.shape[1] == 1 else factors[:, r0:r1]
        scale, zero = _range_to_params(f * xmin[r0:r1], f * xmax[r0:r1], spec)
        s3, z3 = scale.unsqueeze(-1), zero.unsqueeze(-1)
        wc = w[r0:r1]
        err = quantize_to_int(wc, s3, z3, spec.maxq).sub_(z3).mul_(s3).sub_(wc).abs_()
        if spec.clip_norm == 2.0:
            err.mul_(err)
        else:
            err.pow_(spec.clip_norm)
        if column_weight is not None:
            err.mul_(column_weight)
        errs.append(err.sum(dim=-1))
        scales.append(scale)
        zeros.append(zero)
    return torch.cat(errs, dim=1), torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


def _pick(err: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per row, the entries of `values` [k, rows] at the k with the smallest error."""
    best = err.argmin(dim=0, keepdim=True)
    return tuple(v.gather(0, best).squeeze(0) for v in (err, *values))


def find_group_params(
    w: torch.Tensor, spec: QuantSpec, column_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero), each of shape [rows], for the weights w [rows, cols] of one group.

    Without the clipping search this is the min-max grid of the GPTQ reference code (made truly
    symmetric). With it, each row's range is shrunk to the factor with the smallest error.
    """
    w = w.float()
    zeros = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zeros)
    xmax = torch.maximum(w.max(dim=1).values, zeros)
    if spec.sym:
        amax = torch.maximum(xmin.abs(), xmax)
        xmin, xmax = -amax, amax
    if not spec.clip_search or spec.clip_max_shrink == 0.0:
        return _range_to_params(xmin, xmax, spec)

    lowest = 1.0 - spec.clip_max_shrink
    n_coarse = round(spec.clip_max_shrink / spec.clip_coarse_step)
    coarse = 1.0 - spec.clip_coarse_step * torch.arange(
        n_coarse + 1, dtype=w.dtype, device=w.device
    )
    coarse = coarse.clamp_min(lowest).unsqueeze(1)
    err, scale, zero = _clip_errors(w, xmin, xmax, coarse, spec, column_weight)
    best_err, best_scale, best_zero, best_f = _pick(err, scale, zero, coarse.expand_as(err))

    n_fine = round(spec.clip_coarse_step / spec.clip_fine_step)
    offsets = spec.clip_fine_step * torch.arange(
        -n_fine + 1, n_fine, dtype=w.dtype, device=w.device
    )
    offsets = offsets[offsets != 0].unsqueeze(1)
    fine = (best_f.unsqueeze(0) + offsets).clamp(lowest, 1.0)
    err, scale, zero = _clip_errors(w, xmin, xmax, fine, spec, column_weight)
    fine_err, fine_scale, fine_zero = _pick(err, scale, zero)
    better = fine_err < best_err
    return torch.where(better, fine_scale, best_scale), torch.where(better, fine_zero, best_zero)
