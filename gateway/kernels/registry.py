"""Every matmul kernel by name, what it takes, and the measured tables "auto" picks from.

The one place that knows the kernels: gateway/kernels/dispatch.py resolves `kernel=` names through
KERNELS, and gateway/kernels/gpu_backend.py runs a GPU kernel's `path` and asks `auto_path` which
one to run. A new kernel is an entry here plus its path in gpu_backend.py (and, for CUDA C++, its
binding in cuda_ext.py). Pure data: importing it needs neither torch nor a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

# The weight layouts the kernels read (each made once at load):
# - "canonical": QuantLinear's packed GPTQ tensors (gateway/kernels/quant_linear.py);
# - "dense": a dequantized copy in the compute dtype, kept instead of the packed weight;
# - "row": int32 [out, in/pack] (gateway/kernels/triton_layout.py), for 4/8 bits and groups of
#   128/bits inputs;
# - "fragment": mma.sync B-fragment order (gateway/kernels/mma_layout.py), 4 bits, in_features
#   and groups multiples of 128.
LAYOUTS = ("canonical", "dense", "row", "fragment")


@dataclass(frozen=True)
class KernelSpec:
    name: str  # the `kernel=` name (QuantLinear, LlamaRunner.load, serve --kernel, benchmarks)
    device: str  # "any" or "cuda"
    layout: str  # one of LAYOUTS
    bits: tuple[int, ...]
    groups: str  # the group sizes it takes, as a user reads them
    max_rows: int | None  # rows one launch takes (more run as slices); None: any
    path: str | None = None  # gpu_backend's path for a CUDA kernel


KERNELS = (
    KernelSpec("torch", "any", "canonical", (2, 3, 4, 8), "any", None),
    KernelSpec("torch_dequant", "any", "dense", (2, 3, 4, 8), "any", None),
    KernelSpec("torch_int4", "any", "canonical", (4,), "multiples of 32, short last ok", None),
    KernelSpec("cuda_gemv", "cuda", "row", (4, 8), "multiples of 128/bits", 8, "gemv"),
    KernelSpec("triton_gemm", "cuda", "row", (4, 8), "multiples of 128/bits", None, "gemm"),
    KernelSpec("cuda_dequant", "cuda", "row", (4, 8), "multiples of 128/bits", None, "dequant"),
    KernelSpec("cuda_frag_gemv", "cuda", "fragment", (4,), "multiples of 128", 8, "frag_gemv"),
    KernelSpec("cuda_mma", "cuda", "fragment", (4,), "multiples of 128", 64, "mma"),
    KernelSpec("cuda_mma_pipe", "cuda", "fragment", (4,), "multiples of 128", 128, "mma_pipe"),
    KernelSpec(
        "cuda_frag_dequant", "cuda", "fragment", (4,), "multiples of 128", None, "frag_dequant"
    ),
)
BY_NAME = {k.name: k for k in KERNELS}

# "auto" per layout: (most rows, path), first match wins. The fragment table from `python
# benchmarks/bench_kernels.py --rows 16 32 64 128 256 2048 --sweep cuda_mma_pipe` on an H100
# (2026-12-07, Llama-2-7B shapes; BENCHMARKS.md "Kernels and serving, second lease of 2026-12-07"):
# the two mma kernels tie at 16 rows; the pipelined one wins at 32-64 (4096x11008 at 64: 42.9 us
# against 47.8); past 64 rows the coalesced dequantizer + cuBLAS wins on three of five shapes (at
# 128 rows 76.3 us against 80.0 and 96.7). That mma beats the fragment GEMV from two rows, and
# the row layout's bounds, are earlier sessions' measurements, not re-run with this table.
AUTO = {
    "fragment": ((1, "frag_gemv"), (16, "mma"), (64, "mma_pipe"), (None, "frag_dequant")),
    "row": ((8, "gemv"), (64, "gemm"), (None, "dequant")),
}
# On CPU "auto" takes the first of these that accepts the layer, else "torch". Measured on
# SmolLM2-135M 4-bit g128, batch-1 decode (BENCHMARKS.md "CPU decode"): torch's int4 CPU kernel is
# 6-80x slower than an fp32 GEMM with fp32 activations on an AVX2 CPU, so the dense copy wins.
CPU_AUTO = ("torch_dequant",)


def auto_path(layout: str, rows: int) -> str:
    """The GPU path "auto" runs for `rows` rows of a layer in `layout`."""
    for most, path in AUTO[layout]:
        if most is None or rows <= most:
            return path
    raise AssertionError(f"AUTO[{layout!r}] has no catch-all entry")


def gpu_paths() -> dict[str, str]:
    """`kernel=` name -> gpu_backend path, "cuda" meaning the GPU's own auto."""
    return {"cuda": "auto", **{k.name: k.path for k in KERNELS if k.path is not None}}
