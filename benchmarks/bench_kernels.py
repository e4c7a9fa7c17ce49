"""Per-shape 4-bit matmul times on the GPU against FP16 cuBLAS, torch's int4 kernel and gemlite.

    python benchmarks/bench_kernels.py [--sweep [KERNEL ...]] [--json PATH]

Llama-2-7B shapes (q|k|v fused, o, gate|up fused, down, and the 4096x11008 of the seed's table) at
several row counts M. gemlite 0.6 (Triton A16W4, `pip install gemlite`) is an optional peer column,
left out with a note on stderr when it does not import. Every contender is timed as CUDA-graph
replays over rotating weight copies (benchmarks/gpu_timing.py). `--sweep` also tries the
configurations of each kernel (or of the named ones) and reports the best, which is how the defaults
in gateway/kernels/gpu_backend.py were chosen.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_timing import copies_for, copy_bandwidth_gbs, graph_time_us
from gateway.kernels import cuda_ext, mma_layout
from gateway.kernels.gpu_backend import (
    _frag_gemv_config,
    _mma_config,
    _pipe_config,
    by_parts,
    frag_auto_path,
)
from gateway.kernels.packing import unpack_rows
from gateway.kernels.triton_gemm import gemm
from gateway.kernels.triton_layout import GpuQuantWeight, dequantize_reference

SHAPES = {  # name: (in_features, out_features)
    "qkv 4096x12288": (4096, 12288),
    "o 4096x4096": (4096, 4096),
    "gate_up 4096x22016": (4096, 22016),
    "down 11008x4096": (11008, 4096),
    "4096x11008": (4096, 11008),
}
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 2048)
GROUP = 128
# gpu_backend's "auto" path for fragment-layout layers -> the contender timing it here.
SERVED_NAME = {
    "frag_gemv": "cuda_frag_gemv",
    "mma": "cuda_mma",
    "mma_pipe": "cuda_mma_pipe",
    "frag_dequant": "cuda_frag_dequant_cublas",
}

# Triton tensor-core configurations (block_m, block_n, block_k, warps, stages, split_k).
SMALL_M_GEMM = [
    dict(block_m=16, block_n=128, block_k=64, num_warps=4, num_stages=4, split_k=1),
    *(
        dict(block_m=bm, block_n=bn, block_k=128, num_warps=4, num_stages=3, split_k=sk)
        for bm, bn, sk in itertools.product((16, 32, 64), (32, 64), (2, 4, 8))
    ),
]
FRAG_GEMV_CONFIGS = [
    dict(tiles_per_block=t, steps_per_warp=s) for t in (1, 2) for s in (4, 8, 11, 16)
]
LARGE_M_GEMM = [
    dict(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
    dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4),
]


def random_weight(k: int, n: int, gen: torch.Generator) -> GpuQuantWeight:
    words = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), generator=gen, dtype=torch.int32)
    groups = -(-k // GROUP)
    scales = torch.rand(n, groups, generator=gen) * 0.01 + 0.001
    return GpuQuantWeight(
        qweight_t=words.cuda(),
        scales_t=scales.half().cuda(),
        zeros_t=None,
        perm=None,
        bits=4,
        group_size=GROUP,
        in_features=k,
        out_features=n,
    )


def torch_int4_weights(
    k: int, n: int, copies: int
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    try:
        out = []
        for _ in range(copies):
            nibbles = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
            packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, 8)
            sz = torch.rand(k // GROUP, n, 2, device="cuda", dtype=torch.bfloat16) * 0.01
            out.append((packed, sz))
        return out
    except (RuntimeError, NotImplementedError) as exc:
        print(f"torch int4 unavailable: {exc}", file=sys.stderr)
        return None


def gemlite_weights(weights: list[GpuQuantWeight]) -> list | None:
    """gemlite 0.6 A16W4 layers holding the same matrices as `weights` (None without gemlite).

    gemlite queries the GPU when imported, so the import is here and any failure skips the column.
    `A16Wn.from_weights(W_q, scales, zeros, W_nbits, group_size)` takes uint8 [out, in] values in
    [0, 16) and fp16 [out, in / group] scales and zeros, meaning W = (W_q - zeros) * scales.
    """
    try:
        from gemlite.helper import A16Wn

        out = []
        for w in weights:
            if w.perm is not None:
                raise ValueError("gemlite takes no act-order permutation")
            w_q = unpack_rows(w.qweight_t.t().contiguous(), w.bits).t().to(torch.uint8)
            zeros = torch.full_like(w.scales_t, w.sym_zero) if w.zeros_t is None else w.zeros_t
            out.append(
                A16Wn(device=str(w.qweight_t.device), dtype=torch.float16).from_weights(
                    w_q.contiguous(), w.scales_t, zeros, w.bits, w.group_size, bias=w.bias
                )
            )
        return out
    except Exception as exc:  # not installed, no GPU at import, or a shape it rejects
        print(f"gemlite unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def check(out: torch.Tensor, x: torch.Tensor, w: GpuQuantWeight) -> float:
    ref = x.float() @ dequantize_reference(w).t()
    return ((out.float() - ref).norm() / ref.norm()).item()


def best_of(configs, make_calls) -> tuple[float, dict]:
    best = (float("inf"), {})
    for cfg in configs:
        try:
            us = graph_time_us(make_calls(cfg))
        except Exception as exc:  # a config the compiler rejects (shared memory, registers)
            print(f"  config {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
            continue
        best = min(best, (us, cfg), key=lambda t: t[0])
    return best


def time_contender(configs: list[dict], fn, weights: list[GpuQuantWeight]) -> tuple[float, dict]:
    """Best (microseconds, config) of `fn(config, weight)` over the configurations."""

    def calls(cfg: dict) -> list:
        return [lambda w=w: fn(cfg, w) for w in weights]

    return best_of(configs, calls)


def bench_rows(m: int, k: int, weights, frags, dense, tint4, glite, sweep: set[str] | None) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    xb = x.to(torch.bfloat16)
    row = {"M": m, "fp16_cublas_us": graph_time_us([lambda w=w: F.linear(x, w) for w in dense])}
    if tint4 is not None:
        row["torch_int4_us"] = graph_time_us(
            [
                lambda p=p, sz=sz: torch.ops.aten._weight_int4pack_mm(xb, p, GROUP, sz)
                for p, sz in tint4
            ]
        )
    if glite is not None:
        try:  # the first call autotunes gemlite's kernel for this M, outside any graph capture
            row["gemlite_err"] = check(glite[0](x), x, weights[0])
            if row["gemlite_err"] > 1e-2:
                print(
                    f"gemlite output is off (relative error {row['gemlite_err']:.2e}) at M={m}: "
                    "its column is left out here",
                    file=sys.stderr,
                )
            else:
                row["gemlite_us"] = graph_time_us([lambda g=g: g(x) for g in glite])
        except Exception as exc:  # a Triton compile or capture failure costs only this column
            print(f"gemlite failed at M={m}: {type(exc).__name__}: {exc}", file=sys.stderr)

    def swept(key: str, configs: list[dict], default: dict) -> list[dict]:
        return configs if sweep is not None and (not sweep or key in sweep) else [default]

    # name: (configurations, fn(config, weight), the weight copies in that kernel's layout)
    contenders: dict = {}
    if m <= 8:
        for rpw in (2, 4):
            contenders[f"cuda_gemv_r{rpw}"] = (
                [{}],
                lambda cfg, w, rpw=rpw: cuda_ext.gemv(x, w, rpw),
                weights,
            )
    configs = LARGE_M_GEMM if m > 64 else SMALL_M_GEMM
    contenders["triton_gemm"] = (
        swept("triton_gemm", configs, configs[0]),
        lambda cfg, w: gemm(x, w, **cfg),
        weights,
    )
    if m <= cuda_ext.FRAG_GEMV_MAX_ROWS:
        contenders["cuda_frag_gemv"] = (
            swept(
                "cuda_frag_gemv", FRAG_GEMV_CONFIGS, _frag_gemv_config(k, weights[0].out_features)
            ),
            lambda cfg, fw: cuda_ext.frag_gemv(x, fw, **cfg),
            frags,
        )
    if m <= 2 * cuda_ext.MMA_MAX_ROWS:  # above MMA_MAX_ROWS on slices
        mma_rows = min(m, cuda_ext.MMA_MAX_ROWS)
        contenders["cuda_mma"] = (
            swept("cuda_mma", cuda_ext.MMA_CONFIGS, _mma_config(mma_rows, weights[0].out_features)),
            lambda cfg, fw: by_parts(
                x, cuda_ext.MMA_MAX_ROWS, lambda p: cuda_ext.mma_gemm(p, fw, **cfg)
            ),
            frags,
        )
    pipe_rows = min(m, cuda_ext.PIPE_MAX_ROWS)
    pipe_configs = [c for c in cuda_ext.PIPE_CONFIGS if cuda_ext.pipe_rows(c) >= pipe_rows]
    contenders["cuda_mma_pipe"] = (
        swept("cuda_mma_pipe", pipe_configs, _pipe_config(pipe_rows, weights[0].out_features)),
        lambda cfg, fw: by_parts(
            x, cuda_ext.pipe_rows(cfg), lambda p: cuda_ext.mma_pipe(p, fw, **cfg)
        ),
        frags,
    )
    if m >= 16:
        contenders["cuda_dequant_cublas"] = (
            [{}],
            lambda cfg, w: cuda_ext.dequant_matmul(x, w),
            weights,
        )
        contenders["cuda_frag_dequant_cublas"] = (
            [{}],
            lambda cfg, fw: cuda_ext.frag_dequant_matmul(x, fw),
            frags,
        )
    for key, (configs, fn, copies) in contenders.items():
        row[f"{key}_err"] = check(fn(configs[0], copies[0]), x, weights[0])
        row[f"{key}_us"], cfg = time_contender(configs, fn, copies)
        if len(configs) > 1:
            row[f"{key}_cfg"] = cfg
    correct = [key for key in contenders if row[f"{key}_err"] < 3e-3]
    row["best"] = min(correct, key=lambda key: row[f"{key}_us"])
    row["best_us"] = row[f"{row['best']}_us"]
    # What "auto" runs for these (4-bit g128) layers, which hold only the fragment layout.
    row["served"] = SERVED_NAME[frag_auto_path(m)]
    row["served_us"] = row[f"{row['served']}_us"]
    row["vs_fp16"] = row["fp16_cublas_us"] / row["served_us"]
    if "torch_int4_us" in row:
        row["vs_torch_int4"] = row["torch_int4_us"] / row["served_us"]
    if "gemlite_us" in row:
        row["vs_gemlite"] = row["gemlite_us"] / row["served_us"]
    return row


def bench_shape(
    name: str, k: int, n: int, rows: tuple[int, ...], sweep: set[str] | None, gen
) -> list[dict]:
    int4_bytes = k * n // 2 + n * (-(-k // GROUP)) * 2
    weights = [random_weight(k, n, gen) for _ in range(copies_for(int4_bytes))]
    frags = [mma_layout.from_gpu_weight(w) for w in weights]
    dense = [
        torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        for _ in range(copies_for(k * n * 2))
    ]
    tint4 = torch_int4_weights(k, n, len(weights))
    glite = gemlite_weights(weights)
    out = []
    for m in rows:
        row = {"shape": name, "in": k, "out": n, "int4_bytes": int4_bytes}
        row.update(bench_rows(m, k, weights, frags, dense, tint4, glite, sweep))
        row["served_hbm_gbs"] = int4_bytes / (row["served_us"] * 1e-6) / 1e9
        print_row(row)
        out.append(row)
    return out


def run(sweep: set[str] | None, shapes: list[str], rows: tuple[int, ...]) -> dict:
    gen = torch.Generator().manual_seed(0)
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "copy_bandwidth_gbs": copy_bandwidth_gbs(),
        "rows": [],
    }
    print(f"device: {results['device']}  copy bandwidth: {results['copy_bandwidth_gbs']:.0f} GB/s")
    for name in shapes:
        k, n = SHAPES[name]
        results["rows"] += bench_shape(name, k, n, rows, sweep, gen)
        torch.cuda.empty_cache()
    return results


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def print_row(r: dict) -> None:
    ours = "  ".join(
        f"{k[:-3]} {r[k]:.1f}"
        for k in r
        if k.endswith("_us")
        and k not in ("fp16_cublas_us", "torch_int4_us", "gemlite_us", "best_us", "served_us")
    )
    print(
        f"{r['shape']:>20} M={r['M']:<5} fp16 {r['fp16_cublas_us']:7.1f}  torch-int4 "
        f"{fmt(r.get('torch_int4_us')):>7}  gemlite {fmt(r.get('gemlite_us')):>7} | {ours} | "
        f"served {r['served']} {r['served_us']:.1f} us "
        f"{r['served_hbm_gbs']:.0f} GB/s x{r['vs_fp16']:.2f} vs fp16 "
        f"x{fmt(r.get('vs_torch_int4'), '.2f')} vs int4 x{fmt(r.get('vs_gemlite'), '.2f')} vs "
        f"gemlite | fastest {r['best']} "
        f"{r.get('triton_gemm_cfg', '')} {r.get('cuda_mma_cfg', '')} "
        f"{r.get('cuda_mma_pipe_cfg', '')} "
        f"{r.get('cuda_frag_gemv_cfg', '')}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sweep",
        nargs="*",
        default=None,
        help="try the configurations of these kernels (of every kernel if none is named)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rows", nargs="*", type=int, default=list(ROWS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels needs a CUDA GPU")
    t0 = time.time()
    results = run(None if args.sweep is None else set(args.sweep), args.shapes, tuple(args.rows))
    results["command"] = " ".join(["python", *sys.argv])
    results["seconds"] = time.time() - t0
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"done in {results['seconds']:.0f} s; {os.environ.get('HOSTNAME', '')}")


if __name__ == "__main__":
    main()
