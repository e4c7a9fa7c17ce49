"""GPTQ and the rounding grid on synthetic matrices: structure, exactness, and that GPTQ helps."""

from __future__ import annotations

import pytest
import torch

from quantize.gptq import GPTQOptions, gptq_quantize, rtn_quantize
from quantize.grid import QuantSpec, dequantize_int, find_group_params, quantize_to_int
from quantize.qtensor import row_errors


def correlated_problem(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian of inputs with correlated, unevenly scaled features (as LLM
    activations are: GPTQ's error feedback only helps when inputs are correlated)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(4 * cols, cols, generator=g) @ mix
    x = x * torch.logspace(-1, 0.5, cols)[torch.randperm(cols, generator=g)]
    weight = torch.randn(rows, cols, generator=g) * 0.05
    return weight, 2 * x.t() @ x / x.shape[0]


def rel_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    num, den = row_errors(weight, approx, hessian)
    return float(num.sum() / den.sum())


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_grid_params_are_valid_and_clipping_never_hurts(bits: int, sym: bool) -> None:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(bits)) * 0.1
    plain = QuantSpec(bits=bits, group_size=128, sym=sym, clip_search=False)
    clipped = QuantSpec(bits=bits, group_size=128, sym=sym, clip_search=True)
    errors = []
    for spec in (plain, clipped):
        scale, zero = find_group_params(w, spec)
        assert torch.equal(scale, scale.half().float()), "scales must be exact in fp16"
        assert bool((scale > 0).all())
        assert bool(((zero >= 0) & (zero <= spec.maxq) & (zero == zero.round())).all())
        if sym:
            assert bool((zero == (spec.maxq + 1) / 2).all())
        q = quantize_to_int(w, scale[:, None], zero[:, None], spec.maxq)
        errors.append(((dequantize_int(q, scale[:, None], zero[:, None]) - w) ** 2).sum(1))
    assert bool((errors[1] <= errors[0] + 1e-12).all())


def test_gptq_beats_round_to_nearest_on_correlated_inputs() -> None:
    weight, hessian = correlated_problem(96, 256)
    spec = QuantSpec(bits=4, group_size=64, clip_search=False)
    rtn = rtn_quantize(weight, spec, hessian)
    gptq = gptq_quantize(weight, hessian, spec, GPTQOptions())
    assert gptq.rel_error() < 0.8 * rtn.rel_error()
    assert gptq.rel_error() == pytest.approx(rel_error(weight, gptq.weight, hessian), rel=1e-4)


@pytest.mark.parametrize(
    ("act_order", "static_groups"), [(False, False), (True, False), (True, True)]
)
def test_integers_scales_and_g_idx_describe_the_weight_exactly(
    act_order: bool, static_groups: bool
) -> None:
    # 576 inputs with group 128: ceil(576 / 128) = 5 groups, the last one 64 wide (SmolLM2's case).
    weight, hessian = correlated_problem(48, 576, seed=1)
    spec = QuantSpec(bits=4, group_size=128)
    result = gptq_quantize(
        weight, hessian, spec, GPTQOptions(act_order=act_order, static_groups=static_groups)
    )
    q = result.quantized
    assert q.scales.shape == (5, 48) and q.zeros.shape == (5, 48) and q.g_idx.shape == (576,)
    assert torch.equal(q.dequantize(), result.weight)
    sizes = torch.bincount(q.g_idx.long(), minlength=5).tolist()
    assert sizes == [128, 128, 128, 128, 64]
    natural = (torch.arange(576) // 128).to(torch.int32)
    assert torch.equal(q.g_idx, natural) == (not act_order or static_groups)


@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_other_group_sizes(group_size: int) -> None:
    weight, hessian = correlated_problem(16, 192, seed=2)
    result = gptq_quantize(weight, hessian, QuantSpec(group_size=group_size), GPTQOptions())
    expected_groups = 1 if group_size == -1 else 192 // group_size
    assert result.quantized.scales.shape[0] == expected_groups
    assert torch.equal(result.quantized.dequantize(), result.weight)


def test_fused_rows_equal_separate_linears() -> None:
    """q/k/v share a Hessian and are quantized as one matrix: that must change nothing."""
    weight, hessian = correlated_problem(64, 128, seed=3)
    options = GPTQOptions(act_order=True)
    spec = QuantSpec()
    fused = gptq_quantize(weight, hessian, spec, options).quantized.split_rows([40, 24])
    alone = [gptq_quantize(w, hessian, spec, options).quantized for w in (weight[:40], weight[40:])]
    for f, a in zip(fused, alone, strict=True):
        assert torch.equal(f.qint, a.qint) and torch.equal(f.scales, a.scales)
        assert torch.equal(f.zeros, a.zeros) and torch.equal(f.g_idx, a.g_idx)


def test_dead_inputs_get_zero_weight_and_runs_are_deterministic() -> None:
    weight, hessian = correlated_problem(32, 128, seed=4)
    hessian[7, :] = 0
    hessian[:, 7] = 0
    spec = QuantSpec(sym=False)
    a = gptq_quantize(weight, hessian, spec, GPTQOptions())
    b = gptq_quantize(weight, hessian, spec, GPTQOptions())
    assert bool((a.weight[:, 7] == 0).all())
    assert torch.equal(a.quantized.qint, b.quantized.qint)


def test_a_singular_hessian_gets_more_damping_instead_of_failing() -> None:
    weight = torch.randn(8, 64)
    x = torch.randn(3, 64)  # rank 3: the damped Hessian is still fine, the undamped is singular
    result = gptq_quantize(weight, x.t() @ x, QuantSpec(), GPTQOptions(damp_percent=1e-9))
    assert result.damp >= 1e-9
    assert torch.isfinite(result.weight).all()
