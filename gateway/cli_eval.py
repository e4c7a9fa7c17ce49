"""`gptq-gateway eval MODEL_OR_CHECKPOINT`: perplexity over held-out text.

MODEL_OR_CHECKPOINT is what `quantize` takes (hub id, model directory, GGUF file) or one of our
GPTQ checkpoints. The math is quantize.perplexity; this module only picks the model behind the
logits. `checkpoint_logits_fn` is the one seam that decides how a checkpoint is run: through the
server's 4-bit runner (gateway/model), the same layers and kernels `serve` uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="perplexity of a model or GPTQ checkpoint on held-out text",
        description="Perplexity over non-overlapping windows of a text (default: the built-in "
        "held-out part of CPython's pydoc topics, never used for calibration).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "model", metavar="MODEL_OR_CHECKPOINT", help="checkpoint dir, model dir, .gguf or hub id"
    )
    p.add_argument(
        "--text",
        metavar="PATH",
        default=None,
        help=".txt or .jsonl file (default: the built-in held-out text)",
    )
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    p.add_argument("--windows", type=int, default=None, help="score only the first N windows")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        metavar="{auto,fp16,fp8}",
        help="GPTQ checkpoints: k and v rounded as `serve --kv-cache-dtype` stores them",
    )
    p.add_argument("--json", action="store_true", help='print {"ppl": ..., "tokens": ...}')
    p.set_defaults(handler=run)


def checkpoint_logits_fn(
    path: str, device: str, seqlen: int, kv_cache_dtype: str = "auto"
) -> Callable[[Any], Any]:
    """How a GPTQ checkpoint is evaluated: through the server's own runner and 4-bit kernels."""
    import torch

    from gateway.model.llama import LlamaRunner
    from quantize.errors import UserInputError

    # One KV block: forward_logits never touches the cache, so it stays small.
    try:
        runner = LlamaRunner.load(
            path,
            device=device,
            max_model_len=seqlen,
            num_blocks=1,
            kv_cache_dtype=kv_cache_dtype,
            cuda_graphs=False,
        )
    except UserInputError as exc:
        if "max_model_len" in str(exc):
            raise UserInputError(f"--seqlen {seqlen} is too long for this model: {exc}") from exc
        raise
    return torch.inference_mode()(runner.forward_logits)


def model_logits_fn(model: str, device: str) -> Callable[[Any], Any]:
    from quantize.reference import load_float_model, logits_function

    return logits_function(load_float_model(model, device=device))


def run(args: argparse.Namespace) -> int:
    from quantize.calib import heldout_text, read_text_file, tokenize_text
    from quantize.driver import resolve_device
    from quantize.errors import UserInputError
    from quantize.format import is_checkpoint
    from quantize.perplexity import make_windows, perplexity
    from quantize.reference import load_tokenizer, resolve_architecture_of

    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = str(resolve_device(args.device))
    text = heldout_text() if args.text is None else read_text_file(args.text)
    resolve_architecture_of(args.model)  # an unsupported model fails by name, before any loading
    token_ids = tokenize_text(load_tokenizer(args.model), text)
    make_windows(token_ids, args.seqlen, args.windows)  # refuse bad sizes before loading a model
    if is_checkpoint(args.model):
        logits_fn = checkpoint_logits_fn(args.model, device, args.seqlen, args.kv_cache_dtype)
    elif args.kv_cache_dtype != "auto":
        raise UserInputError("--kv-cache-dtype applies to GPTQ checkpoints only")
    else:
        logits_fn = model_logits_fn(args.model, device)
    result = perplexity(
        logits_fn, token_ids, seqlen=args.seqlen, windows=args.windows, batch_size=args.batch_size
    )
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(
            f"perplexity {result.ppl:.4f} over {result.tokens} tokens "
            f"({result.windows} windows of {result.seqlen})",
            file=sys.stdout,
        )
    return 0
