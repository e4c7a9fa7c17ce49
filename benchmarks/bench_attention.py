"""Paged decode attention against the copy bandwidth, fp16 and fp8 KV, over launch configs.

    python benchmarks/bench_attention.py [--rows 64] [--context 640] [--kv-len 4096]
        [--kv-heads 32] [--sweep] [--json PATH]

One layer of the serving load: `rows` sequences of `context` cached tokens each, on shuffled
blocks, Llama-2-7B heads (32 x 128). `--kv-len` is what a CUDA graph bounds lengths by (the
server's --max-model-len). Each figure is bytes of K, V (and fp8 scales) read per call over the
graph-timed call, beside a plain device copy measured in the same run. `--sweep` times every
DecodeAttentionConfig of SWEEP and then split lengths for the best one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_timing import copy_bandwidth_gbs, graph_time_us  # noqa: E402
from gateway.kernels.triton_ops import (  # noqa: E402
    DECODE_ATTENTION,
    DecodeAttentionConfig,
    paged_decode_attention,
)
from gateway.model.kv_cache import block_scales, quantize_kv  # noqa: E402

HEADS, HEAD_DIM, BLOCK = 32, 128, 16
SWEEP = [
    DecodeAttentionConfig(block_l=bl, num_warps=w, num_stages=st, dot_min_group=dot)
    for dot, bl, w, st in itertools.product((1, 64), (16, 32, 64, 128), (4, 8), (2, 3))
    if not (dot == 64 and bl == 128)  # fp32 products over 128 keys need too many registers
]
SPLITS = (128, 256, 512, 1024)


def make_inputs(args: argparse.Namespace, fp8: bool) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    per_seq = -(-args.context // BLOCK)
    num_blocks = args.rows * per_seq
    shape = (num_blocks, BLOCK, args.kv_heads, HEAD_DIM)
    k = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16)
    v = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16)
    scales = None
    if fp8:
        (k, ks), (v, vs) = quantize_kv(k), quantize_kv(v)
        scales = (block_scales(ks), block_scales(vs))
    order = torch.randperm(num_blocks, generator=gen, device="cuda").to(torch.int32)
    width = -(-args.kv_len // BLOCK)
    tables = torch.zeros((args.rows, width), dtype=torch.int32, device="cuda")
    tables[:, :per_seq] = order.view(args.rows, per_seq)
    lens = torch.full((args.rows,), args.context, dtype=torch.int32, device="cuda")
    q = torch.randn((args.rows, HEADS, HEAD_DIM), generator=gen, device="cuda").half()
    read = k.numel() * k.element_size() * 2
    if scales is not None:
        read += sum(s.numel() * s.element_size() for s in scales)
    return {"q": q, "k": k, "v": v, "tables": tables, "lens": lens, "scales": scales, "bytes": read}


def time_config(
    inputs: dict, kv_len: int, config: DecodeAttentionConfig, split_len: int = 256
) -> float:
    def call() -> None:
        paged_decode_attention(
            inputs["q"], inputs["k"], inputs["v"], inputs["tables"], inputs["lens"],
            kv_len=kv_len, split_len=split_len, kv_scales=inputs["scales"], config=config,
        )  # fmt: skip

    return graph_time_us([call])


def label(config: DecodeAttentionConfig, split_len: int, group: int) -> str:
    kind = "dot" if group >= config.dot_min_group else "products"
    return f"{kind} l{config.block_l} w{config.num_warps} s{config.num_stages} split{split_len}"


def bench_kv(args: argparse.Namespace, kv: str, copy_gbs: float) -> list[dict]:
    """Rows for one KV dtype: the default launch, the sweep if asked, the default at the exact
    length (no graph bound), then split lengths for the best config."""
    inputs = make_inputs(args, fp8=kv == "fp8")
    group = HEADS // args.kv_heads
    rows: list[dict] = []

    def measure(config: DecodeAttentionConfig, split_len: int, kv_len: int) -> None:
        us = time_config(inputs, kv_len, config, split_len)
        gbs = inputs["bytes"] / (us * 1e-6) / 1e9
        note = "" if kv_len == args.kv_len else f" kv_len={kv_len}"
        row = {
            "kv": kv,
            "config": label(config, split_len, group) + note,
            "us": round(us, 2),
            "gb_s": round(gbs, 1),
            "of_copy": round(gbs / copy_gbs, 3),
            "default": config == DECODE_ATTENTION and split_len == 256 and not note,
        }
        rows.append(row)
        print(f"{kv:>5} {row['config']:<34} {us:8.1f} {gbs:7.0f} {row['of_copy']:8.1%}", flush=True)

    configs = [DECODE_ATTENTION]
    if args.sweep:
        configs += [c for c in SWEEP if c != DECODE_ATTENTION]
    timed = []
    for config in configs:
        measure(config, 256, args.kv_len)
        timed.append((rows[-1]["us"], config))
    measure(DECODE_ATTENTION, 256, args.context)
    if args.sweep:
        best = min(timed, key=lambda t: t[0])[1]
        for split_len in SPLITS:
            if split_len != 256:
                measure(best, split_len, args.kv_len)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--context", type=int, default=640)
    parser.add_argument("--kv-len", type=int, default=4096)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    copy_gbs = copy_bandwidth_gbs()
    device = torch.cuda.get_device_name()
    print(f"device: {device}; copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    print(f"{args.rows} rows x {args.context} tokens, {args.kv_heads} kv heads, graph kv_len "
          f"{args.kv_len}")  # fmt: skip
    print(f"{'kv':>5} {'config':<34} {'us':>8} {'GB/s':>7} {'of copy':>8}")
    results = bench_kv(args, "fp16", copy_gbs) + bench_kv(args, "fp8", copy_gbs)
    for kv in ("fp16", "fp8"):
        best = min((r for r in results if r["kv"] == kv), key=lambda r: r["us"])
        print(f"best {kv}: {best['config']} {best['us']} us, {best['of_copy']:.1%} of copy")
    if args.json:
        report = {
            "device": device,
            "copy_gb_s": round(copy_gbs, 1),
            **{k: getattr(args, k) for k in ("rows", "context", "kv_len", "kv_heads")},
            "results": results,
        }
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
