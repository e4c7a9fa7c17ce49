"""QuantLinear on CPU against dequantize-then-matmul in float64, for every backend and layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import native
from gateway.kernels import QuantLinear, prepare
from gateway.kernels import dispatch as dispatch_module
from gateway.kernels.packing import decode_qzeros, pack_cols, pack_rows, unpack_cols, unpack_rows
from gateway.kernels.torch_kernels import TorchUnpack
from quantize.errors import UserInputError

CPU_KERNELS = ("torch", "torch_dequant", "torch_int4")


def random_gptq(
    in_features: int,
    out_features: int,
    bits: int,
    group_size: int,
    *,
    act_order: bool,
    sym: bool,
    seed: int,
) -> tuple[dict, torch.Tensor]:
    """Checkpoint tensors packed by the native packer, and the float64 weight [in, out] held."""
    gen = torch.Generator().manual_seed(seed)
    gs = group_size if group_size > 0 else in_features
    groups = -(-in_features // gs)
    maxq = 2**bits - 1
    q = torch.randint(0, maxq + 1, (in_features, out_features), generator=gen)
    if sym:
        zeros = torch.full((groups, out_features), (maxq + 1) // 2)
    else:
        zeros = torch.randint(1, maxq + 1, (groups, out_features), generator=gen)
    scales = (torch.rand(groups, out_features, generator=gen) * 0.02 + 1e-3).half()
    g_idx = torch.arange(in_features) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    weight = (q.double() - zeros.double()[g_idx]) * scales.double()[g_idx]
    tensors = {
        "qweight": torch.from_numpy(native.pack_qweight(q.numpy().astype(np.uint8), bits)),
        "qzeros": torch.from_numpy(native.pack_qzeros(zeros.numpy().astype(np.uint8), bits)),
        "scales": scales,
        "g_idx": g_idx.to(torch.int32),
    }
    return tensors, weight


def build(
    tensors: dict, bits: int, group_size: int, kernel: str, bias: torch.Tensor | None = None
) -> QuantLinear:
    layer = QuantLinear.from_gptq(
        "t", **tensors, bias=bias, bits=bits, group_size=group_size, kernel=kernel
    )
    prepare(layer)
    return layer


def assert_matches(
    layer: QuantLinear, weight: torch.Tensor, rows: int, bias: torch.Tensor | None = None
) -> None:
    x = torch.randn(rows, weight.shape[0], generator=torch.Generator().manual_seed(rows))
    expected = x.double() @ weight
    if bias is not None:
        expected += bias.double()
    got = layer(x).double()
    assert got.shape == expected.shape
    # fp32 accumulation over `in` terms: relative error a few ulps times sqrt(in).
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 2e-6 * scale, layer.extra_repr()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1, 96])
@pytest.mark.parametrize("act_order", [False, True])
def test_every_layout_matches_float64(bits: int, group_size: int, act_order: bool) -> None:
    # 576 inputs: g128 leaves a short last group (SmolLM2's case); g96 does not divide the kernel
    # groups of torch's int4 kernel evenly either.
    in_features, out_features = 576, 64
    for sym in (False, True):
        tensors, weight = random_gptq(
            in_features,
            out_features,
            bits,
            group_size,
            act_order=act_order,
            sym=sym,
            seed=bits * 7 + group_size,
        )
        for kernel in CPU_KERNELS:
            if kernel == "torch_int4" and bits != 4:
                continue
            layer = build(tensors, bits, group_size, kernel)
            assert layer.backend.name == kernel
            assert (layer.perm is not None) == (act_order and group_size != -1)
            for rows in (1, 5, 33):
                assert_matches(layer, weight, rows)


@pytest.mark.parametrize("seed", range(6))
def test_random_odd_shapes_with_bias(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    bits = [2, 3, 4, 8][seed % 4]
    in_features = 32 * int(torch.randint(1, 40, (1,), generator=gen))
    out_features = (
        32 * int(torch.randint(1, 6, (1,), generator=gen))
        if bits == 3
        else int(torch.randint(1, 50, (1,), generator=gen)) * (32 // bits)
    )
    group_size = int(torch.tensor([16, 32, 48, 100, -1])[seed % 5])
    tensors, weight = random_gptq(
        in_features, out_features, bits, group_size, act_order=seed % 2 == 0, sym=False, seed=seed
    )
    bias = torch.randn(out_features, generator=gen)
    for kernel in ("auto", "torch", "torch_dequant"):
        layer = build(tensors, bits, group_size, kernel, bias=bias)
        assert_matches(layer, weight, rows=3, bias=bias)


def test_torch_packing_agrees_with_native() -> None:
    gen = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4, 8):
        values = torch.randint(0, 2**bits, (64, 96), generator=gen, dtype=torch.int32)
        packed_native = torch.from_numpy(native.pack_qweight(values.numpy().astype(np.uint8), bits))
        assert torch.equal(pack_rows(values, bits), packed_native)
        assert torch.equal(unpack_rows(packed_native, bits), values)
        stored = values.clamp(max=2**bits - 2)  # the packer takes zero = stored + 1, in uint8
        zeros_native = torch.from_numpy(
            native.pack_qzeros((stored + 1).numpy().astype(np.uint8), bits)
        )
        assert torch.equal(pack_cols(stored, bits), zeros_native)
        assert torch.equal(unpack_cols(zeros_native, bits), stored)


def test_non_uniform_g_idx_uses_row_groups() -> None:
    # A g_idx whose groups are not group_size rows each still computes the right thing.
    tensors, _ = random_gptq(128, 64, 4, 32, act_order=False, sym=False, seed=3)
    g_idx = torch.cat(
        [torch.zeros(10), torch.ones(50), torch.full((40,), 2), torch.full((28,), 3)]
    ).int()
    g_idx = g_idx[torch.randperm(128, generator=torch.Generator().manual_seed(1))]
    tensors["g_idx"] = g_idx
    q = torch.from_numpy(native.unpack_qweight(tensors["qweight"].numpy(), 4)).long()
    zeros = torch.from_numpy(native.unpack_qzeros(tensors["qzeros"].numpy(), 4, 64)).long()
    weight = (q - zeros[g_idx.long()]).double() * tensors["scales"].double()[g_idx.long()]
    for kernel in ("auto", "torch", "torch_dequant"):
        layer = build(tensors, 4, 32, kernel)
        assert layer.row_group is not None
        assert layer.backend.name != "torch_int4"
        assert_matches(layer, weight, rows=4)


def test_fused_outputs_equal_separate_layers() -> None:
    parts = [
        random_gptq(256, out, 4, 64, act_order=False, sym=False, seed=out) for out in (64, 32, 32)
    ]
    layers = [build(t, 4, 64, "torch") for t, _ in parts]
    fused = QuantLinear.concat_outputs(layers)
    assert fused is not None
    x = torch.randn(2, 256)
    expected = torch.cat([layer(x) for layer in layers], dim=1)
    torch.testing.assert_close(fused(x), expected, rtol=0, atol=1e-5)


def test_act_order_layers_with_different_orders_are_not_fused() -> None:
    a, _ = random_gptq(256, 64, 4, 64, act_order=True, sym=False, seed=1)
    b, _ = random_gptq(256, 64, 4, 64, act_order=True, sym=False, seed=2)
    assert QuantLinear.concat_outputs([build(a, 4, 64, "torch"), build(b, 4, 64, "torch")]) is None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_points_of_zero_as_our_quantizer_writes_them(bits: int) -> None:
    from quantize.format import pack_zeros

    gen = torch.Generator().manual_seed(bits)
    zeros = torch.randint(0, 2**bits, (6, 64), generator=gen, dtype=torch.int32)
    zeros[0, :5] = 0  # several adjacent borrows in one word
    stored = torch.from_numpy(pack_zeros(zeros.numpy().astype(np.uint8), bits))
    assert torch.equal(decode_qzeros(stored, bits), zeros)
    # Where no zero is 0 this is the same as AutoGPTQ's per-field + 1 (native's reading).
    plain = zeros.clamp(min=1)
    decoded = decode_qzeros(
        torch.from_numpy(pack_zeros(plain.numpy().astype(np.uint8), bits)), bits
    )
    assert torch.equal(decoded, plain)
    stored = torch.from_numpy(native.pack_qzeros(plain.numpy().astype(np.uint8), bits))
    assert torch.equal(
        decode_qzeros(stored, bits),
        torch.from_numpy(native.unpack_qzeros(stored.numpy(), bits, 64)),
    )


def test_v2_zero_points() -> None:
    tensors, weight = random_gptq(128, 64, 4, 32, act_order=False, sym=False, seed=5)
    zeros = native.unpack_qzeros(tensors["qzeros"].numpy(), 4, 64)  # real zeros
    tensors["qzeros"] = torch.from_numpy(
        native.pack_qzeros((zeros + 1).astype(np.uint8), 4)
    )  # stores zeros
    layer = QuantLinear.from_gptq(
        "t", **tensors, bias=None, bits=4, group_size=32, checkpoint_format="gptq_v2"
    )
    assert_matches(layer, weight, rows=2)


def test_bad_kernel_requests_are_named() -> None:
    tensors, _ = random_gptq(128, 64, 8, 32, act_order=False, sym=False, seed=0)
    with pytest.raises(UserInputError, match="kernel: unknown kernel 'fast'"):
        build(tensors, 8, 32, "fast")
    with pytest.raises(
        UserInputError, match=r"kernel: 'torch_int4' cannot run a layer with bits=8"
    ):
        build(tensors, 8, 32, "torch_int4")
    with pytest.raises(UserInputError, match="kernel: 'triton_gemm' needs a CUDA GPU"):
        build(tensors, 8, 32, "triton_gemm")


def test_misshapen_tensors_are_named() -> None:
    tensors, _ = random_gptq(128, 64, 4, 32, act_order=False, sym=False, seed=0)
    bad = dict(tensors, scales=tensors["scales"][:3])
    with pytest.raises(
        UserInputError, match=r"layer\.scales: expected a float tensor \[4, 64\] \(4 groups"
    ):
        QuantLinear.from_gptq("layer", **bad, bias=None, bits=4, group_size=32)
    bad = dict(tensors, qzeros=tensors["qzeros"][:, :4])
    with pytest.raises(UserInputError, match=r"layer\.qzeros: expected int32 \[4, 8\]"):
        QuantLinear.from_gptq("layer", **bad, bias=None, bits=4, group_size=32)
    bad = dict(tensors, g_idx=tensors["g_idx"][:100])
    with pytest.raises(UserInputError, match=r"layer\.g_idx: expected shape \[128\]"):
        QuantLinear.from_gptq("layer", **bad, bias=None, bits=4, group_size=32)
    bad = dict(tensors, g_idx=tensors["g_idx"] + 10)
    with pytest.raises(UserInputError, match=r"layer\.g_idx: group indices must lie in \[0, 4\)"):
        QuantLinear.from_gptq("layer", **bad, bias=None, bits=4, group_size=32)
    bad = dict(tensors, qweight=tensors["qweight"].float())
    with pytest.raises(UserInputError, match=r"layer\.qweight: expected a 2-D int32 tensor"):
        QuantLinear.from_gptq("layer", **bad, bias=None, bits=4, group_size=32)


class _FakeGpuModule:
    """Test double standing in for gateway.kernels.gpu_backend: records the paths asked for."""

    def __init__(self, accepts: bool) -> None:
        self.accepts, self.paths = accepts, []

    def make_backend(self, layer: QuantLinear, path: str):
        self.paths.append(path)
        if not self.accepts:
            return None

        class Backend:
            name = f"fake:{path}"
            extra_bytes = 0

            def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
                return x2d @ layer.dequantize(x2d.dtype)

        return Backend()


def test_cuda_dispatch_routes_kernel_names_to_gpu_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    # The seam without a GPU: pretend the layer is on CUDA and the GPU module exists.
    tensors, weight = random_gptq(128, 64, 4, 32, act_order=False, sym=False, seed=0)
    layer = QuantLinear.from_gptq("t", **tensors, bias=None, bits=4, group_size=32)
    cuda = torch.device("cuda")
    fake = _FakeGpuModule(accepts=True)
    monkeypatch.setattr(
        dispatch_module, "_import_optional", {"gateway.kernels.gpu_backend": fake}.get
    )
    for kernel, path in (("auto", "auto"), ("cuda", "auto"), ("cuda_gemv", "gemv"),
                         ("triton_gemm", "gemm"), ("cuda_dequant", "dequant"),
                         ("cuda_frag_gemv", "frag_gemv"), ("cuda_mma", "mma"),
                         ("cuda_mma_pipe", "mma_pipe"),
                         ("cuda_frag_dequant", "frag_dequant")):  # fmt: skip
        layer.backend = dispatch_module._resolve(layer, kernel, cuda)
        assert layer.backend.name == f"fake:{path}"
    assert fake.paths == [
        "auto", "auto", "gemv", "gemm", "dequant", "frag_gemv", "mma", "mma_pipe", "frag_dequant"
    ]  # fmt: skip
    assert_matches(layer, weight, rows=3)

    # A layer the GPU module refuses: "auto" falls back to torch, a forced kernel is an error.
    refusing = _FakeGpuModule(accepts=False)
    monkeypatch.setattr(
        dispatch_module, "_import_optional", {"gateway.kernels.gpu_backend": refusing}.get
    )
    assert isinstance(dispatch_module._resolve(layer, "auto", cuda), TorchUnpack)
    with pytest.raises(UserInputError, match="kernel: 'cuda' is not available for this layer"):
        dispatch_module._resolve(layer, "cuda", cuda)
