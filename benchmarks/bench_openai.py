"""Benchmark of the OpenAI-compatible REST shim (issue 6). Prints a table, writes JSON.

Every figure is beside its baseline from the same run: the same requests sent to the same gRPC
server directly, with the project's AsyncGatewayClient.

Part 1, shim overhead: a STAND-IN ENGINE THAT EMITS TOKENS INSTANTLY (benchmarks/standin_engine.py,
no model) behind a real gRPC server process, and a real `gptq-gateway openai` process in front
of it. Time to first token (TTFT) of sequential streamed chat requests, rounds interleaved:
gRPC direct (the baseline), the shim read by a minimal HTTP client, and the shim read by the
official openai SDK. Then N concurrent SSE streams through the shim vs gRPC: the ceiling the
shim puts on token throughput.

Part 2, real model (needs --checkpoint): `gptq-gateway serve` with the checkpoint, the same
sequential TTFT comparison, then N concurrent SSE streams (default 64) of a fixed length through
the shim and through gRPC: tokens/s, inter-token latency p50/p99, errors.

    python benchmarks/bench_openai.py --checkpoint CKPT [--device cpu] \
        [--json bench-out/openai.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.client import AsyncGatewayClient  # noqa: E402

STANDIN_BANNER = (
    "PART 1 USES A STAND-IN ENGINE THAT EMITS TOKENS INSTANTLY (no model): it measures what the "
    "shim adds, not what a model costs."
)
MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
FAST_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
)


# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def wait_http_ready(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout:g} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


@dataclass
class Stack:
    """A gRPC server and the shim in front of it."""

    grpc_target: str
    http_port: int
    model: str
    processes: list[subprocess.Popen[bytes]]

    def close(self) -> None:
        for process in reversed(self.processes):
            stop(process)


def start_stack(server_command: list[str], model: str, logs: Path, timeout: float) -> Stack:
    grpc_port, http_port = free_port(), free_port()
    server = start([*server_command, "--grpc-port", str(grpc_port)], logs / "server.log")
    shim_command = [
        sys.executable, "-m", "gateway.cli", "openai", "--upstream", f"127.0.0.1:{grpc_port}",
        "--port", str(http_port), "--log-level", "warning",
    ]  # fmt: skip
    shim = start(
        shim_command,
        logs / "shim.log",
    )
    stack = Stack(f"127.0.0.1:{grpc_port}", http_port, model, [server, shim])
    try:
        wait_http_ready(f"http://127.0.0.1:{http_port}/ready", shim, timeout)
    except BaseException:
        stack.close()
        raise
    return stack


# ----------------------------------------------------------------------------- clients


@dataclass
class StreamTiming:
    """One streamed request, timed from just before it was sent."""

    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)  # between consecutive events with text
    tokens: int = 0  # generated tokens, as the final usage reports them
    error: str | None = None


class RawSSEClient:
    """A minimal HTTP/1.1 client for SSE over one keep-alive connection: what is timed is the
    shim, not a client library."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def stream(self, body: dict[str, Any]) -> StreamTiming:
        await self._connect()
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        payload = json.dumps(body).encode()
        timing = StreamTiming()
        started = time.perf_counter()
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\n"
            b"content-type: application/json\r\n"
            + f"content-length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        status_line = await reader.readline()
        if b" 200 " not in status_line:
            timing.error = status_line.decode().strip()
            await self.close()
            return timing
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # headers; the body is chunked
        buffer = b""
        last = started
        while True:
            size = int((await reader.readline()).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            buffer += data[:-2]
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if b'"content":' in event and b'"content":""' not in event:
                    now = time.perf_counter()
                    if timing.ttft_s is None:
                        timing.ttft_s = now - started
                    else:
                        timing.gaps_s.append(now - last)
                    last = now
                elif b'"usage":{' in event:
                    timing.tokens = json.loads(event[6:])["usage"]["completion_tokens"]
        return timing

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


async def grpc_stream(client: AsyncGatewayClient, **request: Any) -> StreamTiming:
    timing = StreamTiming()
    started = last = time.perf_counter()
    try:
        async for chunk in client.generate(**request):
            if chunk.text:
                now = time.perf_counter()
                if timing.ttft_s is None:
                    timing.ttft_s = now - started
                else:
                    timing.gaps_s.append(now - last)
                last = now
            if chunk.usage is not None:
                timing.tokens = chunk.usage.completion_tokens
    except Exception as exc:
        timing.error = f"{type(exc).__name__}: {exc}"
    return timing


async def sdk_stream(client: Any, model: str, max_tokens: int) -> StreamTiming:
    timing = StreamTiming()
    started = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0, stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and timing.ttft_s is None:
            timing.ttft_s = time.perf_counter() - started
    return timing


# ----------------------------------------------------------------------------- measurements


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": 1e3 * percentile(values, 0.5),
        "p90_ms": 1e3 * percentile(values, 0.9),
        "p99_ms": 1e3 * percentile(values, 0.99),
        "mean_ms": 1e3 * statistics.fmean(values) if values else float("nan"),
    }


