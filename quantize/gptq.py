"""GPTQ for one weight matrix (Frantar et al., 2022), and round-to-nearest as its baseline.

GPTQ rounds the columns of W [out, in] one at a time (in Hessian order with act-order) and spreads
each column's rounding error over the columns not yet rounded, weighted by the inverse Hessian of
the layer's inputs, so that the layer's *output* error stays small. Rows are independent given the
Hessian, so Linears that share an input (q/k/v, gate/up) are quantized as one fused matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from quantize.grid import QuantSpec, dequantize_int, find_group_params, quantize_to_int
from quantize.qtensor import QuantizedWeight, row_errors

DEFAULT_BLOCK_SIZE = 128


@dataclass(frozen=True)
class GPTQOptions:
    """The algorithm's knobs besides the grid (see QuantSpec for bits, groups and clipping)."""

    damp_percent: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    block_size: int = DEFAULT_BLOCK_SIZE
    # Weight the clipping search's error by the Hessian diagonal (input energy per column).
    hessian_weighted_clip: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.damp_percent < 1.0:
            raise ValueError(f"damp_percent must be in (0, 1), got {self.damp_percent}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")


@dataclass
class QuantizationResult:
    quantized: QuantizedWeight
    weight: torch.Tensor  # the dequantized weight [out, in], float32, on the input's device
    damp: float  # the damping actually added (relative to mean diag), after any retries
    # Per output row: (W - Q) H (W - Q)^T and W H W^T, when a Hessian was given.
    row_error: torch.Tensor | None = None
    row_energy: torch.Tensor | None = None

    def rel_error(self, rows: slice = slice(None)) -> float:
        """||(W - Q) X||^2 / ||W X||^2 over the calibration inputs, for a range of rows."""
        if self.row_error is None or self.row_energy is None:
            return float("nan")
        den = float(self.row_energy[rows].sum())
        return float(self.row_error[rows].sum()) / den if den > 0 else 0.0


