"""The seam between QuantLinear and the kernels: pick an implementation per device and row count.

`prepare(layer)` runs once at load: it resolves the layer's `kernel` request into a backend object
(which may build its own weight layout then) and stores it as `layer.backend`; every call afterwards
is `layer.backend.matmul(x2d)`, so no choice is made per step beyond comparing M, a Python int known
from the shape (safe inside a captured CUDA graph).

Kernel names (`kernel=` of QuantLinear and LlamaRunner.load) are gateway/kernels/registry.py's:
- "auto": CUDA -> gateway/kernels/gpu_backend.py, which runs the registry's measured table per row
  count, or "torch" for a layer it cannot run (2/3 bits, irregular groups); CPU -> the first of
  registry.CPU_AUTO that accepts the layer.
- "torch", "torch_dequant", "torch_int4": the torch backends (see gateway/kernels/torch_kernels.py).
- "cuda": the GPU backend as "auto" picks it, but an error where it cannot run.
- every other name forces one GPU kernel for every M (benchmarks).

The GPU module is imported lazily so a CPU install never needs Triton or nvcc. It exposes

    make_backend(layer: QuantLinear, path: str) -> Backend | None

returning None when it cannot run that layer, where Backend has `name: str`, `extra_bytes: int`
(memory beyond the canonical packed tensors) and `matmul(x2d: Tensor[M, in]) -> Tensor[M, out]`
(bias included, act-order permutation included).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from gateway.kernels import registry
from gateway.kernels.quant_linear import QuantLinear
from gateway.kernels.torch_kernels import TORCH_BACKENDS, Backend, TorchUnpack
from quantize.errors import UserInputError

GPU_PATHS = registry.gpu_paths()  # kernel name -> the GPU backend's path
KERNEL_NAMES = ("auto", *(k.name for k in registry.KERNELS if k.path is None), *GPU_PATHS)


def check_kernel_name(kernel: str) -> None:
    if kernel not in KERNEL_NAMES:
        raise UserInputError(
            f"kernel: unknown kernel {kernel!r}; choose one of {', '.join(KERNEL_NAMES)}"
        )


def prepare(layer: QuantLinear) -> Backend:
    """Resolve `layer.kernel` for the layer's device and build the backend (once, at load)."""
    check_kernel_name(layer.kernel)
    layer.backend = _resolve(layer, layer.kernel, layer.qweight.device)
    return layer.backend


def _resolve(layer: QuantLinear, kernel: str, device: torch.device) -> Backend:
    if kernel in TORCH_BACKENDS:
        backend_cls = TORCH_BACKENDS[kernel]
        if not backend_cls.supports(layer):
            raise UserInputError(
                f"kernel: {kernel!r} cannot run a layer with bits={layer.bits}, "
                f"group_size={layer.group_size}, in_features={layer.in_features} on {device.type}"
            )
        return backend_cls(layer)
    if device.type != "cuda":
        if kernel in GPU_PATHS:
            raise UserInputError(f"kernel: {kernel!r} needs a CUDA GPU; the layer is on {device}")
        for name in registry.CPU_AUTO:
            if TORCH_BACKENDS[name].supports(layer):
                return TORCH_BACKENDS[name](layer)
        return TorchUnpack(layer)

    module = _import_optional("gateway.kernels.gpu_backend")
    path = GPU_PATHS.get(kernel, "auto")
    backend = None if module is None else module.make_backend(layer, path)
    if backend is not None:
        return backend
    if kernel == "auto":
        return TorchUnpack(layer)
    raise UserInputError(
        f"kernel: {kernel!r} is not available for this layer (bits={layer.bits}, "
        f"group_size={layer.group_size}, in_features={layer.in_features}); the GPU kernels take "
        "4 and 8 bits with in_features and group size multiples of 128/bits, and need triton"
    )


def _import_optional(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        # Only "the module or Triton is absent" means fall back; a bug inside it must surface.
        if exc.name in (name, "triton") or (exc.name or "").startswith("triton."):
            return None
        raise
