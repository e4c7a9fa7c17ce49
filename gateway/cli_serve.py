"""`gptq-gateway serve CHECKPOINT`: the gRPC server over the engine (flags agreed with helm/)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from quantize.errors import UserInputError

LOG_LEVELS = ("debug", "info", "warning", "error")
# Kept in step with gateway.server.servicer.DEFAULT_MAX_TOKENS_PER_CHUNK (a unit test checks):
# importing the server here would load grpc for every CLI command.
DEFAULT_MAX_TOKENS_PER_CHUNK = 64


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a 4-bit checkpoint over gRPC (gptqgw.v1.Gateway, health, reflection)",
        description=(
            "Serve CHECKPOINT over async gRPC. The port opens at once with health NOT_SERVING; "
            "it turns SERVING when the model is loaded and warmed up. SIGTERM drains: health "
            "NOT_SERVING, new calls UNAVAILABLE, open streams finish within --drain-timeout, "
            "exit 0."
        ),
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on [127.0.0.1]")
    parser.add_argument("--grpc-port", type=int, default=50051, help="gRPC port [50051]")
    parser.add_argument(
        "--metrics-port", type=int, default=9400, help="Prometheus /metrics port, 0 = off [9400]"
    )
    parser.add_argument(
        "--model-name", default=None, help="name clients ask for [the checkpoint's folder name]"
    )
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    add_engine_arguments(parser)
    parser.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="waiting requests before RESOURCE_EXHAUSTED [256]",
    )
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="context length [the model's]"
    )
    parser.add_argument(
        "--api-keys-file",
        default=None,
        help="file with one API key per line (GPTQGW_API_KEYS, comma-separated, is read too); "
        "with no key at all, calls need none",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds open streams get on SIGTERM; then each still open ends with a last chunk "
        "(FINISH_REASON_CANCELLED, error set) and the process exits within a second [30]",
    )
    parser.add_argument(
        "--max-message-bytes", type=int, default=4194304, help="largest gRPC message [4194304]"
    )
    parser.add_argument(
        "--max-tokens-per-chunk",
        type=int,
        default=DEFAULT_MAX_TOKENS_PER_CHUNK,
        help="most tokens one streamed message carries when a stream's tokens piled up behind a "
        "slow reader or a busy server; never waits to fill one (1 = one message per engine "
        f"event) [{DEFAULT_MAX_TOKENS_PER_CHUNK}]",
    )
    parser.add_argument(
        "--allow-special-tokens",
        action="store_true",
        help="tokenize special-token text in clients' prompts and messages (e.g. <|im_end|>) as "
        "the control tokens themselves; by default it is plain text, so clients cannot forge "
        "chat turns",
    )
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    parser.set_defaults(handler=serve)


def add_engine_arguments(parser: Any) -> None:
    """The engine's memory and scheduling flags (shared with `up`, which passes them on)."""
    parser.add_argument(
        "--max-num-seqs", type=int, default=64, help="most sequences in the running batch [64]"
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens computed per step: prompt chunks plus decode rows [2048 on CUDA, 512 on CPU]",
    )
    parser.add_argument(
        "--kv-cache-memory",
        type=_size,
        default=None,
        metavar="SIZE",
        help="bytes for the paged KV cache, with K/M/G (decimal) or Ki/Mi/Gi (binary) suffixes "
        "[85%% of the GPU memory left after the weights; on CPU a quarter of free RAM, at most "
        "2 GiB]",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        metavar="{auto,fp16,fp8}",  # checked where the cache is built (gateway/model/kv_cache.py)
        help="what the KV cache stores: auto (the compute dtype), fp16, or fp8 (e4m3 with a "
        "scale per token and head: about half the bytes, so about twice the tokens) [auto]",
    )
    parser.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="do not reuse the KV blocks of a prompt prefix seen before",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify_checksums",
        action="store_false",
        help="load without checking the tensor checksums that quantize records (checkpoints "
        "from other tools have none and load unchecked anyway)",
    )


def engine_argv(args: argparse.Namespace) -> list[str]:
    """`add_engine_arguments`' flags as `serve` arguments again (for `up`)."""
    argv = ["--max-num-seqs", str(args.max_num_seqs)]
    if args.max_num_batched_tokens is not None:
        argv += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.kv_cache_memory is not None:
        argv += ["--kv-cache-memory", str(args.kv_cache_memory)]
    if args.kv_cache_dtype != "auto":
        argv += ["--kv-cache-dtype", args.kv_cache_dtype]
    if not args.prefix_caching:
        argv.append("--no-prefix-caching")
    if not args.verify_checksums:
        argv.append("--no-verify")
    return argv


def _size(text: str) -> int:
    from gateway.model.kv_cache import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def serve(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise UserInputError(f"CHECKPOINT {checkpoint}: not a directory")
    for flag, value, low in (
        ("--grpc-port", args.grpc_port, 0),
        ("--metrics-port", args.metrics_port, 0),
    ):
        if not low <= value <= 65535:
            raise UserInputError(f"{flag} {value}: must be in 0..65535")
    for flag, value in (
        ("--max-num-seqs", args.max_num_seqs),
        ("--max-num-batched-tokens", args.max_num_batched_tokens or 1),
        ("--max-queue", args.max_queue),
        ("--max-message-bytes", args.max_message_bytes),
        ("--max-tokens-per-chunk", args.max_tokens_per_chunk),
    ):
        if value < 1:
            raise UserInputError(f"{flag} {value}: must be at least 1")
    if args.max_model_len is not None and args.max_model_len < 1:
        raise UserInputError(f"--max-model-len {args.max_model_len}: must be at least 1")
    if args.drain_timeout < 0:
        raise UserInputError(f"--drain-timeout {args.drain_timeout}: must not be negative")

    from gateway.server import ServerConfig, run
    from gateway.server.auth import load_api_keys
    from gateway.server.logs import configure_logging

    configure_logging(args.log_format, args.log_level)
    config = ServerConfig(
        model_name=args.model_name or checkpoint.resolve().name,
        host=args.host,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        api_keys=load_api_keys(args.api_keys_file),
        drain_timeout=args.drain_timeout,
        max_message_bytes=args.max_message_bytes,
        max_tokens_per_chunk=args.max_tokens_per_chunk,
    )
    if not config.api_keys:
        logging.getLogger("gateway.server").warning("no API keys configured: calls need none")

    def load_engine() -> Any:
        from gateway.engine import Engine, EngineConfig

        engine = Engine.from_checkpoint(
            str(checkpoint),
            EngineConfig(
                device=args.device,
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                kv_cache_bytes=args.kv_cache_memory,
                kv_cache_dtype=args.kv_cache_dtype,
                prefix_caching=args.prefix_caching,
                max_queue=args.max_queue,
                max_model_len=args.max_model_len,
                allow_special_tokens=args.allow_special_tokens,
                verify_checksums=args.verify_checksums,
            ),
        )
        engine.start()
        return engine

    try:
        return run(config, load_engine)
    except UserInputError:
        raise
    except Exception:
        logging.getLogger("gateway.server").exception("the server failed")
        return 1
