"""End-to-end serving benchmark (issue 11): the real `gptq-gateway serve`, driven over gRPC (and
the REST shim) by load generators in this process. Prints a table, writes JSON.

For each checkpoint (4-bit, then FP16 when given), one server process:
- closed loop at each concurrency: C workers, each sends its next request when the last ends;
  random token-id prompts (no shared prefix), greedy, `ignore_eos`, so every request produces
  exactly --max-tokens tokens. The workers start staggered over one request's duration alone
  (--stagger, on by default). Started together, equal-length requests move in waves: C prompts
  arrive at once, so the last one's TTFT is C prefills long whatever the server does (at c=64,
  64 x 7 TFLOP of Llama-2-7B prefill is about 0.9 s at 500 TFLOP/s). Staggered, arrivals stay
  spread, as on a server with many users. The "steady" figures count only requests after each
  worker's first, and output tokens between the moment every worker is busy and the moment the
  queue runs dry;
- optionally an open loop with Poisson arrivals (--poisson-rate requests/s);
- optionally the REST shim in front of the same server at one concurrency (--shim-concurrency),
  against gRPC at the same concurrency in the same run.
Then the prefix case on the 4-bit checkpoint: requests sharing a long prefix plus a short unique
tail, on a server with prefix caching (the default) and one with `--no-prefix-caching`.

Figures: output tok/s (all generated tokens over the case's wall time), TTFT and inter-token
gaps per request, the server's peak KV blocks (polled from /metrics), preemptions, and this
process's CPU time (so a client-bound case shows itself). Ratios: 4-bit over FP16 at each
concurrency, shim over gRPC, and no-cache TTFT over cached TTFT.

    python benchmarks/bench_serve.py --w4 CKPT4 --fp16 CKPT16 --device cuda --json OUT.json
    python benchmarks/bench_serve.py --w4 CKPT4 --device cpu --quick   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_grpc import free_port, machine, own_cpu_s, run_loop, stop, wait_serving  # noqa: E402
from bench_openai import wait_http_ready  # noqa: E402

from gateway.client import AsyncGatewayClient  # noqa: E402
from gateway.engine.step_timing import KINDS, PHASES  # noqa: E402

# ----------------------------------------------------------------------------- one request


@dataclass
class RequestTiming:
    """One streamed request, timed from just before it was sent."""

    tokens: int = 0
    ttft_s: float | None = None
    token_gaps_s: list[float] = field(default_factory=list)  # per token after the first
    error: str | None = None
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter, tokens)
    warming: bool = False  # a worker's first request: not in the steady figures


class TimingRecorder:
    """Turns message arrivals into TTFT and per-token gaps. A message carrying k tokens after a
    gap g counts as k gaps of g/k: what a reader of the token stream sees on average."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.timing = RequestTiming()

    def tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        self.timing.arrivals.append((now, count))
        if self.timing.ttft_s is None:
            self.timing.ttft_s = now - self.started
        else:
            self.timing.token_gaps_s.extend([(now - self.last) / count] * count)
        self.last = now


async def grpc_request(
    client: AsyncGatewayClient, ids: list[int], max_tokens: int, guided: Any = None
) -> RequestTiming:
    recorder = TimingRecorder()
    tokens = 0  # counted here: the recorder only times
    try:
        async for chunk in client.generate(
            token_ids=ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, guided=guided
        ):
            tokens += len(chunk.token_ids)
            recorder.tokens(len(chunk.token_ids))
            if chunk.error:
                recorder.timing.error = chunk.error
    except Exception as exc:  # counted, not fatal: a benchmark reports failures
        recorder.timing.error = f"{type(exc).__name__}: {exc}"
    recorder.timing.tokens = tokens
    return recorder.timing


