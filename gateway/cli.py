"""The `gptq-gateway` console script: one parser, each subcommand registered by its own module.

Subcommand modules import nothing heavy at top level (torch, transformers) so that `--help` is
instant; they import inside their handler.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from quantize.errors import UserInputError

# Each module defines `register(subparsers) -> None`, which adds its parser and sets `handler`.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "gateway.cli_serve",
    "quantize.cli_quantize",
    "gateway.cli_eval",
    "gateway.cli_openai",
    "gateway.cli_up",
)


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("gptq-gateway")
    except PackageNotFoundError:  # running from a source tree on PYTHONPATH
        ver = "source"
    parser = argparse.ArgumentParser(
        prog="gptq-gateway",
        description="Quantize Hugging Face LLMs with GPTQ and serve them on 4-bit kernels.",
    )
    parser.add_argument("--version", action="version", version=f"gptq-gateway {ver}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except UserInputError as exc:
        print(f"gptq-gateway {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptq-gateway {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
