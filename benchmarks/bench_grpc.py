"""Benchmark of the gRPC gateway (issue 5). Prints a table, writes JSON.

Part 1, gateway only: a STAND-IN ENGINE (benchmarks/standin_engine.py, no model) behind a real
`GatewayServer` process; 64 concurrent streams read by the project's AsyncGatewayClient in this
process. The stand-in is push-based like the real engine: a producer thread emits one token per
open stream per step through the engine's delivery path, either as fast as it can ("instant") or
at a fixed step rate (a fixed offered load). Rows: (a) the stand-in read in-process, no gRPC (the
baseline); (b) gRPC with coalescing off, one token per message (what a reader that keeps up
gets); (c) coalescing on, instant producer (every stream always has tokens queued, so messages
are as full as --max-tokens-per-chunk allows); (d) coalescing on and (e) off at the fixed offered
load, delivered tokens/s against offered; (f) the stand-in read in-process at that load, what
(d) and (e) can reach at best (streams open one after another, so even it delivers a little
less than offered).

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
    "PART 1 USES A STAND-IN ENGINE (no model): its producer thread emits tokens instantly or at a "
    "fixed rate; it measures the gRPC gateway alone."
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
    # Median over streams of one stream's tokens/s after its first chunk: unlike tokens/wall, not
    # diluted by the streams opening one after another.
    stream_tokens_per_s_median: float | None = None

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


class StreamCounter:
    """Tokens and messages of many streams, and each stream's own rate after its first chunk."""

    def __init__(self) -> None:
        self.streams = 0
        self.tokens = 0
        self.messages = 0
        self.stream_rates: list[float] = []

    async def read(self, stream: Any) -> None:
        first_at = last_at = 0.0
        first_tokens = tokens = 0
        async for item in stream:
            count = len(item.token_ids)
            tokens += count
            self.messages += 1
            last_at = time.perf_counter()
            if not first_at:
                first_at, first_tokens = last_at, count
        self.streams += 1
        self.tokens += tokens
        if last_at > first_at:
            self.stream_rates.append((tokens - first_tokens) / (last_at - first_at))

    def run(
        self,
        label: str,
        wall: float,
        server_cpu: float | None = None,
        client_cpu: float | None = None,
    ) -> StreamRun:
        rates = sorted(self.stream_rates)
        median = rates[len(rates) // 2] if rates else None
        return StreamRun(
            label,
            self.streams,
            self.tokens,
            self.messages,
            wall,
            server_cpu,
            client_cpu,
            median,
        )


async def read_streams(
    label: str, target: str, requests: Sequence[dict[str, Any]], server_pid: int | None
) -> StreamRun:
    """Run every request concurrently to the end, read by the project's async client."""
    async with AsyncGatewayClient(target, timeout=3600) as client:
        await client.wait_until_serving(60)
        counter = StreamCounter()
        server_before = process_cpu_s(server_pid) if server_pid else None
        own_before, started = own_cpu_s(), time.perf_counter()
        await asyncio.gather(*(counter.read(client.generate(**kwargs)) for kwargs in requests))
        wall = time.perf_counter() - started
        own = own_cpu_s() - own_before
        server = process_cpu_s(server_pid) - server_before if server_pid else None
    return counter.run(label, wall, server, own)


def run_loop(coroutine_factory: Callable[[], Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine_factory())
    return uvloop.run(coroutine_factory())


# ----------------------------------------------------------------------------- part 1


def bench_gateway(
    label: str,
    streams: int,
    tokens: int,
    rounds: int,
    max_tokens_per_chunk: int,
    step_rate: float = 0.0,
) -> dict[str, Any]:
    """The stand-in behind a real server process, read over gRPC by this process."""
    port = free_port()
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "standin_engine.py"),
        "--grpc-port",
        str(port),
        "--max-tokens-per-chunk",
        str(max_tokens_per_chunk),
        "--step-rate",
        str(step_rate),
    ]
    process = subprocess.Popen(command)
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, process, 120)
        requests = [
            {"prompt": f"stream {i}", "max_tokens": tokens, "ignore_eos": True}
            for i in range(streams)
        ]
        runs = [
            run_loop(lambda: read_streams(label, target, requests, process.pid))
            for _ in range(rounds)
        ]
    finally:
        stop(process)
    result = _median_run(runs)
    result["max_tokens_per_chunk"] = max_tokens_per_chunk
    result["step_rate"] = step_rate
    if step_rate:
        result["offered_tokens_per_s"] = step_rate * streams
    result["server_command"] = shlex.join(command)
    return result


