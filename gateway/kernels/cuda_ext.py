"""The CUDA C++ kernels (gateway/kernels/cuda/gptq_kernels.cu), built through torch at first use.

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

from gateway.kernels.triton_layout import GpuQuantWeight

SOURCE = Path(__file__).with_name("cuda") / "gptq_kernels.cu"

_DECLARATIONS = """
#include <ATen/ATen.h>
#include <optional>
at::Tensor gptq_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                     int64_t bits, int64_t group_size, int64_t rows_per_warp);
at::Tensor gptq_dequant(const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size);
"""


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

    source = SOURCE.read_text()
    major, minor = torch.cuda.get_device_capability()
    digest = hashlib.sha256((source + _DECLARATIONS + torch.__version__).encode()).hexdigest()[:12]
    tag = f"gptqgw_cuda_{digest}_sm{major}{minor}"
    return load_inline(
        name=tag,
        cpp_sources=[_DECLARATIONS],
        cuda_sources=[source],
        functions=["gptq_gemv", "gptq_dequant"],
        extra_cuda_cflags=[
            "-O3",
            "--expt-relaxed-constexpr",
            f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}",
        ],
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
