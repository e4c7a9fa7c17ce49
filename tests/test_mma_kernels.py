"""The fragment layout (CPU), and the kernels that read it against float64 (GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gateway.kernels import mma_layout
from gateway.kernels.mma_layout import codes_from_frag, frag_from_codes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_cases import fragment_outputs, make_linear, rel_err

# (in, out, bits, group_size, sym, act_order, bias): odd tile counts, a partial last split-K range
# (11008 = 86 steps of 128), channel-wise groups, asymmetric zeros, act-order and bias.
MMA_CASES = [
    (4096, 256, 4, 128, True, False, False),
    (1024, 72, 4, 128, True, True, False),
    (1536, 200, 4, -1, False, False, True),
    (11008, 64, 4, 128, True, False, False),
    (768, 40, 4, 256, False, True, True),
]
MMA_ROWS = (1, 3, 8, 16, 17, 32, 33, 64, 65, 128)


def test_fragment_layout_puts_each_input_where_the_mma_lane_reads_it() -> None:
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (24, 384), generator=gen, dtype=torch.int32)
    frag = frag_from_codes(codes)
    assert frag.shape == (3, 3, 32, 4) and frag.dtype == torch.int32
    assert torch.equal(codes_from_frag(frag), codes)
    # m16n8k16: lane 4g + t holds column g at inputs 2t, 2t+1 (register 0) and 2t+8, 2t+9
    # (register 1) of each k16 slice; a register's low half is nibble i, its high half nibble i+4.
    for tile, step, lane, word in ((0, 0, 0, 0), (2, 1, 13, 3), (1, 2, 31, 2)):
        g, t = divmod(lane, 4)
        bits = int(frag[tile, step, lane, word]) & 0xFFFFFFFF
        for register in range(4):
            k16, half_reg = divmod(register, 2)
            for high in (0, 1):
                k = step * 128 + word * 32 + 16 * k16 + 8 * half_reg + 2 * t + high
                nibble = register + 4 * high
                assert (bits >> (4 * nibble)) & 0xF == int(codes[tile * 8 + g, k])


def test_fragment_layout_supports_only_what_the_kernel_takes() -> None:
    assert mma_layout.supports(4, 4096, 11008, 128)
    assert mma_layout.supports(4, 1536, 200, 1536)  # channel-wise
    assert not mma_layout.supports(8, 4096, 4096, 128)
    assert not mma_layout.supports(4, 576, 1536, 128)  # SmolLM2: a short last group
    assert not mma_layout.supports(4, 4096, 4096, 64)
    assert not mma_layout.supports(4, 4096, 4100, 128)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mma_kernel_matches_float64_reference_on_gpu() -> None:
    from gateway.kernels import cuda_ext

    gen = torch.Generator().manual_seed(77)
    failures = []
    for case in MMA_CASES:
        w, dense, b = make_linear(*case, gen, "cuda")
        fw = mma_layout.from_gpu_weight(w)
        assert torch.equal(
            codes_from_frag(fw.qfrag.cpu()),
            ((w.qweight_t.cpu()[:, :, None] >> torch.arange(0, 32, 4)) & 0xF).reshape(case[1], -1),
        )
        for m in (*MMA_ROWS, 100):
            x = torch.randn(m, case[0], generator=gen).half()
            ref = x.double() @ dense + (0 if b is None else b.double())
            outs = fragment_outputs(x.cuda(), fw)
            for name, out in outs.items():
                err = rel_err(out, ref)
                if not (err < 3e-3 and out.shape == (m, case[1])):
                    failures.append(f"{name} case={case} M={m}: rel err {err:.1e}")
    workspace, counters = cuda_ext._workspaces[torch.device("cuda", 0)]
    assert failures == []
    # Every split-K call must leave its scratch as it found it: zeros.
    assert int(torch.count_nonzero(workspace)) == 0 and int(torch.count_nonzero(counters)) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mma_kernel_replays_in_a_cuda_graph() -> None:
    from gateway.kernels import cuda_ext

    gen = torch.Generator().manual_seed(3)
    w, dense, _ = make_linear(4096, 512, 4, 128, True, False, False, gen, "cuda")
    fw = mma_layout.from_gpu_weight(w)
    x = torch.randn(32, 4096, generator=gen).half().cuda()
    expected = cuda_ext.mma_gemm(x, fw)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_ext.mma_gemm(x, fw)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        # Split-K sums arrive in any order, so replays agree to rounding, not bit for bit.
        assert rel_err(out, expected.double().cpu()) < 1e-3
    assert rel_err(out, x.double().cpu() @ dense) < 3e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pipelined_kernel_any_split_and_in_a_cuda_graph() -> None:
    # Forced splits of the 86 k128 steps: one range, 22-step ranges with a short last one, one
    # step per range (shorter than the pipeline), and more splits than steps (capped). Asymmetric
    # zeros and a bias take the split-K epilogue's bias add; 33 n8 tiles leave a partial block.
    from gateway.kernels import cuda_ext

    gen = torch.Generator().manual_seed(4)
    w, dense, b = make_linear(11008, 264, 4, 128, False, False, True, gen, "cuda")
    fw = mma_layout.from_gpu_weight(w)
    x = torch.randn(40, 11008, generator=gen).half()
    ref = x.double() @ dense + b.double()
    for splits in (1, 4, 86, 200):
        out = cuda_ext.mma_pipe(x.cuda(), fw, splits=splits)
        assert rel_err(out, ref) < 3e-3, splits
    xc = x.cuda()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_ext.mma_pipe(xc, fw, splits=8)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, ref) < 3e-3
    workspace, counters = cuda_ext._workspaces[torch.device("cuda", 0)]
    assert int(torch.count_nonzero(workspace)) == 0 and int(torch.count_nonzero(counters)) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("group_size", [128, 32])  # the fragment layout, then the row layout
def test_auto_kernel_takes_zero_rows(group_size: int) -> None:
    # A step of prompt chunks that sample nothing hands the lm_head no rows; the CUDA kernels
    # refuse an empty input (once it took down a server on a 2,080-token prompt).
    from test_kernels_cpu import random_gptq

    from gateway.kernels import QuantLinear

    tensors, _ = random_gptq(256, 384, 4, group_size, act_order=False, sym=True, seed=0)
    layer = QuantLinear.from_gptq(
        "t", **{k: v.cuda() for k, v in tensors.items()}, bias=None, bits=4,
        group_size=group_size, dtype=torch.float16,
    )  # fmt: skip
    out = layer(torch.empty(0, 256, device="cuda", dtype=torch.float16))
    assert out.shape == (0, 384) and layer.backend.name.startswith("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_failed_kernel_check_raises_instead_of_killing_the_process() -> None:
    # A formatted TORCH_CHECK message once segfaulted the process (an ABI mismatch of the
    # JIT-built extension), so a bad kernel argument took the whole server down. A subprocess,
    # so that a crash fails this test instead of the run.
    import subprocess

    code = (
        "import torch; from gateway.kernels import cuda_ext\n"
        "q = torch.zeros(2, 1, 32, 4, dtype=torch.int32, device='cuda')\n"
        "s = torch.zeros(1, 16, dtype=torch.half, device='cuda')\n"
        "x = torch.zeros(9, 128, dtype=torch.half, device='cuda')\n"
        "try:\n"
        "    cuda_ext.load().gptq_frag_gemv(x, q, s, None, None, 128, 1, 8)\n"
        "except RuntimeError as e:\n"
        "    print('raised:', e)\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "frag gemv takes 1 to 8 rows, got 9" in done.stdout