def _block_size(group_width: int, columns: int, requested: int) -> int:
    """A block size whose blocks never split a group that starts inside them.

    Groups narrower than a block must tile it; groups as wide as or wider than a block must start
    on block boundaries. Either way a group's parameters are found on up-to-date weights.
    """
    if group_width >= columns:
        return requested
    if group_width <= requested:
        return group_width * max(1, requested // group_width)
    if group_width % requested == 0:
        return requested
    return group_width


def _inverse_hessian_cholesky(
    hessian: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor | None, damp_percent: float
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), in processing order, after damping.

    Computed in float64 without forming H^-1: with J the reversal permutation and J H J = L L^T,
    H = R R^T for the upper triangular R = J L J, so U = R^-1 = J L^-1 J: one Cholesky and one
    triangular solve. The reversal is folded into the act-order permutation, and no more than
    three n x n float64 matrices are alive at once (1 GB each for a 7B down_proj). A damped
    Hessian can still fail to factor in finite precision (nearly collinear inputs), so the damping
    grows tenfold until it does rather than failing the whole run.
    """
    n = hessian.shape[0]
    order = perm if perm is not None else torch.arange(n, device=hessian.device)
    reverse = order.flip(0)
    flipped = hessian.to(torch.float64).index_select(0, reverse).index_select(1, reverse)
    diagonal = flipped.diagonal()
    diagonal[dead[reverse]] = 1.0  # inputs that never fire
    mean_diag = float(diagonal.mean())
    damp, added = damp_percent, 0.0
    for _ in range(6):
        diagonal.add_((damp - added) * mean_diag)
        added = damp
        lower, info = torch.linalg.cholesky_ex(flipped)
        if int(info) == 0:
            del flipped, diagonal
            eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
            inverse = torch.linalg.solve_triangular(lower, eye, upper=False)
            del lower, eye
            return torch.flip(inverse, (0, 1)), damp
        del lower
        damp *= 10.0
    raise RuntimeError(f"the Hessian is not positive definite even with damping {added:g}")


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, options: GPTQOptions
) -> QuantizationResult:
    """Quantize W [out, in] given H [in, in] (proportional to X X^T of the calibration inputs)."""
    with _cpu_single_thread(weight.device):
        return _gptq(weight, hessian, spec, options)


def _gptq(
    weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, options: GPTQOptions
) -> QuantizationResult:
    rows, columns = weight.shape
    if hessian.shape != (columns, columns):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match {columns} inputs")
    device = weight.device
    w = weight.detach().float().clone()
    hessian = hessian.detach().to(device=device, dtype=torch.float32)
    diag = torch.diagonal(hessian)

    # Inputs that never fire carry no information: their weights are irrelevant, set them to 0.
    dead = diag == 0
    w[:, dead] = 0.0

    width = spec.group_width(columns)
    n_groups = spec.num_groups(columns)
    column_weight = torch.where(dead, 1.0, diag) if options.hessian_weighted_clip else None
    scales = torch.empty(n_groups, rows, dtype=torch.float32, device=device)
    zeros = torch.empty(n_groups, rows, dtype=torch.float32, device=device)

    if options.static_groups:
        # Groups fixed on the original weights, before any error feedback, in natural order.
        for g in range(n_groups):
            cols = slice(g * width, min((g + 1) * width, columns))
            cw = None if column_weight is None else column_weight[cols]
            scales[g], zeros[g] = find_group_params(w[:, cols], spec, cw)

    perm = None
    if options.act_order:
        perm = torch.argsort(torch.where(dead, 1.0, diag), descending=True)
        w = w[:, perm]
        if column_weight is not None:
            column_weight = column_weight[perm]

    hinv, damp = _inverse_hessian_cholesky(hessian, dead, perm, options.damp_percent)
    hinv = hinv.float()

    # Group of each processing position: natural-order groups when static, else positional.
    natural = torch.arange(columns, device=device)
    if options.static_groups and perm is not None:
        group_at = (perm // width).tolist()
    else:
        group_at = (natural // width).tolist()

    # Work on W^T [in, out]: a column of W is then a contiguous row, which keeps the per-column
    # reads, writes and rank-1 updates cache-friendly on CPU.
    wt = w.t().contiguous()
    del w
    qint, qdeq = _column_loop(wt, hinv, scales, zeros, group_at, spec, options, column_weight)

    g_idx = natural // width
    if perm is not None:
        inv = torch.argsort(perm)
        qint = qint[inv]
        qdeq = qdeq[inv]
        if not options.static_groups:
            # Positional groups: column perm[p] belongs to group p // width.
            g_idx = torch.empty_like(natural)
            g_idx[perm] = natural // width

    qdeq = qdeq.t().contiguous()
    quantized = QuantizedWeight(
        qint=qint.t().to(torch.uint8).contiguous(),
        scales=scales,
        zeros=zeros.to(torch.uint8),
        g_idx=g_idx.to(torch.int32),
        bits=spec.bits,
    )
    row_error, row_energy = row_errors(weight, qdeq, hessian)
    return QuantizationResult(
        quantized=quantized, weight=qdeq, damp=damp, row_error=row_error, row_energy=row_energy
    )


@contextmanager
def _cpu_single_thread(device: torch.device) -> Iterator[None]:
    """GPTQ on a CPU is thousands of small ops and mid-sized factorizations: a second thread
    mostly adds synchronisation, and on a loaded machine its spinning costs several times more
    than it saves (measured: cholesky_inverse 3.7 s with 2 threads, 1.2 s with 1)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _column_loop(
    wt: torch.Tensor,
    hinv: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_at: list[int],
    spec: QuantSpec,
    options: GPTQOptions,
    column_weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ proper on W^T [in, out] in processing order; fills scales/zeros of new groups.

    Returns the integers and the dequantized weights, both [in, out] in processing order.
    """
    columns, rows = wt.shape
    device = wt.device
    width = spec.group_width(columns)
    maxq = spec.maxq
    qint = torch.zeros(columns, rows, dtype=torch.float32, device=device)
    qdeq = torch.zeros(columns, rows, dtype=torch.float32, device=device)
    block = _block_size(width, columns, options.block_size)
    scale = zero = None
    current_group = -1
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        w1 = wt[i1:i2]  # updated in place: only the rounded values matter once a block is done
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            p = i1 + i
            g = group_at[p]
            if g != current_group:
                if not options.static_groups:
                    # Blocks are sized so that a group starting here lies in this block or starts
                    # it; either way rows p..p+width of W^T hold the up-to-date weights.
                    cw = None if column_weight is None else column_weight[p : p + width]
                    scales[g], zeros[g] = find_group_params(wt[p : p + width].t(), spec, cw)
                scale, zero = scales[g], zeros[g]
                current_group = g
            col = w1[i]
            q = quantize_to_int(col, scale, zero, maxq)
            dq = dequantize_int(q, scale, zero)
            qint[p] = q
            qdeq[p] = dq
            err = (col - dq).div_(hinv1[i, i])
            w1[i:].addr_(hinv1[i, i:], err, alpha=-1.0)
            err1[i] = err
        wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1.0)
    return qint, qdeq


def rtn_quantize(
    weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None = None
) -> QuantizationResult:
    """Round-to-nearest on the same grid: each group's parameters, then plain rounding.

    With a Hessian, only the reported error uses it; the rounding never does.
    """
    rows, columns = weight.shape
    w = weight.detach().float()
    width = spec.group_width(columns)
    n_groups = spec.num_groups(columns)
    scales = torch.empty(n_groups, rows, dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)
    qint = torch.empty_like(w)
    qdeq = torch.empty_like(w)
    with _cpu_single_thread(w.device):
        for g in range(n_groups):
            cols = slice(g * width, min((g + 1) * width, columns))
            scales[g], zeros[g] = find_group_params(w[:, cols], spec)
            s, z = scales[g].unsqueeze(1), zeros[g].unsqueeze(1)
            qint[:, cols] = quantize_to_int(w[:, cols], s, z, spec.maxq)
            qdeq[:, cols] = dequantize_int(qint[:, cols], s, z)
    g_idx = (torch.arange(columns, device=w.device) // width).to(torch.int32)
    quantized = QuantizedWeight(
        qint=qint.to(torch.uint8),
        scales=scales,
        zeros=zeros.to(torch.uint8),
        g_idx=g_idx,
        bits=spec.bits,
    )
    result = QuantizationResult(quantized=quantized, weight=qdeq, damp=0.0)
    if hessian is not None:
        result.row_error, result.row_energy = row_errors(weight, qdeq, hessian)
    return result