def bench_standin_in_process(
    streams: int, tokens: int, rounds: int, step_rate: float = 0.0
) -> dict[str, Any]:
    """The stand-in read directly, one event at a time (no gRPC): what the gateway is compared
    with. Same producer thread and delivery path as behind the server."""
    from standin_engine import InstantEngine, standin_engine_types

    types = standin_engine_types()

    async def once() -> StreamRun:
        engine = InstantEngine(step_rate=step_rate)
        counter = StreamCounter()
        params = types.SamplingParams(max_tokens=tokens, ignore_eos=True)
        try:
            own_before, started = own_cpu_s(), time.perf_counter()
            await asyncio.gather(
                *(
                    counter.read(engine.generate(types.GenerationRequest(f"r{i}", [1], params)))
                    for i in range(streams)
                )
            )
            wall = time.perf_counter() - started
            own = own_cpu_s() - own_before
        finally:
            engine.shutdown()
        label = "in-process stand-in (no gRPC)" + (", fixed offered load" if step_rate else "")
        return counter.run(label, wall, None, own)

    result = _median_run([run_loop(once) for _ in range(rounds)])
    result["step_rate"] = step_rate
    if step_rate:
        result["offered_tokens_per_s"] = step_rate * streams
    return result


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
        "--max-num-seqs",
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
        EngineConfig(device=device, max_num_seqs=concurrency, max_model_len=max_model_len),
    )
    engine.start()
    try:
        wait_serving(target, server, 1800)
        prompt_ids = [engine.encode(p) for p in prompts]

        async def in_process() -> StreamRun:
            counter = StreamCounter()
            started = time.perf_counter()
            await asyncio.gather(
                *(
                    counter.read(
                        engine.generate(
                            GenerationRequest(
                                f"bench-{index}-{time.monotonic_ns()}",
                                ids,
                                SamplingParams(**sampling),
                            )
                        )
                    )
                    for index, ids in enumerate(prompt_ids)
                )
            )
            return counter.run("in-process engine", time.perf_counter() - started)

        requests = [{"token_ids": ids, **sampling} for ids in prompt_ids]
        local_runs, grpc_runs = [], []
        for _ in range(rounds):  # interleaved, so drift in machine load hits both alike
            local_runs.append(run_loop(in_process))
            grpc_runs.append(
                run_loop(
                    lambda: read_streams("gRPC (gptq-gateway serve)", target, requests, server.pid)
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
    parser.add_argument(
        "--max-tokens-per-chunk", type=int, default=64, help="the server's bound, coalescing on"
    )
    parser.add_argument(
        "--offered-step-rate",
        type=float,
        default=400.0,
        help="stand-in steps/s for the fixed-load rows (one token per stream per step) [400]",
    )
    parser.add_argument("--skip-gateway", action="store_true", help="skip part 1")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "grpc.json")
    args = parser.parse_args(argv)
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        parser.error(f"--checkpoint {args.checkpoint}: not a directory")

    report: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(),
        "standin_engine": STANDIN_BANNER,
    }
    lines: list[str] = []
    shown = 0
    header = (
        "| scenario | streams | tokens/message | tokens/s | messages/s | server CPU µs/msg | "
        "client CPU µs/msg | vs baseline |\n|---|---|---|---|---|---|---|---|"
    )
    if not args.skip_gateway:
        print(STANDIN_BANNER, flush=True)
        n, t, r, cap = args.streams, args.tokens, args.rounds, args.max_tokens_per_chunk
        offered_rate = args.offered_step_rate
        baseline = bench_standin_in_process(n, t, r)
        scenarios = {
            "in_process_standin_offered_load": bench_standin_in_process(n, t, r, offered_rate),
            "grpc_coalescing_off_instant": bench_gateway(
                "gRPC, coalescing off, instant producer", n, t, r, 1
            ),
            "grpc_coalescing_on_instant": bench_gateway(
                "gRPC, coalescing on, instant producer", n, t, r, cap
            ),
            "grpc_coalescing_on_offered_load": bench_gateway(
                "gRPC, coalescing on, fixed offered load", n, t, r, cap, offered_rate
            ),
            "grpc_coalescing_off_offered_load": bench_gateway(
                "gRPC, coalescing off, fixed offered load", n, t, r, 1, offered_rate
            ),
        }
        report["gateway"] = {
            "in_process_standin": baseline,
            **scenarios,
            "target_tokens_per_s": 20000,
            "offered_tokens_per_s": offered_rate * n,
        }
        base = baseline["tokens_per_s"]
        offered = f"{offered_rate:g} steps/s x {n} = {offered_rate * n:,.0f} tokens/s offered"
        lines += [
            "Part 1: gateway only -- STAND-IN ENGINE (no model; a producer thread emits one token "
            "per open stream per step through the engine's delivery path)",
            f"{n} streams x {t} tokens; coalescing on = --max-tokens-per-chunk {cap}",
            header,
            _row("(a) in-process stand-in, no gRPC (baseline)", baseline, base),
            _row(
                "(b) gRPC, coalescing off (1 token/message), instant",
                scenarios["grpc_coalescing_off_instant"],
                base,
            ),
            _row(
                "(c) gRPC, coalescing on, instant",
                scenarios["grpc_coalescing_on_instant"],
                base,
            ),
            _row(
                f"(d) gRPC, coalescing on, {offered}",
                scenarios["grpc_coalescing_on_offered_load"],
                base,
            ),
            _row(
                f"(e) gRPC, coalescing off, {offered}",
                scenarios["grpc_coalescing_off_offered_load"],
                base,
            ),
            _row(
                f"(f) in-process stand-in, no gRPC, {offered}",
                scenarios["in_process_standin_offered_load"],
                base,
            ),
        ]
        for key in (
            "grpc_coalescing_on_offered_load",
            "grpc_coalescing_off_offered_load",
            "in_process_standin_offered_load",
        ):
            run = scenarios[key]
            offered_tokens = run["offered_tokens_per_s"]
            steady = run["stream_tokens_per_s_median"] * run["streams"]
            lines.append(
                f"{run['label']}: delivered {run['tokens_per_s']:,.0f} of {offered_tokens:,.0f} "
                f"tokens/s offered ({run['tokens_per_s'] / offered_tokens:.3f}); median stream "
                f"after its first chunk x {run['streams']} streams: {steady:,.0f} "
                f"({steady / offered_tokens:.3f})"
            )
        print("\n".join(lines), flush=True)  # part 2 takes minutes: show part 1 now
        shown = len(lines)
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
    print("\n".join(lines[shown:]))
    print(f"\nmachine: {report['machine']}\ncommand: {report['command']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
