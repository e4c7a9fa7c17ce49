"""The static KV cache: one preallocated pool, a fixed region per sequence slot.

Layout k, v: [layers, slots, kv_heads, max_len, head_dim]. `k[layer, slot]` is already the
[kv_heads, len, head_dim] shape attention wants, so prefill writes and decode reads are plain
slices and gathers over the slot axis; nothing is allocated per step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from quantize.errors import UserInputError


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_slots: int
    num_kv_heads: int
    max_len: int
    head_dim: int
    dtype: torch.dtype

    @property
    def pool_bytes(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        per_tensor = (
            self.num_layers * self.num_slots * self.num_kv_heads * self.max_len * self.head_dim
        )
        return 2 * per_tensor * element


class KVCache:
    def __init__(self, shape: KVCacheShape, device: torch.device) -> None:
        check_fits(shape, device)
        dims = (
            shape.num_layers,
            shape.num_slots,
            shape.num_kv_heads,
            shape.max_len,
            shape.head_dim,
        )
        self.shape = shape
        self.k = torch.zeros(dims, dtype=shape.dtype, device=device)
        self.v = torch.zeros(dims, dtype=shape.dtype, device=device)

    @property
    def pool_bytes(self) -> int:
        return self.shape.pool_bytes


def available_bytes(device: torch.device) -> int | None:
    """Free memory where the pool would live, or None where it cannot be told."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    if device.type == "cpu":
        # MemAvailable counts reclaimable page cache too; free pages alone would understate it.
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


def check_fits(shape: KVCacheShape, device: torch.device) -> None:
    free = available_bytes(device)
    need = shape.pool_bytes
    if free is not None and need > free:
        raise UserInputError(
            f"KV cache pool does not fit on {device}: {num_slots_desc(shape)} need "
            f"{need / 2**30:.2f} GiB ({need} bytes), {free / 2**30:.2f} GiB ({free} bytes) free; "
            "lower num_slots or max_model_len"
        )


def num_slots_desc(shape: KVCacheShape) -> str:
    return (
        f"{shape.num_slots} slots x {shape.max_len} tokens x {shape.num_layers} layers x "
        f"{shape.num_kv_heads} kv heads x {shape.head_dim} dims x 2 (k, v) in "
        f"{str(shape.dtype).removeprefix('torch.')}"
    )
