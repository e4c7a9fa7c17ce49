"""The CUDA C++ kernels (gateway/kernels/cuda/*.cu), built through torch at first use.

The build lands in a cache directory keyed by the source's hash, so later processes load it in a
second or two; set GPTQGW_CUDA_CACHE to move it (a read-only image can pre-build it there).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from types import ModuleType

import torch

from gateway.kernels import registry
from gateway.kernels.mma_layout import FragWeight
from gateway.kernels.triton_layout import GpuQuantWeight

CUDA_DIR = Path(__file__).with_name("cuda")
SOURCES = [CUDA_DIR / name for name in ("gptq_kernels.cu", "mma_gemm.cu", "mma_pipe.cu")]
HEADERS = [CUDA_DIR / name for name in ("fp16_bits.cuh", "mma_ops.cuh")]
MMA_MAX_ROWS = registry.BY_NAME["cuda_mma"].max_rows
# The mma kernel's compiled configurations (GPTQGW_MMA_CONFIGS in cuda/mma_gemm.cu).
MMA_CONFIGS = [
    dict(warps=w, tiles_per_warp=t, steps_per_block=s)
    for w, t, s in (
        *((4, 2, 2), (4, 2, 4), (4, 4, 4), (8, 2, 2), (8, 2, 4), (8, 4, 4)),
        *((4, 2, 8), (8, 2, 8)),
    )
]
FRAG_GEMV_MAX_ROWS = registry.BY_NAME["cuda_frag_gemv"].max_rows
# The pipelined kernel's compiled configurations (GPTQGW_PIPE_CONFIGS in cuda/mma_pipe.cu): m16
# tiles per warp, warps along M and along N, n8 tiles per warp. A launch takes up to
# 16 * m_tiles * warps_m rows.
PIPE_CONFIGS = [
    dict(m_tiles=mt, warps_m=wm, warps_n=wn, tiles_per_warp=nt)
    for mt, wm, wn, nt in (
        *((1, 1, 4, 8), (1, 1, 8, 4), (2, 1, 4, 8), (2, 1, 8, 4), (2, 2, 4, 8)),
        *((4, 1, 8, 4), (2, 2, 4, 4), (4, 2, 4, 8), (4, 2, 4, 4), (2, 4, 2, 8)),
    )
]
PIPE_MAX_ROWS = registry.BY_NAME["cuda_mma_pipe"].max_rows

_DECLARATIONS = """
#include <ATen/ATen.h>
#include <optional>
at::Tensor gptq_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                     int64_t bits, int64_t group_size, int64_t rows_per_warp);
at::Tensor gptq_dequant(const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size);
at::Tensor gptq_mma_gemm(const at::Tensor& x, const at::Tensor& qfrag, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros,
                         const std::optional<at::Tensor>& bias, at::Tensor& workspace,
                         at::Tensor& counters, int64_t group_size, int64_t warps,
                         int64_t tiles_per_warp, int64_t steps_per_block);
at::Tensor gptq_frag_dequant(const at::Tensor& qfrag, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros, int64_t group_size);
at::Tensor gptq_frag_gemv(const at::Tensor& x, const at::Tensor& qfrag, const at::Tensor& scales,
                          const std::optional<at::Tensor>& zeros,
                          const std::optional<at::Tensor>& bias, int64_t group_size,
                          int64_t tiles_per_block, int64_t steps_per_warp);
at::Tensor gptq_mma_pipe(const at::Tensor& x, const at::Tensor& qfrag, const at::Tensor& scales,
                         const std::optional<at::Tensor>& zeros,
                         const std::optional<at::Tensor>& bias, at::Tensor& workspace,
                         at::Tensor& counters, int64_t group_size, int64_t m_tiles,
                         int64_t warps_m, int64_t warps_n, int64_t tiles_per_warp, int64_t splits);
