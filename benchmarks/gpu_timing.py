"""Timing GPU work the same way for every contender.

Each contender is timed as CUDA-graph replays, so Python launch overhead is excluded for all of them
alike, and over rotating copies of its weights so that a weight which fits in L2 (50 MB on an H100)
is still read from HBM, as it would be in a model whose other layers evict it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def graph_time_us(calls: list[Callable[[], object]], *, iters: int = 20, trials: int = 5) -> float:
    """Median microseconds per call: `calls` (one per weight copy) captured once in a graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up: compile, autotune, allocate outside the capture
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1000 / (iters * len(calls)))
    return statistics.median(per_call)


def copies_for(nbytes: int, l2_bytes: int = 50 * 2**20) -> int:
    """How many copies of a `nbytes` weight make a rotation that cannot stay in L2."""
    return max(2, -(-3 * l2_bytes // max(nbytes, 1)))


def copy_bandwidth_gbs(nbytes: int = 2**30) -> float:
    """Device-to-device copy, counting bytes read plus bytes written (the METHOD.md convention)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = graph_time_us([lambda: dst.copy_(src)], iters=10)
    return 2 * nbytes / (us * 1e-6) / 1e9
