"""`gptq-gateway openai --upstream HOST:PORT`: the OpenAI-compatible REST shim (flags agreed with
helm/)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from quantize.errors import UserInputError

LOG_LEVELS = ("debug", "info", "warning", "error")
UPSTREAM_KEY_ENV = "GPTQGW_UPSTREAM_API_KEY"
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # as gateway.openai_api.app's (not imported: slow)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "openai",
        help="serve OpenAI's REST API (chat/completions, completions, models) over the gRPC server",
        description=(
            "Serve /v1/chat/completions, /v1/completions and /v1/models in OpenAI's shapes "
            "(SSE streaming included), /health, /ready (the upstream is SERVING), /metrics and "
            "the OpenAPI schema (/openapi.json, /docs), talking gRPC to `gptq-gateway serve` at "
            "--upstream."
        ),
    )
    parser.add_argument(
        "--upstream", required=True, metavar="HOST:PORT", help="the gRPC server's address"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on [127.0.0.1]")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port [8000]")
    parser.add_argument(
        "--api-keys-file",
        default=None,
        help="file with the keys clients must send (one per line, `Authorization: Bearer "
        "<key>`); GPTQGW_API_KEYS (comma-separated) is read too; with no key, none is needed",
    )
    parser.add_argument(
        "--upstream-api-key-file",
        default=None,
        help=f"file holding the key this shim sends to the gRPC server [env {UPSTREAM_KEY_ENV}]",
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=None,
        help="most tokens a chat completion without max_tokens gets [none: OpenAI's default, "
        "the rest of the context]",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest request body accepted; past it, 413 [4 MiB: the gRPC server's default "
        "--max-message-bytes, past which it would refuse the request anyway]",
    )
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    parser.set_defaults(handler=run)


def upstream_key(path: str | None) -> str | None:
    """The key for the gRPC server: the file's first non-comment line, else the env variable."""
    if path is None:
        return os.environ.get(UPSTREAM_KEY_ENV, "").strip() or None
    from gateway.server.auth import read_key_file

    return read_key_file(path, "--upstream-api-key-file")[0]


def check_address(flag: str, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise UserInputError(f"{flag} {value!r}: expected HOST:PORT (e.g. 127.0.0.1:50051)")
    return value


def run(args: argparse.Namespace) -> int:
    check_address("--upstream", args.upstream)
    if not 0 <= args.port <= 65535:
        raise UserInputError(f"--port {args.port}: must be in 0..65535")
    if args.max_request_bytes < 1:
        raise UserInputError(f"--max-request-bytes {args.max_request_bytes}: must be at least 1")
    if args.default_max_tokens is not None and args.default_max_tokens < 1:
        raise UserInputError(f"--default-max-tokens {args.default_max_tokens}: must be at least 1")

    from gateway.openai_api import ShimConfig
    from gateway.openai_api.server import serve
    from gateway.server.auth import load_api_keys
    from gateway.server.logs import configure_logging

    configure_logging(args.log_format, args.log_level)
    config = ShimConfig(
        upstream=args.upstream,
        api_keys=load_api_keys(args.api_keys_file),
        upstream_api_key=upstream_key(args.upstream_api_key_file),
        max_request_bytes=args.max_request_bytes,
        default_max_tokens=args.default_max_tokens,
    )
    return serve(config, args.host, args.port, args.log_level)
