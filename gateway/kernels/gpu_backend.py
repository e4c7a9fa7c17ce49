"""The CUDA backend of QuantLinear: measured-best kernel per row count (BENCHMARKS.md, "Kernels").

- M <= GEMV_MAX_ROWS (decode of a few sequences): the CUDA C++ GEMV (gateway/kernels/cuda/).
- M <= GEMM_MAX_ROWS (batched decode): the Triton tensor-core kernel with split-K.
- larger M (prefill): the CUDA dequantizer into an fp16 scratch, then cuBLAS.

The layer's canonical buffers are rebound as views of the kernel layout, so the weights live on the
GPU once; a symmetric checkpoint keeps no zero points at all.
"""

from __future__ import annotations

import torch

from gateway.kernels import cuda_ext, triton_gemm
from gateway.kernels.quant_linear import QuantLinear
from gateway.kernels.triton_layout import from_layer

GEMV_MAX_ROWS = 8
GEMM_MAX_ROWS = 64
PATHS = ("auto", "gemv", "gemm", "dequant")  # "auto" chooses per M; the others force one kernel


def supports(layer: QuantLinear) -> bool:
    return (
        layer.qweight.is_cuda
        and layer.bits in (4, 8)
        and layer.row_group is None
        and layer.in_features % (128 // layer.bits) == 0
        and layer.group_size % (128 // layer.bits) == 0
    )


def _gemm_config(rows: int, in_features: int) -> dict:
    # From benchmarks/bench_kernels.py --sweep on the H100 (Llama-2-7B shapes).
    split_k = 8 if in_features > 8192 else 4
    block = 16 if rows <= 16 else 32 if rows <= 32 else 64
    return dict(block_m=block, block_n=32 if block < 64 else 64, block_k=128, split_k=split_k)


class CudaBackend:
    extra_bytes = 0

    def __init__(self, layer: QuantLinear, path: str = "auto") -> None:
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self.path = path
        self.name = "cuda" if path == "auto" else f"cuda:{path}"
        self.weight = from_layer(layer)
        w = self.weight
        # The canonical buffers become views of the kernel layout (no second copy on the GPU).
        layer.qweight = w.qweight_t.t()
        if layer.scales.dtype == torch.float16:
            layer.scales = w.scales_t.t()
        if w.zeros_t is None:
            layer.zeros = layer.scales.new_full((1, 1), w.sym_zero).expand(layer.zeros.shape)
        elif layer.zeros.dtype == torch.float16:
            layer.zeros = w.zeros_t.t()

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        dtype = x2d.dtype
        x = x2d if dtype == torch.float16 else x2d.to(torch.float16)
        rows = x.shape[0]
        path = self.path
        if path == "auto":
            path = (
                "gemv" if rows <= GEMV_MAX_ROWS else "gemm" if rows <= GEMM_MAX_ROWS else "dequant"
            )
        if path == "gemv":
            out = torch.cat([self._gemv(part) for part in x.split(GEMV_MAX_ROWS)])
        elif path == "gemm":
            out = triton_gemm.gemm(x, self.weight, **_gemm_config(rows, self.weight.in_features))
        else:
            out = cuda_ext.dequant_matmul(x, self.weight)
        return out if dtype == torch.float16 else out.to(dtype)

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        # Measured: two rows per warp win for single-row decode of narrow or deep layers.
        narrow = self.weight.out_features <= 4096 or self.weight.in_features > 8192
        return cuda_ext.gemv(x, self.weight, rows_per_warp=2 if x.shape[0] == 1 and narrow else 4)


def make_backend(layer: QuantLinear, path: str = "auto") -> CudaBackend | None:
    if not supports(layer) or not cuda_ext.available():
        return None
    return CudaBackend(layer, path)
