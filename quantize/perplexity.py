"""Perplexity over non-overlapping windows of a token stream, for any logits function.

The model is reached only through `logits_fn(ids [batch, seq]) -> logits [batch, seq, vocab]`, so
the same math serves a float model, the dequantizing reference and the server's 4-bit runner.
Each window is scored independently: token t is predicted from tokens 0..t-1 of its window, so a
window of L tokens contributes L - 1 predictions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantize.errors import UserInputError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    tokens: int  # predicted tokens: windows x (seqlen - 1)
    windows: int
    seqlen: int
    nll: float  # mean negative log-likelihood per predicted token, in nats

    def as_dict(self) -> dict:
        return {
            "ppl": self.ppl,
            "tokens": self.tokens,
            "windows": self.windows,
            "seqlen": self.seqlen,
            "nll": self.nll,
        }


def make_windows(token_ids: torch.Tensor, seqlen: int, windows: int | None = None) -> torch.Tensor:
    """The first `windows` (default: all) full non-overlapping windows: [n, seqlen]."""
    if seqlen < 2:
        raise UserInputError(f"--seqlen must be at least 2, got {seqlen}")
    available = int(token_ids.numel()) // seqlen
    if windows is not None and windows < 1:
        raise UserInputError(f"--windows must be at least 1, got {windows}")
    if windows is not None and windows > available:
        raise UserInputError(
            f"--windows {windows} needs {windows * seqlen} tokens of text, it has "
            f"{token_ids.numel()} ({available} windows of {seqlen})"
        )
    if available == 0:
        raise UserInputError(
            f"the text has {token_ids.numel()} tokens, fewer than one window of --seqlen {seqlen}"
        )
    n = available if windows is None else windows
    return token_ids[: n * seqlen].view(n, seqlen)


@torch.inference_mode()
def perplexity(
    logits_fn: LogitsFn,
    token_ids: torch.Tensor,
    seqlen: int = 512,
    windows: int | None = None,
    batch_size: int = 1,
    on_window: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """exp(mean NLL) over the windows of 1-D `token_ids`, scored `batch_size` windows at a time."""
    batches = make_windows(token_ids.reshape(-1), seqlen, windows)
    total_nll = 0.0
    count = 0
    for start in range(0, batches.shape[0], batch_size):
        ids = batches[start : start + batch_size]
        logits = logits_fn(ids)
        if logits.shape[:2] != ids.shape:
            raise ValueError(
                f"logits shape {tuple(logits.shape)} does not match ids {tuple(ids.shape)}"
            )
        pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        target = ids[:, 1:].reshape(-1).to(pred.device)
        total_nll += float(F.cross_entropy(pred, target, reduction="sum"))
        count += target.numel()
        if on_window is not None:
            on_window(min(start + batch_size, batches.shape[0]), batches.shape[0])
    nll = total_nll / count
    return PerplexityResult(
        ppl=math.exp(nll), tokens=count, windows=batches.shape[0], seqlen=seqlen, nll=nll
    )
