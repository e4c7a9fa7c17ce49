"""The Llama-family runner and the checkpoint loading under it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from gateway.model.llama import LlamaRunner, RunnerSpec

if TYPE_CHECKING:
    from gateway.engine.runner import RunnerOptions


def load_runner(path: str | os.PathLike[str], options: RunnerOptions) -> LlamaRunner:
    """The engine's default runner factory (gateway/engine/runner.py `RunnerFactory`)."""
    return LlamaRunner.load(
        path,
        device=options.device,
        max_model_len=options.max_model_len,
        kernel=options.kernel,
        kv_cache_bytes=options.kv_cache_bytes,
        block_size=options.block_size,
        max_num_seqs=options.max_num_seqs,
        kv_cache_dtype=options.kv_cache_dtype,
        verify_checksums=options.verify_checksums,
    )


__all__ = ["LlamaRunner", "RunnerSpec", "load_runner"]
