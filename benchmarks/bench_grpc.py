"""Benchmark of the gRPC gateway (issue 5). Prints a table, writes JSON.

Part 1, gateway only: a STAND-IN ENGINE THAT EMITS TOKENS INSTANTLY (benchmarks/standin_engine.py,
no model) behind a real `GatewayServer` process; 64 concurrent streams read by the project's
AsyncGatewayClient in this process. One token per message is the headline (what the real engine
sends: one event per decode step); a run at 4 tokens per message is shown beside it only to
measure what the per-message cost is, never as the figure. The baseline is the same stand-in
consumed in-process with no gRPC.

Part 2, real engine (needs --checkpoint): the same greedy requests through `gptq-gateway serve`
(a subprocess) and through an in-process Engine, rounds interleaved, in one run.

    python benchmarks/bench_grpc.py --checkpoint CKPT [--device cpu] [--json bench-out/grpc.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.client import AsyncGatewayClient, GatewayClient  # noqa: E402

STANDIN_BANNER = (
    "PART 1 USES A STAND-IN ENGINE THAT EMITS TOKENS INSTANTLY (no model): it measures the "
    "gRPC gateway alone."
)
FAST_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
)


@dataclass
class StreamRun:
    """One measurement: many streams read to the end."""

    label: str
    streams: int
    tokens: int
    messages: int
    wall_s: float
    server_cpu_s: float | None = None
    client_cpu_s: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def tokens_per_message(self) -> float:
        return self.tokens / self.messages if self.messages else 0.0

    def summary(self) -> dict[str, Any]:
        def per_message(cpu_s: float | None) -> float | None:
            return None if cpu_s is None else 1e6 * cpu_s / self.messages

        return {
            **asdict(self),
            "tokens_per_s": self.tokens_per_s,
            "messages_per_s": self.messages / self.wall_s,
            "tokens_per_message": self.tokens_per_message,
            "server_cpu_us_per_message": per_message(self.server_cpu_s),
            "client_cpu_us_per_message": per_message(self.client_cpu_s),
        }


# ----------------------------------------------------------------------------- measuring


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_serving(target: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    with GatewayClient(target, timeout=2.0, options=FAST_RECONNECT) as probe:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}")
            try:
                if probe.health() == "SERVING":
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.1)
    raise RuntimeError(f"server not SERVING after {timeout:g} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


async def read_streams(
    target: str, requests: Sequence[dict[str, Any]], server_pid: int | None
) -> tuple[int, int, float, float | None, float]:
    """Run every request concurrently to the end; (tokens, messages, wall, server cpu, own cpu)."""
    async with AsyncGatewayClient(target, timeout=3600) as client:
        await client.wait_until_serving(60)
        counts = [0, 0]

        async def one(kwargs: dict[str, Any]) -> None:
            async for chunk in client.generate(**kwargs):
                counts[0] += len(chunk.token_ids)
                counts[1] += 1

        server_before = process_cpu_s(server_pid) if server_pid else None
        own_before, started = own_cpu_s(), time.perf_counter()
        await asyncio.gather(*(one(kwargs) for kwargs in requests))
        wall = time.perf_counter() - started
        own = own_cpu_s() - own_before
        server = process_cpu_s(server_pid) - server_before if server_pid else None
    return counts[0], counts[1], wall, server, own


def run_loop(coroutine_factory: Callable[[], Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine_factory())
    return uvloop.run(coroutine_factory())


# ----------------------------------------------------------------------------- part 1


def bench_gateway(streams: int, tokens: int, rounds: int, tokens_per_event: int) -> dict[str, Any]:
    port = free_port()
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "standin_engine.py"),
        "--grpc-port",
        str(port),
        "--tokens-per-event",
        str(tokens_per_event),
    ]
    process = subprocess.Popen(command)
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, process, 120)
        requests = [
            {"prompt": f"stream {i}", "max_tokens": tokens, "ignore_eos": True}
            for i in range(streams)
        ]
        runs = []
        for _ in range(rounds):
            total, messages, wall, server_cpu, own = run_loop(
                lambda: read_streams(target, requests, process.pid)
            )
            runs.append(
                StreamRun(
                    f"gRPC, stand-in, {tokens_per_event} token/event",
                    streams,
                    total,
                    messages,
                    wall,
                    server_cpu,
                    own,
                )
            )
    finally:
        stop(process)
    return _median_run(runs)


def bench_standin_in_process(streams: int, tokens: int, rounds: int) -> dict[str, Any]:
    """The stand-in read directly (no gRPC): what the gateway is compared with."""
    from standin_engine import InstantEngine, standin_engine_types

    types = standin_engine_types()

    async def once() -> StreamRun:
        engine = InstantEngine()
        counts = [0, 0]

        async def one(index: int) -> None:
            params = types.SamplingParams(max_tokens=tokens, ignore_eos=True)
            request = types.GenerationRequest(f"r{index}", [1, 2, 3], params)
            async for event in engine.generate(request):
                counts[0] += len(event.token_ids)
                counts[1] += 1

        own_before, started = own_cpu_s(), time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(streams)))
        wall = time.perf_counter() - started
        return StreamRun(
            "in-process stand-in (no gRPC)",
            streams,
            counts[0],
            counts[1],
            wall,
            None,
            own_cpu_s() - own_before,
        )

    return _median_run([run_loop(once) for _ in range(rounds)])


# ----------------------------------------------------------------------------- part 2


def bench_real_engine(
    checkpoint: Path,
    device: str,
    concurrency: int,
    max_tokens: int,
    rounds: int,
    max_model_len: int,
) -> dict[str, Any]:
    from gateway.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

    prompts = [f"Write a short story about robot number {i}." for i in range(concurrency)]
    sampling = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    port = free_port()
    server_command = [
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        str(checkpoint),
        "--device",
        device,
        "--grpc-port",
        str(port),
        "--metrics-port",
        "0",
        "--max-batch-size",
        str(concurrency),
        "--max-model-len",
        str(max_model_len),
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(server_command)
    target = f"127.0.0.1:{port}"
    engine = Engine.from_checkpoint(
        checkpoint,
        EngineConfig(device=device, max_batch_size=concurrency, max_model_len=max_model_len),
    )
    engine.start()
    try:
        wait_serving(target, server, 1800)
        prompt_ids = [engine.encode(p) for p in prompts]

        async def in_process() -> StreamRun:
            counts = [0, 0]

            async def one(index: int) -> None:
                request = GenerationRequest(
                    f"bench-{index}-{time.monotonic_ns()}",
                    prompt_ids[index],
                    SamplingParams(**sampling),
                )
                async for event in engine.generate(request):
                    counts[0] += len(event.token_ids)
                    counts[1] += 1

            started = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(concurrency)))
            return StreamRun(
                "in-process engine",
                concurrency,
                counts[0],
                counts[1],
                time.perf_counter() - started,
            )

        requests = [{"token_ids": ids, **sampling} for ids in prompt_ids]
        local_runs, grpc_runs = [], []
        for _ in range(rounds):  # interleaved, so drift in machine load hits both alike
            local_runs.append(run_loop(in_process))
            total, messages, wall, server_cpu, own = run_loop(
                lambda: read_streams(target, requests, server.pid)
            )
            grpc_runs.append(
                StreamRun(
                    "gRPC (gptq-gateway serve)",
                    concurrency,
                    total,
                    messages,
                    wall,
                    server_cpu,
                    own,
                )
            )
    finally:
        engine.shutdown()
        stop(server)
    local, remote = _median_run(local_runs), _median_run(grpc_runs)
    return {
        "in_process": local,
        "grpc": remote,
        "grpc_over_in_process": remote["tokens_per_s"] / local["tokens_per_s"],
        "requests": {"concurrency": concurrency, **sampling, "max_model_len": max_model_len},
        "server_command": shlex.join(server_command),
    }


# ----------------------------------------------------------------------------- report


def _median_run(runs: list[StreamRun]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r.tokens_per_s)
    middle = ordered[len(ordered) // 2].summary()
    middle["rounds_tokens_per_s"] = [round(r.tokens_per_s, 1) for r in runs]
    return middle


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import grpc

    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
    }


def _row(name: str, run: dict[str, Any], baseline: float | None) -> str:
    def cpu(key: str) -> str:
        value = run.get(key)
        return "-" if value is None else f"{value:.1f}"

    ratio = "-" if not baseline else f"{run['tokens_per_s'] / baseline:.3f}"
    return (
        f"| {name} | {run['streams']} | {run['tokens_per_message']:.2f} | "
        f"{run['tokens_per_s']:,.0f} | {run['messages_per_s']:,.0f} | "
        f"{cpu('server_cpu_us_per_message')} | {cpu('client_cpu_us_per_message')} | {ratio} |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=1000, help="tokens per stream (part 1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path, default=None, help="enables part 2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", type=int, default=8, help="requests at once (part 2)")
    parser.add_argument("--max-tokens", type=int, default=32, help="per request (part 2)")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--skip-gateway", action="store_true", help="skip part 1")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "grpc.json")
    args = parser.parse_args(argv)

    report: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(),
        "standin_engine": STANDIN_BANNER,
    }
    lines = []
    header = (
        "| scenario | streams | tokens/message | tokens/s | messages/s | server CPU µs/msg | "
        "client CPU µs/msg | vs baseline |\n|---|---|---|---|---|---|---|---|"
    )
    if not args.skip_gateway:
        print(STANDIN_BANNER, flush=True)
        baseline = bench_standin_in_process(args.streams, args.tokens, args.rounds)
        one = bench_gateway(args.streams, args.tokens, args.rounds, tokens_per_event=1)
        four = bench_gateway(args.streams, args.tokens, args.rounds, tokens_per_event=4)
        report["gateway"] = {
            "in_process_standin": baseline,
            "grpc_1_token_per_message": one,
            "grpc_4_tokens_per_message_for_comparison_only": four,
            "target_tokens_per_s": 20000,
        }
        base = baseline["tokens_per_s"]
        lines += [
            "Part 1: gateway only -- STAND-IN ENGINE, tokens emitted instantly",
            header,
            _row("in-process stand-in, no gRPC (baseline)", baseline, base),
            _row("gRPC, 1 token/message (the figure)", one, base),
            _row("gRPC, 4 tokens/message (comparison only)", four, base),
        ]
    if args.checkpoint is not None:
        real = bench_real_engine(
            args.checkpoint,
            args.device,
            args.concurrency,
            args.max_tokens,
            args.rounds,
            args.max_model_len,
        )
        report["real_engine"] = real
        base = real["in_process"]["tokens_per_s"]
        lines += [
            "",
            f"Part 2: real engine ({args.checkpoint.name}, {args.device}), "
            f"{args.concurrency} concurrent greedy requests x {args.max_tokens} tokens",
            header,
            _row("in-process engine (baseline)", real["in_process"], base),
            _row("gRPC, gptq-gateway serve", real["grpc"], base),
        ]
    report["machine"]["load_average_at_end"] = os.getloadavg()
    print("\n".join(lines))
    print(f"\nmachine: {report['machine']}\ncommand: {report['command']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