"""
# Split-K scratch of the tensor-core kernel, one per device. The kernel leaves it zeroed after
# every call. Captured CUDA graphs hold its address, so a replaced one is kept alive, not freed.
_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_retired: list[tuple[torch.Tensor, torch.Tensor]] = []


def _cache_dir(tag: str) -> Path:
    root = os.environ.get("GPTQGW_CUDA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gptq-gateway", "cuda"
    )
    path = Path(root) / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def load() -> ModuleType:
    """Compile (once per source version and GPU architecture) and import the extension."""
    if not torch.cuda.is_available():
        raise RuntimeError("the CUDA kernels need a CUDA GPU")
    from torch.utils.cpp_extension import load_inline

    sources = [path.read_text() for path in SOURCES]
    headers = "".join(path.read_text() for path in HEADERS)  # included by the sources
    major, minor = torch.cuda.get_device_capability()
    # Build with torch's own std::string ABI. On the lent GPU machine (g++ 13.3, nvcc 13.0) any
    # extension's failed TORCH_CHECK with a formatted message killed the process (SIGSEGV) while
    # a literal message raised: the formatted one hands libc10 a std::string, so the two sides
    # disagree on its layout. torch 2.11's cpp_extension no longer passes this flag itself.
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    key = "".join([*sources, headers, _DECLARATIONS, torch.__version__, abi])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    tag = f"gptqgw_cuda_{digest}_sm{major}{minor}"
    return load_inline(
        name=tag,
        cpp_sources=[_DECLARATIONS],
        cuda_sources=sources,
        functions=[
            "gptq_gemv",
            "gptq_dequant",
            "gptq_mma_gemm",
            "gptq_frag_dequant",
            "gptq_frag_gemv",
            "gptq_mma_pipe",
        ],
        extra_cflags=[abi],
        extra_cuda_cflags=[
            abi,
            "-O3",
            "--expt-relaxed-constexpr",
            f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}",
        ],
        extra_include_paths=[str(CUDA_DIR)],
        build_directory=str(_cache_dir(tag)),
        verbose=False,
    )


def available() -> bool:
    try:
        load()
    except Exception:  # no GPU, no nvcc, or a build failure: callers fall back to Triton/torch
        return False
    return True


def gemv(x: torch.Tensor, w: GpuQuantWeight, rows_per_warp: int = 4) -> torch.Tensor:
    """x [M <= 8, in] fp16 -> [M, out] fp16 (act-order: activations gathered through w.perm)."""
    if w.perm is not None:
        x = x.index_select(1, w.perm.long())
    return load().gptq_gemv(
        x, w.qweight_t, w.scales_t, w.zeros_t, w.bias, w.bits, w.group_size, rows_per_warp
    )


def dequantize(w: GpuQuantWeight) -> torch.Tensor:
    """fp16 [out, in] in kernel input order."""
    return load().gptq_dequant(w.qweight_t, w.scales_t, w.zeros_t, w.bits, w.group_size)


def dequant_matmul(x: torch.Tensor, w: GpuQuantWeight) -> torch.Tensor:
    """Large-M route: the whole weight expanded to fp16, then cuBLAS."""
    if w.perm is not None:
        x = x.index_select(1, w.perm.long())
    out = x @ dequantize(w).t()
    if w.bias is not None:
        out += w.bias
    return out


def reserve_workspace(device: torch.device, out_features: int) -> None:
    """Make the split-K scratch big enough for `out_features` outputs (call at load, not in a
    captured step)."""
    floats, counters = PIPE_MAX_ROWS * out_features, out_features // 8 + 1
    have = _workspaces.get(device)
    if have is not None and have[0].numel() >= floats and have[1].numel() >= counters:
        return
    if have is not None:
        _retired.append(have)
        floats, counters = max(floats, have[0].numel()), max(counters, have[1].numel())
    _workspaces[device] = (
        torch.zeros(floats, dtype=torch.float32, device=device),
        torch.zeros(counters, dtype=torch.int32, device=device),
    )


def _split_k_inputs(x: torch.Tensor, w: FragWeight) -> tuple[torch.Tensor, ...]:
    """x in kernel input order (act-order gathers it), and the device's split-K scratch."""
    if w.perm is not None:
        x = x.index_select(1, w.perm.long())
    reserve_workspace(x.device, w.out_features)
    workspace, counters = _workspaces[x.device]
    return x, workspace, counters


def mma_gemm(
    x: torch.Tensor,
    w: FragWeight,
    warps: int = 4,
    tiles_per_warp: int = 2,
    steps_per_block: int = 4,
) -> torch.Tensor:
    """x [M <= 64, in] fp16 -> [M, out] fp16 on tensor cores."""
    x, workspace, counters = _split_k_inputs(x, w)
    return load().gptq_mma_gemm(
        x,
        w.qfrag,
        w.scales,
        w.zeros,
        w.bias,
        workspace,
        counters,
        w.group_size,
        warps,
        tiles_per_warp,
        steps_per_block,
    )


def mma_pipe(
    x: torch.Tensor,
    w: FragWeight,
    m_tiles: int = 2,
    warps_m: int = 2,
    warps_n: int = 4,
    tiles_per_warp: int = 8,
    splits: int = 0,
) -> torch.Tensor:
    """x [M <= 16 * m_tiles * warps_m, in] fp16 -> [M, out] fp16 on tensor cores, pipelined over K;
    splits=0 lets the kernel split K to fill one wave of the GPU."""
    x, workspace, counters = _split_k_inputs(x, w)
    return load().gptq_mma_pipe(
        x,
        w.qfrag,
        w.scales,
        w.zeros,
        w.bias,
        workspace,
        counters,
        w.group_size,
        m_tiles,
        warps_m,
        warps_n,
        tiles_per_warp,
        splits,
    )


def pipe_rows(config: dict) -> int:
    """The most rows one launch of a PIPE_CONFIGS entry takes."""
    return 16 * config["m_tiles"] * config["warps_m"]


def frag_gemv(
    x: torch.Tensor, w: FragWeight, tiles_per_block: int = 1, steps_per_warp: int = 8
) -> torch.Tensor:
    """x [M <= 8, in] fp16 -> [M, out] fp16 on CUDA cores, from the fragment layout."""
    if w.perm is not None:
        x = x.index_select(1, w.perm.long())
    return load().gptq_frag_gemv(
        x, w.qfrag, w.scales, w.zeros, w.bias, w.group_size, tiles_per_block, steps_per_warp
    )


def frag_dequant_matmul(x: torch.Tensor, w: FragWeight) -> torch.Tensor:
    """Large-M route for the fragment layout: fp16 [out, in] expanded, then cuBLAS."""
    if w.perm is not None:
        x = x.index_select(1, w.perm.long())
    out = x @ load().gptq_frag_dequant(w.qfrag, w.scales, w.zeros, w.group_size).t()
    if w.bias is not None:
        out += w.bias
    return out
