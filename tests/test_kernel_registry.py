"""gateway/kernels/registry.py: the kernel table that dispatch and the GPU backend read."""

from __future__ import annotations

import pytest

from gateway.kernels import dispatch, registry
from gateway.kernels.torch_kernels import TORCH_BACKENDS


def test_every_kernel_name_resolves_to_a_backend_or_a_gpu_path() -> None:
    torch_names = {k.name for k in registry.KERNELS if k.path is None}
    assert torch_names == set(TORCH_BACKENDS)
    assert set(dispatch.KERNEL_NAMES) == {"auto", "cuda", *registry.BY_NAME}
    assert len(dispatch.KERNEL_NAMES) == len(set(dispatch.KERNEL_NAMES))
    for spec in registry.KERNELS:
        assert spec.layout in registry.LAYOUTS
        assert (spec.device == "cuda") == (spec.path is not None)


def test_gpu_paths_cover_the_backend_and_auto_tables() -> None:
    gpu_backend = pytest.importorskip("gateway.kernels.gpu_backend")
    assert set(registry.gpu_paths().values()) == set(gpu_backend.PATHS)
    by_path = {k.path: k for k in registry.KERNELS if k.path is not None}
    for layout, table in registry.AUTO.items():
        bounds = [most for most, _ in table]
        assert bounds[-1] is None and bounds[:-1] == sorted(bounds[:-1])  # ordered, catch-all last
        assert all(by_path[path].layout == layout for _, path in table)


@pytest.mark.parametrize(
    ("rows", "path"),
    [(1, "frag_gemv"), (2, "mma"), (16, "mma"), (17, "mma_pipe"), (64, "mma_pipe"),
     (65, "frag_dequant"), (2048, "frag_dequant")],
)  # fmt: skip
def test_fragment_auto_table_boundaries(rows: int, path: str) -> None:
    assert registry.auto_path("fragment", rows) == path


@pytest.mark.parametrize(
    ("rows", "path"), [(1, "gemv"), (8, "gemv"), (9, "gemm"), (64, "gemm"), (65, "dequant")]
)
def test_row_auto_table_boundaries(rows: int, path: str) -> None:
    assert registry.auto_path("row", rows) == path
