"""The CUDA backend of QuantLinear: runs the kernel gateway/kernels/registry.py's "auto" table
names for the layer's layout and row count (the table and its measurements live there).

4-bit layers whose in_features and group size are multiples of 128 (Llama-family g128 and
channel-wise checkpoints) take the tensor-core fragment layout (gateway/kernels/mma_layout.py):
the fragment GEMV for one row, the mma.sync kernels for batched decode, the fragment dequantizer
into an fp16 scratch + cuBLAS for prefill. Their canonical `qweight` is released: the fragment
layout is the only copy on the GPU.

Other layers (8-bit, group sizes of 32 or 64, SmolLM2's 576 inputs) keep the row layout
(gateway/kernels/triton_layout.py), whose canonical buffers are views of it: the CUDA C++ GEMV,
the Triton tensor-core kernel with split-K, or the CUDA dequantizer + cuBLAS.
A symmetric checkpoint keeps no zero points at all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gateway.kernels import cuda_ext, mma_layout, registry, triton_gemm
from gateway.kernels.quant_linear import QuantLinear
from gateway.kernels.triton_layout import from_layer

GEMV_MAX_ROWS = registry.BY_NAME["cuda_gemv"].max_rows
MMA_MAX_ROWS = cuda_ext.MMA_MAX_ROWS
# "auto" chooses per layer and M; the others force one kernel ("mma" and "frag_dequant" need a
# layer the fragment layout takes).
PATHS = ("auto", "gemv", "gemm", "dequant", "frag_gemv", "mma", "mma_pipe", "frag_dequant")
ROW_LAYOUT_PATHS = ("gemv", "gemm", "dequant")


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


def frag_auto_path(rows: int) -> str:
    """The kernel "auto" runs for `rows` rows of a fragment-layout layer."""
    return registry.auto_path("fragment", rows)


def _mma_config(rows: int, out_features: int) -> dict:
    # From benchmarks/bench_kernels.py --sweep on the H100 (Llama-2-7B shapes): more warps per
    # block share the staged activations once there are enough rows to make that traffic count,
    # and wide layers at 17-32 rows gain from half as many split-K ranges.
    if rows <= 4:
        return dict(warps=4, tiles_per_warp=2, steps_per_block=4)
    wide = out_features >= 12288
    return dict(warps=8, tiles_per_warp=2, steps_per_block=8 if wide and 16 < rows <= 32 else 4)


def _pipe_config(rows: int, out_features: int) -> dict:
    # The best per row count in the sweep behind registry.AUTO (on 4096x11008 and down the 2x2-warp
    # block also wins at 32 rows; on qkv and gate_up the sweep picked (2, 1, 8, 4) there).
    if rows <= 16:
        return dict(m_tiles=1, warps_m=1, warps_n=8, tiles_per_warp=4)
    if rows <= 64:
        return dict(m_tiles=2, warps_m=2, warps_n=4, tiles_per_warp=4)
    return dict(m_tiles=4, warps_m=2, warps_n=4, tiles_per_warp=4)


def _frag_gemv_config(in_features: int, out_features: int) -> dict:
    # From the same sweep: longer K runs per warp for wider layers; at most 8 warps per block.
    steps = in_features // mma_layout.STEP_K
    run = 4 if out_features <= 4096 else 8 if out_features <= 12288 else 16
    return dict(tiles_per_block=2, steps_per_warp=max(run, -(-steps // 8)))


class _Fp16Backend:
    """Runs the kernels in fp16 whatever the model's dtype; "auto" picks a kernel per row count."""

    path: str

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if x2d.shape[0] == 0:  # the kernels check for at least one row
            return x2d.new_empty((0, self.weight.out_features))
        dtype = x2d.dtype
        x = x2d if dtype == torch.float16 else x2d.to(torch.float16)
        out = self._run(self._auto_path(x.shape[0]) if self.path == "auto" else self.path, x)
        return out if dtype == torch.float16 else out.to(dtype)

    def _auto_path(self, rows: int) -> str:
        raise NotImplementedError

    def _run(self, path: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FragBackend(_Fp16Backend):
    """4-bit layers in the tensor-core fragment layout (see the module docstring)."""

    def __init__(self, layer: QuantLinear, path: str = "auto") -> None:
        self.path = path
        self.name = "cuda:frag" if path == "auto" else f"cuda:{path}"
        self.weight = mma_layout.from_gpu_weight(from_layer(layer))
        cuda_ext.reserve_workspace(layer.qweight.device, layer.out_features)
        # The fragment layout replaces the canonical tensors, which nothing reads once a backend
        # exists; weight_bytes counts the layout instead.
        layer.qweight = layer.qweight.new_empty((0, layer.out_features))
        layer.scales = layer.scales.new_empty((0, layer.out_features))
        layer.zeros = layer.zeros.new_empty((0, layer.out_features))
        self.extra_bytes = self.weight.nbytes - sum(
            t.numel() * t.element_size() for t in (layer.bias, layer.perm) if t is not None
        )

    def _auto_path(self, rows: int) -> str:
        return frag_auto_path(rows)

    def _run(self, path: str, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if path == "frag_gemv":
            config = _frag_gemv_config(w.in_features, w.out_features)
            return by_parts(
                x, cuda_ext.FRAG_GEMV_MAX_ROWS, lambda p: cuda_ext.frag_gemv(p, w, **config)
            )
        if path == "mma":
            return by_parts(
                x,
                MMA_MAX_ROWS,
                lambda p: cuda_ext.mma_gemm(p, w, **_mma_config(p.shape[0], w.out_features)),
            )
        if path == "mma_pipe":
            return by_parts(
                x,
                cuda_ext.PIPE_MAX_ROWS,
                lambda p: cuda_ext.mma_pipe(p, w, **_pipe_config(p.shape[0], w.out_features)),
            )
        return cuda_ext.frag_dequant_matmul(x, w)


class CudaBackend(_Fp16Backend):
    """Layers in the row layout (see the module docstring)."""

    extra_bytes = 0

    def __init__(self, layer: QuantLinear, path: str = "auto") -> None:
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

    def _auto_path(self, rows: int) -> str:
        return registry.auto_path("row", rows)

    def _run(self, path: str, x: torch.Tensor) -> torch.Tensor:
        if path == "gemv":
            return by_parts(x, GEMV_MAX_ROWS, self._gemv)
        if path == "gemm":
            config = _gemm_config(x.shape[0], self.weight.in_features)
            return triton_gemm.gemm(x, self.weight, **config)
        return cuda_ext.dequant_matmul(x, self.weight)

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        # Measured: two rows per warp win for single-row decode of narrow or deep layers.
        narrow = self.weight.out_features <= 4096 or self.weight.in_features > 8192
        return cuda_ext.gemv(x, self.weight, rows_per_warp=2 if x.shape[0] == 1 and narrow else 4)


def by_parts(
    x: torch.Tensor, rows: int, fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """fn over slices of at most `rows` rows; one slice is returned as is (torch.cat would copy it,
    an extra kernel per layer and step)."""
    if x.shape[0] <= rows:
        return fn(x)
    return torch.cat([fn(part) for part in x.split(rows)])


def make_backend(layer: QuantLinear, path: str = "auto") -> CudaBackend | FragBackend | None:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if not supports(layer) or not cuda_ext.available():
        return None
    frag = mma_layout.supports(layer.bits, layer.in_features, layer.out_features, layer.group_size)
    if path in ROW_LAYOUT_PATHS or (path == "auto" and not frag):
        return CudaBackend(layer, path)
    return FragBackend(layer, path) if frag else None
