"""What bounds the pipelined mma kernel (gateway/kernels/cuda/mma_pipe.cu): time it whole, and
rebuilt without its loads, without its products, and without its barriers. The rebuilt ones
compute garbage; their times only say how long each half takes alone. Prints a table, writes JSON.

    python benchmarks/diagnostics/mma_pipe_whatif.py [--json PATH]

Eager launches over four rotating 4096x11008 weights, so the times run a little above
bench_kernels' graph-timed ones; compare the rows with each other.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gateway.kernels import cuda_ext  # noqa: E402
from gateway.kernels.mma_layout import FragWeight  # noqa: E402

# (rows, m_tiles, warps_m, warps_n, tiles_per_warp)
CASES = ((16, 1, 1, 8, 4), (64, 2, 2, 4, 4), (64, 4, 1, 8, 4), (128, 4, 2, 4, 4))
# build -> (no loads, no products, no barriers)
BUILDS = {
    "full kernel": (0, 0, 0),
    "no loads": (1, 0, 0),
    "no products": (0, 1, 0),
    "no barriers or waits": (0, 0, 1),
    "no loads, no barriers": (1, 0, 1),
}


def whatif_source() -> str:
    """mma_pipe.cu with three switches, compiled only for CASES' configs."""
    src = (cuda_ext.CUDA_DIR / "mma_pipe.cu").read_text()
    edits = (
        (
            "  auto load_stage = [&](int slot, int s) {\n",
            "  auto load_stage = [&](int slot, int s) {\n    if (WHATIF_NO_LOADS) return;\n",
        ),
        (
            "    if (!warp_has_rows) continue;",
            "    if (WHATIF_NO_PRODUCTS || !warp_has_rows) continue;",
        ),
        (
            '    asm volatile("cp.async.wait_group %0;\\n" ::"n"(kStages - 2));\n'
            "    __syncthreads();\n",
            "    if (!WHATIF_NO_BARRIERS) {\n"
            '      asm volatile("cp.async.wait_group %0;\\n" ::"n"(kStages - 2));\n'
            "      __syncthreads();\n    }\n",
        ),
    )
    for old, new in edits:
        if old not in src:
            raise SystemExit(f"mma_pipe.cu changed; update this script's edit of {old.strip()!r}")
        src = src.replace(old, new, 1)
    start = src.index("#define GPTQGW_PIPE_CONFIGS(X) \\")
    end = src.index("\n\n", start)
    configs = " ".join(f"X({mt}, {wm}, {wn}, {nt})" for _, mt, wm, wn, nt in CASES)
    src = src[:start] + f"#define GPTQGW_PIPE_CONFIGS(X) {configs}" + src[end:]
    # check_frag lives in mma_gemm.cu, which this build leaves out.
    return src + (
        "\nvoid gptqgw::check_frag(const at::Tensor&, const at::Tensor&,"
        " const std::optional<at::Tensor>&, int64_t) {}\n"
    )


def build(name: str, switches: tuple[int, int, int]) -> object:
    defines = "".join(
        f"#define WHATIF_{flag} {value}\n"
        for flag, value in zip(("NO_LOADS", "NO_PRODUCTS", "NO_BARRIERS"), switches, strict=True)
    )
    declaration = next(d for d in cuda_ext._DECLARATIONS.split(";") if "gptq_mma_pipe" in d) + ";"
    tag = "whatif_" + "".join(str(v) for v in switches)
    directory = Path("/tmp") / tag
    directory.mkdir(exist_ok=True)
    return load_inline(
        name=tag,
        cpp_sources=[declaration],
        cuda_sources=[defines + whatif_source()],
        functions=["gptq_mma_pipe"],
        extra_cuda_cflags=[
            "-O3",
            "--expt-relaxed-constexpr",
            "-gencode=arch=compute_90,code=sm_90",
        ],
        extra_include_paths=[str(cuda_ext.CUDA_DIR)],
        build_directory=str(directory),
    )


def random_weight(k: int, n: int, seed: int) -> FragWeight:
    gen = torch.Generator().manual_seed(seed)
    qfrag = torch.randint(
        -(2**31), 2**31 - 1, (n // 8, k // 128, 32, 4), generator=gen, dtype=torch.int32
    )
    scales = (torch.rand(k // 128, n, generator=gen) * 0.01 + 0.001).half()
    return FragWeight(qfrag.cuda(), scales.cuda(), None, None, 128, k, n)


def time_us(call, reps: int = 200) -> float:
    for i in range(8):
        call(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for i in range(reps):
        call(i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "mma_pipe_whatif.json")
    args = parser.parse_args()
    modules = {name: build(name, switches) for name, switches in BUILDS.items()}
    weights = [random_weight(4096, 11008, seed) for seed in range(4)]  # rotate past L2
    device = torch.device("cuda")
    cuda_ext.reserve_workspace(device, 11008)
    workspace, counters = cuda_ext._workspaces[device]
    x = torch.randn(128, 4096, device=device).half()
    results: dict[str, dict[str, float]] = {}
    for name, module in modules.items():
        results[name] = {}
        for rows, mt, wm, wn, nt in CASES:

            def call(i: int, rows=rows, cfg=(mt, wm, wn, nt), module=module) -> None:
                w = weights[i % 4]
                module.gptq_mma_pipe(
                    x[:rows], w.qfrag, w.scales, None, None, workspace, counters, 128, *cfg, 0
                )

            results[name][f"{rows} rows {(mt, wm, wn, nt)}"] = time_us(call)
    columns = list(next(iter(results.values())))
    print("| build (µs) | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name()
    args.json.write_text(json.dumps({"device": device_name, "us": results}, indent=1))
    print(f"device: {device_name}; JSON: {args.json}")


if __name__ == "__main__":
    main()
