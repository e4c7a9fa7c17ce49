"""Where a serving step's GPU time goes: kernel times of one decode step and one mixed step.

    python benchmarks/diagnostics/step_profile.py --checkpoint W4 [--checkpoint FP16]
        [--kv-cache-dtype auto fp8] [--rows 64] [--context 640] [--json PATH]

For each checkpoint and KV dtype, `rows` sequences of `context` cached tokens (bench_serve's c=64
load midway through its 256 output tokens) on the runner the server uses (max_model_len 4096, so
the decode graphs bound attention by 4,096 positions as served), then:
- decode: the CUDA-graph step timed over 20 replays, and its kernels from torch.profiler;
- mixed: one eager step of rows - 4 decode rows plus 4 prompt chunks of 512 tokens (a 2,048-token
  budget, as bench_serve's prefills ride along), host wall time against its kernels' sum;
- prefix: one eager step of 15 decode rows plus a 32-token chunk after 2,048 cached tokens
  (bench_serve's prefix case with caching on), and prefix16: 16 such chunks arriving together.
Kernels are grouped by name; the table prints each group's microseconds per step.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gateway.model.llama import LlamaRunner  # noqa: E402
from gateway.model.step_batch import SeqChunk  # noqa: E402

BLOCK = 16
MAX_MODEL_LEN = 4096


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def kernel_times(run, steps: int, device: str) -> dict[str, float]:
    """Microseconds per step for each kernel name over `steps` calls of `run` (on CPU: each
    top-level aten op's self time, for a smoke run of this script)."""
    sync(device)
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            run()
        sync(device)
    totals: dict[str, float] = defaultdict(float)
    if device == "cuda":
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                totals[event.name[:60]] += event.device_time / steps
    else:
        for event in prof.key_averages():
            totals[event.key[:60]] += event.self_cpu_time_total / steps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def wall_ms(run, steps: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    sync(device)
    return (time.perf_counter() - t0) * 1000 / steps


def profile_runner(path: Path, kv: str, args: argparse.Namespace) -> dict:
    per_seq = -(-(max(args.context, 512) + 64) // BLOCK)
    long_blocks = -(-(2048 + 64) // BLOCK)
    runner = LlamaRunner.load(
        path,
        device=args.device,
        max_model_len=MAX_MODEL_LEN,
        num_blocks=args.rows * per_seq + long_blocks,
        max_num_seqs=args.rows,
        kv_cache_dtype=kv,
    )
    tables = [list(range(s * per_seq, (s + 1) * per_seq)) for s in range(args.rows)]
    tables.append(list(range(args.rows * per_seq, args.rows * per_seq + long_blocks)))
    gen = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(3, min(runner.spec.vocab_size, 32000), (n,), generator=gen).tolist()

    for first in range(0, args.rows, 4):  # fill the cache, 4 prompts a step
        runner.execute(
            [SeqChunk(prompt(args.context), 0, tables[s]) for s in range(first, first + 4)]
        )
    long_seq = args.rows  # the prefix case's sequence: 2,048 cached tokens
    runner.execute([SeqChunk(prompt(2048), 0, tables[long_seq])])
    tokens = prompt(args.rows)

    def decode_chunks(count: int) -> list[SeqChunk]:
        return [SeqChunk([tokens[s]], args.context, tables[s]) for s in range(count)]

    decode = decode_chunks(args.rows)
    mixed = decode_chunks(args.rows - 4) + [
        SeqChunk(prompt(512), 0, tables[s]) for s in range(args.rows - 4, args.rows)
    ]
    prefix = [*decode_chunks(min(15, args.rows)), SeqChunk(prompt(32), 2048, tables[long_seq])]
    # 16 requests arriving together on one cached prefix (they write the same tail slots here,
    # which changes no timing).
    prefix16 = [SeqChunk(prompt(32), 2048, tables[long_seq]) for _ in range(16)]
    row: dict = {"checkpoint": str(path), "kv_cache_dtype": kv, "kernels": runner.spec.kernels}
    cases = {"decode": decode, "mixed": mixed, "prefix": prefix, "prefix16": prefix16}
    for name, chunks in cases.items():

        def run(chunks: list[SeqChunk] = chunks) -> None:
            runner.execute(chunks)

        run()
        steps = 20 if name == "decode" else 5
        wall = wall_ms(run, steps, args.device)
        kernels = kernel_times(run, steps if name == "decode" else 3, args.device)
        gpu = sum(kernels.values()) / 1000
        row[name] = {"wall_ms": round(wall, 3), "kernel_sum_ms": round(gpu, 3), "kernels": kernels}
        print(f"\n{path.name} kv={kv} {name}: wall {wall:.2f} ms/step, kernels {gpu:.2f} ms/step")
        for kernel, us in list(kernels.items())[: args.top]:
            print(f"  {us:9.1f} us  {us / 10 / max(gpu, 1e-9):5.1f}%  {kernel}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, action="append", required=True)
    parser.add_argument("--kv-cache-dtype", nargs="+", default=["auto"])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--context", type=int, default=640)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"device": device, "rows": args.rows, "context": args.context}
    report["runs"] = []
    for path in args.checkpoint:
        for kv in args.kv_cache_dtype:
            report["runs"].append(profile_runner(path, kv, args))
            gc.collect()  # the runner and its graphs reference each other
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