async def sequential_ttft(stack: Stack, rounds: int, max_tokens: int) -> dict[str, Any]:
    """TTFT of one request at a time, the three ways interleaved round by round so that load
    drifts on a shared machine hit all three alike."""
    from openai import AsyncOpenAI

    body = {
        "model": stack.model,
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    raw = RawSSEClient(stack.http_port)
    sdk = AsyncOpenAI(
        base_url=f"http://127.0.0.1:{stack.http_port}/v1", api_key="none", max_retries=0
    )
    results: dict[str, list[float]] = {"grpc": [], "shim_raw_http": [], "shim_openai_sdk": []}
    errors: list[str] = []
    async with AsyncGatewayClient(stack.grpc_target, timeout=600) as client:
        for _ in range(3):  # warm up: connections, caches
            await grpc_stream(client, messages=MESSAGES, max_tokens=max_tokens, temperature=0)
            await raw.stream(body)
            await sdk_stream(sdk, stack.model, max_tokens)
        for _ in range(rounds):
            for name, run in (
                (
                    "grpc",
                    lambda: grpc_stream(
                        client, messages=MESSAGES, max_tokens=max_tokens, temperature=0
                    ),
                ),
                ("shim_raw_http", lambda: raw.stream(body)),
                ("shim_openai_sdk", lambda: sdk_stream(sdk, stack.model, max_tokens)),
            ):
                timing = await run()
                if timing.error or timing.ttft_s is None:
                    errors.append(f"{name}: {timing.error}")
                else:
                    results[name].append(timing.ttft_s)
    await raw.close()
    await sdk.close()
    out: dict[str, Any] = {name: summary_ms(values) for name, values in results.items()}
    base = out["grpc"]["p50_ms"]
    for name in ("shim_raw_http", "shim_openai_sdk"):
        out[name]["added_p50_ms"] = out[name]["p50_ms"] - base
        out[name]["ratio_p50"] = out[name]["p50_ms"] / base
    out["errors"] = errors
    return out


async def concurrent_streams(
    stack: Stack, streams: int, max_tokens: int, via: str
) -> dict[str, Any]:
    """`streams` requests at once, each `max_tokens` tokens long (ignore_eos), read to the end."""
    async with AsyncGatewayClient(stack.grpc_target, timeout=3600) as client:

        async def one(index: int) -> StreamTiming:
            if via == "grpc":
                return await grpc_stream(
                    client,
                    messages=MESSAGES,
                    max_tokens=max_tokens,
                    temperature=0.8,
                    seed=index,
                    ignore_eos=True,
                )
            raw = RawSSEClient(stack.http_port)
            try:
                return await raw.stream(
                    {
                        "model": stack.model,
                        "messages": MESSAGES,
                        "max_tokens": max_tokens,
                        "temperature": 0.8,
                        "seed": index,
                        "ignore_eos": True,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                )
            except Exception as exc:
                return StreamTiming(error=f"{type(exc).__name__}: {exc}")
            finally:
                await raw.close()

        started = time.perf_counter()
        timings = await asyncio.gather(*(one(i) for i in range(streams)))
        wall = time.perf_counter() - started
    tokens = sum(t.tokens for t in timings)
    gaps = [gap for t in timings for gap in t.gaps_s]
    ttfts = [t.ttft_s for t in timings if t.ttft_s is not None]
    errors = [t.error for t in timings if t.error]
    short = sum(1 for t in timings if not t.error and t.tokens < max_tokens)
    return {
        "via": via,
        "streams": streams,
        "max_tokens": max_tokens,
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "itl": summary_ms(gaps),
        "ttft": summary_ms(ttfts),
        "errors": len(errors),
        "error_samples": errors[:3],
        "streams_short_of_max_tokens": short,
    }


async def streams_comparison(stack: Stack, streams: int, max_tokens: int) -> dict[str, Any]:
    grpc = await concurrent_streams(stack, streams, max_tokens, "grpc")
    shim = await concurrent_streams(stack, streams, max_tokens, "shim")
    shim["ratio_tokens_per_s_vs_grpc"] = shim["tokens_per_s"] / grpc["tokens_per_s"]
    return {"grpc": grpc, "shim": shim}


def run(coroutine: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


# ----------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def ttft_rows(title: str, result: dict[str, Any]) -> list[str]:
    base = result["grpc"]
    lines = [
        title,
        "| client | n | TTFT p50 ms | p90 ms | p99 ms | added at p50 ms | p50 vs gRPC |",
        "|---|---|---|---|---|---|---|",
        f"| gRPC direct (baseline) | {base['n']} | {base['p50_ms']:.2f} | {base['p90_ms']:.2f} | "
        f"{base['p99_ms']:.2f} | - | 1.00 |",
    ]
    for name, label in (
        ("shim_raw_http", "shim, raw HTTP/1.1 client"),
        ("shim_openai_sdk", "shim, openai SDK (AsyncOpenAI)"),
    ):
        row = result[name]
        lines.append(
            f"| {label} | {row['n']} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | "
            f"{row['p99_ms']:.2f} | {row['added_p50_ms']:+.2f} | {row['ratio_p50']:.2f} |"
        )
    if result["errors"]:
        lines.append(f"errors: {result['errors'][:3]}")
    return lines


def stream_rows(title: str, result: dict[str, Any]) -> list[str]:
    lines = [
        title,
        "| via | streams | tokens | errors | tokens/s | vs gRPC | ITL p50 ms | ITL p99 ms | "
        "TTFT p50 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in (("grpc", "gRPC direct (baseline)"), ("shim", "shim, SSE")):
        row = result[name]
        ratio = row.get("ratio_tokens_per_s_vs_grpc", 1.0)
        lines.append(
            f"| {label} | {row['streams']} | {row['tokens']} | {row['errors']} | "
            f"{row['tokens_per_s']:,.0f} | {ratio:.2f} | {row['itl']['p50_ms']:.1f} | "
            f"{row['itl']['p99_ms']:.1f} | {row['ttft']['p50_ms']:.0f} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="sequential TTFT rounds (part 1)")
    parser.add_argument("--streams", type=int, default=64, help="concurrent SSE streams")
    parser.add_argument("--standin-tokens", type=int, default=256, help="per stream (part 1)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="enables part 2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-rounds", type=int, default=20, help="TTFT rounds (part 2)")
    parser.add_argument("--max-tokens", type=int, default=32, help="per stream (part 2)")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--skip-standin", action="store_true", help="skip part 1")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "openai.json")
    args = parser.parse_args(argv)

    logs = args.json.parent / "openai-logs"
    logs.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(),
    }
    lines: list[str] = []
    if not args.skip_standin:
        print(STANDIN_BANNER, flush=True)
        report["standin_engine"] = STANDIN_BANNER
        stack = start_stack(
            [sys.executable, str(ROOT / "benchmarks" / "standin_engine.py")],
            "instant-standin",
            logs,
            timeout=300,
        )
        try:
            ttft = run(sequential_ttft(stack, args.rounds, max_tokens=4))
            streams = run(streams_comparison(stack, args.streams, args.standin_tokens))
        finally:
            stack.close()
        report["standin"] = {"sequential_ttft": ttft, "concurrent_streams": streams}
        lines += ttft_rows(
            "Part 1a: TTFT, one request at a time -- STAND-IN ENGINE (instant tokens)", ttft
        )
        lines.append("")
        lines += stream_rows(
            f"Part 1b: {args.streams} concurrent streams x {args.standin_tokens} tokens -- "
            "STAND-IN ENGINE (the shim's throughput ceiling)",
            streams,
        )
    if args.checkpoint is not None:
        server = [
            sys.executable, "-m", "gateway.cli", "serve", str(args.checkpoint),
            "--device", args.device, "--metrics-port", "0", "--model-name", "bench-model",
            "--max-num-seqs", str(max(args.streams, 1)), "--max-queue", "1024",
            "--max-model-len", str(args.max_model_len), "--log-level", "warning",
        ]  # fmt: skip
        stack = start_stack(server, "bench-model", logs, timeout=1800)
        try:
            ttft = run(sequential_ttft(stack, args.model_rounds, max_tokens=1))
            streams = run(streams_comparison(stack, args.streams, args.max_tokens))
        finally:
            stack.close()
        report["model"] = {
            "checkpoint": str(args.checkpoint),
            "device": args.device,
            "sequential_ttft": ttft,
            "concurrent_streams": streams,
        }
        lines.append("")
        lines += ttft_rows(
            f"Part 2a: TTFT, one request at a time -- {args.checkpoint.name} on {args.device}",
            ttft,
        )
        lines.append("")
        lines += stream_rows(
            f"Part 2b: {args.streams} concurrent SSE streams x {args.max_tokens} tokens -- "
            f"{args.checkpoint.name} on {args.device}",
            streams,
        )
    report["machine"]["load_average_at_end"] = os.getloadavg()
    print("\n".join(lines))
    print(f"\nmachine: {report['machine']}\ncommand: {report['command']}")
    args.json.write_text(json.dumps(report, indent=2, default=lambda o: asdict(o)))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