async def shim_request(port: int, ids: list[int], max_tokens: int) -> RequestTiming:
    """One streamed /v1/completions call over a fresh HTTP/1.1 connection, read raw so what is
    timed is the shim, not a client library. Tokens are counted from the final usage."""
    body = json.dumps(
        {
            "model": "bench",
            "prompt": ids,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    recorder = TimingRecorder()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n"
            b"content-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status = await reader.readline()
        if b" 200 " not in status:
            recorder.timing.error = status.decode(errors="replace").strip()
            return recorder.timing
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # headers; the body is chunked
        buffer, usage_tokens = b"", 0
        while size := int((await reader.readline()).strip() or b"0", 16):
            buffer += (await reader.readexactly(size + 2))[:-2]
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if not event.startswith(b"data: {"):
                    continue
                payload = json.loads(event[6:])
                if payload.get("usage"):
                    usage_tokens = payload["usage"]["completion_tokens"]
                if payload.get("choices") and payload["choices"][0].get("text"):
                    recorder.tokens(1)  # one text event per message; exact count from usage
        recorder.timing.tokens = usage_tokens
    except Exception as exc:
        recorder.timing.error = f"{type(exc).__name__}: {exc}"
    finally:
        writer.close()
    return recorder.timing


# ----------------------------------------------------------------------------- load shapes

Issue = Callable[[list[int]], Awaitable[RequestTiming]]


@dataclass
class SteadyWindow:
    """From the moment every worker has sent its first request to the moment the queue is
    empty: the span in which the load is the full concurrency."""

    begins: float = 0.0
    ends: float = 0.0


async def closed_loop(
    issue: Issue,
    prompts: list[list[int]],
    concurrency: int,
    stagger_s: float = 0.0,
    window: SteadyWindow | None = None,
) -> list[RequestTiming]:
    """Worker k sends its first request k/C of `stagger_s` after the start."""
    queue = list(reversed(prompts))
    results: list[RequestTiming] = []
    window = window or SteadyWindow()

    async def worker(k: int) -> None:
        await asyncio.sleep(k * stagger_s / concurrency)
        first = True
        while queue:
            ids = queue.pop()
            if not queue:
                window.ends = time.perf_counter()
            if first and k == concurrency - 1:
                window.begins = time.perf_counter()
            timing = await issue(ids)
            timing.warming, first = first, False
            results.append(timing)

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return results


async def poisson_loop(
    issue: Issue, prompts: list[list[int]], rate: float, seed: int
) -> list[RequestTiming]:
    rng = random.Random(seed)
    tasks = []
    for ids in prompts:
        tasks.append(asyncio.ensure_future(issue(ids)))
        await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 2)


def latency_percentiles(timings: list[RequestTiming], prefix: str = "") -> dict[str, Any]:
    ttfts = [t.ttft_s for t in timings if t.ttft_s is not None]
    gaps = [g for t in timings for g in t.token_gaps_s]
    return {
        f"{prefix}ttft_ms_p50": ms(percentile(ttfts, 50)),
        f"{prefix}ttft_ms_p99": ms(percentile(ttfts, 99)),
        f"{prefix}itl_ms_p50": ms(percentile(gaps, 50)),
        f"{prefix}itl_ms_p99": ms(percentile(gaps, 99)),
    }


def steady_figures(timings: list[RequestTiming], window: SteadyWindow) -> dict[str, Any]:
    """Latency of the requests after each worker's first, and output tok/s in the window."""
    steady = [t for t in timings if not t.warming]
    if not steady or window.ends <= window.begins:
        return {}
    span = window.ends - window.begins
    tokens = sum(
        count for t in timings for at, count in t.arrivals if window.begins <= at <= window.ends
    )
    return {
        "steady_requests": len(steady),
        "steady_window_s": round(span, 3),
        "steady_output_tokens_per_s": round(tokens / span, 1),
        **latency_percentiles(steady, "steady_"),
    }


def summarize(
    timings: list[RequestTiming],
    wall_s: float,
    client_cpu_s: float,
    window: SteadyWindow | None = None,
) -> dict[str, Any]:
    errors = [t.error for t in timings if t.error]
    tokens = sum(t.tokens for t in timings)
    return {
        "requests": len(timings),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "output_tokens": tokens,
        "wall_s": round(wall_s, 3),
        "output_tokens_per_s": round(tokens / wall_s, 1),
        **latency_percentiles(timings),
        **(steady_figures(timings, window) if window else {}),
        "client_cpu_s": round(client_cpu_s, 2),
    }


# ----------------------------------------------------------------------------- the server


class MetricsPoller:
    """Polls the server's /metrics so a case can report its peak KV use and preemptions."""

    NAMES = ("gptqgw_kv_cache_blocks_used", "gptqgw_kv_cache_blocks_total", "gptqgw_preemptions")

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.peak_blocks = 0.0
        self.last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def read(self) -> dict[str, float]:
        text = urllib.request.urlopen(self.url, timeout=5).read().decode()
        values = {}
        for name in self.NAMES:
            match = re.search(rf"^{name}(?:_total)?(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
            if match:
                values[name] = float(match.group(1))
        # Labelled step counters, keyed "name{labels}" (gateway/engine/step_timing.py).
        for match in re.finditer(
            r"^(gptqgw_engine_(?:kind_steps|step_phase_seconds))_total(\{[^}]*\}) (\S+)$",
            text,
            re.MULTILINE,
        ):
            values[match.group(1) + match.group(2)] = float(match.group(3))
        return values

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.last = self.read()
            except OSError:
                continue
            self.peak_blocks = max(self.peak_blocks, self.last.get(NAMES_USED, 0.0))

    def __enter__(self) -> MetricsPoller:
        self.peak_blocks = 0.0
        self.before = self.read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.after = self.read()

    def report(self) -> dict[str, Any]:
        preempt = "gptqgw_preemptions"
        return {
            "kv_blocks_peak": int(max(self.peak_blocks, self.after.get(NAMES_USED, 0.0))),
            "kv_blocks_total": int(self.after.get("gptqgw_kv_cache_blocks_total", 0)),
            "preemptions": int(self.after.get(preempt, 0) - self.before.get(preempt, 0)),
            "steps": self.step_breakdown(),
        }

    def step_breakdown(self) -> dict[str, dict[str, float]]:
        """Per step kind over the case: the step count and the mean ms of each phase."""

        def delta(key: str) -> float:
            return self.after.get(key, 0.0) - self.before.get(key, 0.0)

        out = {}
        for kind in KINDS:
            count = delta(f'gptqgw_engine_kind_steps{{kind="{kind}"}}')
            if count <= 0:
                continue
            row = {"count": int(count)}
            for phase in PHASES:
                key = f'gptqgw_engine_step_phase_seconds{{kind="{kind}",phase="{phase}"}}'
                row[f"{phase}_ms"] = round(1000 * delta(key) / count, 3)
            out[kind] = row
        return out


NAMES_USED = "gptqgw_kv_cache_blocks_used"


class Server:
    """One `gptq-gateway serve` process (and, on demand, a shim in front of it)."""

    def __init__(self, checkpoint: Path, args: argparse.Namespace, logs: Path, *extra: str) -> None:
        self.grpc_port, self.metrics_port = free_port(), free_port()
        self.command = [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            str(checkpoint),
            "--device",
            args.device,
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-port",
            str(self.metrics_port),
            "--max-num-seqs",
            str(args.max_num_seqs),
            "--max-model-len",
            str(args.max_model_len),
            "--model-name",
            "bench",  # the name shim_request asks for
            "--log-level",
            "warning",
            "--kv-cache-dtype",
            args.kv_cache_dtype,
            *(["--kv-cache-memory", args.kv_cache_memory] if args.kv_cache_memory else []),
            *(
                ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
                if args.max_num_batched_tokens
                else []
            ),
            *extra,
        ]
        logs.mkdir(parents=True, exist_ok=True)
        self.log = logs / f"serve-{checkpoint.name}{'-'.join(('', *extra))}.log"
        self.process = subprocess.Popen(
            self.command, stdout=self.log.open("wb"), stderr=subprocess.STDOUT
        )
        self.shim: subprocess.Popen[bytes] | None = None
        self.target = f"127.0.0.1:{self.grpc_port}"
        started = time.perf_counter()
        try:
            wait_serving(self.target, self.process, args.start_timeout_s)
        except BaseException:
            self.close()
            raise
        self.startup_s = time.perf_counter() - started

    def start_shim(self, timeout: float) -> int:
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "gateway.cli",
            "openai",
            "--upstream",
            self.target,
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        log = self.log.with_suffix(".shim.log")
        self.shim = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        wait_http_ready(f"http://127.0.0.1:{port}/ready", self.shim, timeout)
        return port

    def close(self) -> None:
        if self.shim is not None:
            stop(self.shim)
        stop(self.process)


# ----------------------------------------------------------------------------- cases


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Away from the low ids, where tokenizers keep their special tokens.
    return [[rng.randrange(1000, vocab - 1) for _ in range(length)] for _ in range(count)]


def run_case(
    server: Server,
    label: str,
    load: Callable[[Issue], Awaitable[list[RequestTiming]]],
    shim_port: int | None,
    max_tokens: int,
    guided: Any = None,
    window: SteadyWindow | None = None,
) -> dict[str, Any]:
    async def go() -> tuple[list[RequestTiming], float, float]:
        async with AsyncGatewayClient(server.target, timeout=3600) as client:
            if shim_port is None:
                issue: Issue = lambda ids: grpc_request(client, ids, max_tokens, guided)  # noqa: E731
            else:
                issue = lambda ids: shim_request(shim_port, ids, max_tokens)  # noqa: E731
            cpu_before, started = own_cpu_s(), time.perf_counter()
            timings = await load(issue)
            return timings, time.perf_counter() - started, own_cpu_s() - cpu_before

    with MetricsPoller(server.metrics_port) as poller:
        timings, wall, cpu = run_loop(go)
    row = {"case": label, **summarize(timings, wall, cpu, window), **poller.report()}
    print(
        f"  {label}: {row['output_tokens_per_s']:,.0f} tok/s, TTFT p50 {row['ttft_ms_p50']} ms, "
        f"ITL p50 {row['itl_ms_p50']} ms, errors {row['errors']}",
        flush=True,
    )
    if "steady_output_tokens_per_s" in row:
        print(
            f"    steady: {row['steady_output_tokens_per_s']:,.0f} tok/s over "
            f"{row['steady_window_s']} s, TTFT p50/p99 {row['steady_ttft_ms_p50']}/"
            f"{row['steady_ttft_ms_p99']} ms, ITL p50/p99 {row['steady_itl_ms_p50']}/"
            f"{row['steady_itl_ms_p99']} ms",
            flush=True,
        )
    for kind, phases in row["steps"].items():
        print(f"    {kind} steps: " + ", ".join(f"{k} {v}" for k, v in phases.items()), flush=True)
    return row


def vocab_size(checkpoint: Path) -> int:
    config = json.loads((checkpoint / "config.json").read_text())
    return int(config.get("vocab_size") or config["text_config"]["vocab_size"])


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.ends = time.monotonic() + seconds if seconds > 0 else float("inf")

    def passed(self) -> bool:
        return time.monotonic() > self.ends


def guided_decoding(args: argparse.Namespace) -> Any:
    """--guided-json as the gRPC `sampling.guided` message (None: unconstrained)."""
    if args.guided_json is None:
        return None
    from gateway.proto import pb2

    return pb2.GuidedDecoding(json_schema=args.guided_json.read_text())


def bench_checkpoint(
    name: str, checkpoint: Path, args: argparse.Namespace, deadline: Deadline, logs: Path
) -> dict[str, Any]:
    vocab = vocab_size(checkpoint)
    server = Server(checkpoint, args, logs)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "server_command": shlex.join(server.command),
        "startup_s": round(server.startup_s, 1),
        "cases": [],
    }
    print(f"{name}: serving after {server.startup_s:.1f} s", flush=True)
    try:
        # Warm-up: compiles kernels and fills the allocator before anything is timed.
        warm = random_prompts(min(8, args.max_num_seqs), args.prompt_len, vocab, seed=99)
        run_case(server, "warm-up", lambda issue: closed_loop(issue, warm, len(warm)), None, 8)
        stagger_s = 0.0
        if args.stagger:  # one request's duration alone: the span the first requests spread over
            solo = run_case(
                server, "solo", lambda issue: closed_loop(issue, warm[:1], 1), None, args.max_tokens
            )
            stagger_s = solo["wall_s"]
            result["stagger_s"] = stagger_s
        for index, concurrency in enumerate(args.concurrency):
            if deadline.passed():
                result["skipped_after_deadline"] = True
                break
            count = max(concurrency, args.requests_per_stream * concurrency)
            prompts = random_prompts(count, args.prompt_len, vocab, seed=index)
            window = SteadyWindow()
            row = run_case(
                server,
                f"grpc c={concurrency}",
                lambda issue, p=prompts, c=concurrency, w=window: closed_loop(
                    issue, p, c, stagger_s, w
                ),
                None,
                args.max_tokens,
                guided_decoding(args),
                window,
            )
            result["cases"].append({"concurrency": concurrency, "api": "grpc", **row})
        if args.poisson_rate > 0 and not deadline.passed():
            prompts = random_prompts(args.poisson_requests, args.prompt_len, vocab, seed=7)
            row = run_case(
                server,
                f"grpc poisson {args.poisson_rate:g}/s",
                lambda issue: poisson_loop(issue, prompts, args.poisson_rate, 7),
                None,
                args.max_tokens,
            )
            result["cases"].append({"poisson_rate": args.poisson_rate, "api": "grpc", **row})
        if args.shim_concurrency and not deadline.passed():
            concurrency = args.shim_concurrency
            port = server.start_shim(120)
            prompts = random_prompts(
                concurrency * args.requests_per_stream, args.prompt_len, vocab, seed=11
            )
            for api, shim in (("grpc", None), ("rest", port)):
                window = SteadyWindow()
                row = run_case(
                    server,
                    f"{api} c={concurrency} (shim pair)",
                    lambda issue, w=window: closed_loop(issue, prompts, concurrency, stagger_s, w),
                    shim,
                    args.max_tokens,
                    window=window,
                )
                result["cases"].append(
                    {"concurrency": concurrency, "api": api, "shim_pair": True, **row}
                )
    finally:
        server.close()
    return result


def runner_batch1(checkpoint: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The c=1 case's baseline without the server: one request of the same prompt length and
    output tokens through the runner in this process (prefill, then CUDA-graph decode steps with
    the greedy argmax fed back on the device), timed like a served request: all its tokens over
    its wall time. Run after the server has exited and given the GPU back."""
    import torch

    from gateway.model.slots import SlotRunner

    runner = SlotRunner.load(
        checkpoint, device=args.device, num_slots=1, max_model_len=args.prompt_len + args.max_tokens
    )
    prompt = random_prompts(1, args.prompt_len, vocab_size(checkpoint), seed=11)[0]

    def generate(runner: SlotRunner = runner) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        token = runner.prefill(0, prompt).argmax().view(1)
        for step in range(args.max_tokens - 1):
            token = runner.decode([0], token, [args.prompt_len + step]).argmax(dim=-1)
        torch.cuda.synchronize()
        return args.max_tokens / (time.perf_counter() - start)

    generate()  # warm-up
    return {"tokens_per_s": round(max(generate() for _ in range(2)), 1)}


def bench_prefix(checkpoint: Path, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    """Requests sharing one long prefix, caching on against off. One request primes the cache
    first in both servers, so the cached server's figures are those of a warm prefix."""
    vocab = vocab_size(checkpoint)
    rng = random.Random(5)
    prefix = [rng.randrange(1000, vocab - 1) for _ in range(args.prefix_len)]
    tails = random_prompts(args.prefix_requests + 1, args.prefix_tail, vocab, seed=6)
    prompts = [prefix + tail for tail in tails]
    result: dict[str, Any] = {
        "prefix_len": args.prefix_len,
        "tail_len": args.prefix_tail,
        "requests": args.prefix_requests,
        "concurrency": args.prefix_concurrency,
    }
    for label, extra in (("caching", ()), ("no_caching", ("--no-prefix-caching",))):
        server = Server(checkpoint, args, logs, *extra)
        try:
            run_case(
                server,
                f"prefix prime ({label})",
                lambda issue: closed_loop(issue, prompts[:1], 1),
                None,
                4,
            )
            row = run_case(
                server,
                f"prefix {label}",
                lambda issue: closed_loop(issue, prompts[1:], args.prefix_concurrency),
                None,
                args.prefix_max_tokens,
            )
        finally:
            server.close()
        result[label] = {**row, "server_command": shlex.join(server.command)}
    cached, uncached = result["caching"]["ttft_ms_p50"], result["no_caching"]["ttft_ms_p50"]
    if cached and uncached:
        result["ttft_p50_no_caching_over_caching"] = round(uncached / cached, 2)
    return result


# ----------------------------------------------------------------------------- report


def cell(value: Any) -> str:
    if value is None:
        return "-"
    return (
        f"{value:,.1f}"
        if isinstance(value, float)
        else f"{value:,}"
        if isinstance(value, int)
        else str(value)
    )


def print_table(report: dict[str, Any]) -> None:
    columns = (
        "case",
        "requests",
        "errors",
        "output_tokens_per_s",
        "ttft_ms_p50",
        "ttft_ms_p99",
        "itl_ms_p50",
        "itl_ms_p99",
        "steady_output_tokens_per_s",
        "steady_ttft_ms_p99",
        "steady_itl_ms_p99",
        "kv_blocks_peak",
        "preemptions",
        "client_cpu_s",
    )
    print("\n| model | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for name, result in report["checkpoints"].items():
        for row in result["cases"]:
            print(f"| {name} | " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    for name, ratio in report.get("ratios", {}).items():
        print(f"{name}: {ratio}")
    prefix = report.get("prefix")
    if prefix:
        for label in ("caching", "no_caching"):
            row = prefix[label]
            print(
                f"prefix {label}: TTFT p50 {row['ttft_ms_p50']} ms, p99 {row['ttft_ms_p99']} ms,"
                f" {row['output_tokens_per_s']:,.0f} tok/s"
            )
        print(
            "prefix TTFT p50, no caching / caching:",
            prefix.get("ttft_p50_no_caching_over_caching"),
        )


def ratios(report: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    checkpoints = report["checkpoints"]
    if {"4-bit", "fp16"} <= checkpoints.keys():
        fp16 = {
            r["concurrency"]: r
            for r in checkpoints["fp16"]["cases"]
            if r["api"] == "grpc" and not r.get("shim_pair") and "concurrency" in r
        }
        for row in checkpoints["4-bit"]["cases"]:
            base = fp16.get(row.get("concurrency"))
            if base and row["api"] == "grpc" and not row.get("shim_pair"):
                out[f"4-bit / fp16 tok/s, grpc c={row['concurrency']}"] = round(
                    row["output_tokens_per_s"] / base["output_tokens_per_s"], 3
                )
    for name, result in checkpoints.items():
        runner = result.get("runner_batch1")
        alone = [r for r in result["cases"] if r.get("concurrency") == 1 and r["api"] == "grpc"]
        if runner and alone:
            out[f"{name} grpc c=1 / runner batch 1 tok/s"] = round(
                alone[0]["output_tokens_per_s"] / runner["tokens_per_s"], 3
            )
        pair = {r["api"]: r for r in result["cases"] if r.get("shim_pair")}
        if {"grpc", "rest"} <= pair.keys():
            out[f"{name} shim / grpc tok/s, c={pair['rest']['concurrency']}"] = round(
                pair["rest"]["output_tokens_per_s"] / pair["grpc"]["output_tokens_per_s"], 3
            )
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--w4", type=Path, required=True, help="4-bit checkpoint directory")
    parser.add_argument("--fp16", type=Path, help="FP16 checkpoint directory (the baseline)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256]
    )
    parser.add_argument(
        "--requests-per-stream", type=int, default=3, help="closed loop: requests per worker"
    )
    parser.add_argument(
        "--stagger",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="closed loop: start the workers spread over one request's duration alone, so "
        "arrivals do not come in waves (see the module docstring)",
    )
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kv-cache-dtype", default="auto", help="serve's --kv-cache-dtype")
    parser.add_argument("--kv-cache-memory", default="", help="serve's --kv-cache-memory")
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=0,
        help="serve's step token budget (0: its default); smaller steps bound the ITL that a "
        "prompt chunk adds to the running streams",
    )
    parser.add_argument(
        "--guided-json",
        type=Path,
        help="a JSON Schema file: every gRPC request is constrained to it (sampling.guided)",
    )
    parser.add_argument("--poisson-rate", type=float, default=0.0, help="requests/s; 0 skips it")
    parser.add_argument("--poisson-requests", type=int, default=128)
    parser.add_argument("--shim-concurrency", type=int, default=64, help="0 skips the shim pair")
    parser.add_argument("--prefix-len", type=int, default=2048)
    parser.add_argument("--prefix-tail", type=int, default=32)
    parser.add_argument("--prefix-requests", type=int, default=64)
    parser.add_argument("--prefix-concurrency", type=int, default=16)
    parser.add_argument("--prefix-max-tokens", type=int, default=16)
    parser.add_argument("--no-prefix-case", action="store_true")
    parser.add_argument("--start-timeout-s", type=float, default=900)
    parser.add_argument(
        "--deadline-s", type=float, default=0, help="skip cases left after this; 0: none"
    )
    parser.add_argument("--quick", action="store_true", help="small CPU settings for a smoke run")
    parser.add_argument("--logs", type=Path, default=ROOT / "bench-out" / "serve-logs")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "serve.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.prompt_len, args.max_tokens = [1, 4], 32, 8
        args.max_num_seqs, args.max_model_len, args.shim_concurrency = 8, 512, 4
        args.prefix_len, args.prefix_tail, args.prefix_requests = 256, 8, 8
        args.prefix_concurrency, args.prefix_max_tokens = 4, 4
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = Deadline(args.deadline_s)
    report: dict[str, Any] = {
        "machine": machine(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "checkpoints": {},
    }

    def save() -> None:
        report["ratios"] = ratios(report)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))

    checkpoints = [("4-bit", args.w4)] + ([("fp16", args.fp16)] if args.fp16 else [])
    for name, checkpoint in checkpoints:
        if deadline.passed():
            break
        report["checkpoints"][name] = bench_checkpoint(name, checkpoint, args, deadline, args.logs)
        if 1 in args.concurrency and args.device == "cuda":
            report["checkpoints"][name]["runner_batch1"] = runner_batch1(checkpoint, args)
        save()
    if not args.no_prefix_case and not deadline.passed():
        report["prefix"] = bench_prefix(args.w4, args, args.logs)
    save()
    print_table(report)
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
