"""The Triton kernels against float64 references: on the GPU, and in Triton's CPU interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = Path(__file__).with_name("triton_cases.py")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernels_on_gpu() -> None:
    sys.path.insert(0, str(CASES.parent))
    import triton_cases

    assert triton_cases.run("cuda", quick=False) == []


@pytest.mark.slow
def test_triton_kernels_in_cpu_interpreter() -> None:
    # The interpreter runs the same kernel code with numpy, so CI checks the kernels' indexing,
    # masking and group handling without a GPU. It must be on before triton is imported.
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(CASES), "quick"], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.rstrip().endswith("\n0 failures on cpu")
