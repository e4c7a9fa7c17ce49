"""Every GPU kernel once, at small odd shapes, for compute-sanitizer (issue 12, deliverable 8):

    compute-sanitizer --tool memcheck --target-processes all \\
        python3 benchmarks/diagnostics/sanitize_kernels.py
    compute-sanitizer --tool racecheck --target-processes all \\
        python3 benchmarks/diagnostics/sanitize_kernels.py --fragment-only

Runs the Triton kernels through tests/triton_cases.py's quick cases (GEMM, row-layout CUDA
GEMV and dequantizer, norms, RoPE+cache, paged attention with fp16 and fp8 caches), then each
fragment-layout CUDA kernel and configuration (mma, pipelined mma with forced splits, fragment
GEMV, fragment dequantizer) against a float64 reference. Exits 1 on a wrong result; the
sanitizer's own exit code reports what it found. Shapes stay small: under memcheck a kernel runs
10-100x slower.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from triton_cases import fragment_outputs, make_linear, rel_err  # noqa: E402
from triton_cases import run as triton_quick_cases  # noqa: E402

from gateway.kernels import mma_layout  # noqa: E402

# (in, out, bits, group_size, sym, act_order, bias): a partial split-K range (1408 = 11 k128
# steps), channel-wise groups with a bias, asymmetric zeros with act-order.
FRAGMENT_CASES = [
    (1408, 264, 4, 128, True, False, False),
    (1536, 200, 4, -1, False, False, True),
    (768, 40, 4, 256, False, True, True),
]
ROWS = (1, 5, 17, 64, 100)


def fragment_cases() -> list[str]:
    gen = torch.Generator().manual_seed(8)
    failures = []
    for case in FRAGMENT_CASES:
        w, dense, b = make_linear(*case, gen, "cuda")
        fw = mma_layout.from_gpu_weight(w)
        for m in ROWS:
            x = torch.randn(m, case[0], generator=gen).half()
            ref = x.double() @ dense + (0 if b is None else b.double())
            xd = x.cuda()
            outs = fragment_outputs(xd, fw, pipe_splits=(1, 3))
            for name, out in outs.items():
                err = rel_err(out, ref)
                ok = err < 3e-3 and out.shape == (m, case[1])
                line = f"{name} case={case} M={m}: rel err {err:.1e} {'ok' if ok else 'FAIL'}"
                print(line, flush=True)
                if not ok:
                    failures.append(line)
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--fragment-only", action="store_true", help="only the CUDA C++ fragment kernels"
    )
    args = parser.parse_args()
    failures = [] if args.fragment_only else triton_quick_cases("cuda", quick=True)
    failures += fragment_cases()
    torch.cuda.synchronize()
    print(f"{len(failures)} wrong results")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
