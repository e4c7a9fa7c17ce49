"""The paged KV cache: one pool of fixed-size blocks shared by every sequence.

Layout k, v: [layers, num_blocks, block_size, kv_heads, head_dim]. Position p of a sequence lives at
slot `table[p // block_size] * block_size + p % block_size` of the flat [num_blocks * block_size,
kv_heads, head_dim] view of a layer, so a step writes all its new tokens with one index_copy and
attention reads a sequence by gathering its blocks. Which blocks a sequence owns is decided by
gateway/engine/block_manager.py; this module only holds the tensors and sizes them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from quantize.errors import UserInputError

DEFAULT_BLOCK_SIZE = 16
# The default pool on a GPU: this share of the memory left once weights are loaded (the rest
# holds activations, CUDA graphs and the sampler's tables).
GPU_DEFAULT_SHARE = 0.85
# On CPU (CI and the demo), a modest pool: a quarter of available memory, at most 2 GiB.
CPU_DEFAULT_SHARE = 0.25
CPU_DEFAULT_CAP = 2 << 30

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """Bytes from "123", "1.5G", "1GiB", "512Mi", "4096K" (K/M/G/T decimal, Ki/Mi/Gi/Ti binary)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 1073741824, 1GiB, 512Mi, 2G)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    scale = 1 << (10 * " kmgt".index(unit[0])) if unit.endswith("i") else _UNITS[unit]
    value = int(number * scale)
    if value < 1:
        raise ValueError(f"{text!r}: the size must be at least 1 byte")
    return value


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers, k and v."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element

    @property
    def pool_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


class KVCache:
    def __init__(self, shape: KVCacheShape, device: torch.device) -> None:
        check_fits(shape, device)
        dims = (
            shape.num_layers,
            shape.num_blocks,
            shape.block_size,
            shape.num_kv_heads,
            shape.head_dim,
        )
        self.shape = shape
        self.k = torch.zeros(dims, dtype=shape.dtype, device=device)
        self.v = torch.zeros(dims, dtype=shape.dtype, device=device)

    @property
    def pool_bytes(self) -> int:
        return self.shape.pool_bytes

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's k and v as [num_blocks * block_size, kv_heads, head_dim] views."""
        s = self.shape
        rows = s.num_blocks * s.block_size
        return (
            self.k[layer].view(rows, s.num_kv_heads, s.head_dim),
            self.v[layer].view(rows, s.num_kv_heads, s.head_dim),
        )


def blocks_for_budget(budget_bytes: int, block_bytes: int) -> int:
    return budget_bytes // block_bytes


def default_budget(device: torch.device) -> int:
    """The pool size when --kv-cache-memory is not given (see the constants above)."""
    free = available_bytes(device)
    if free is None:
        return CPU_DEFAULT_CAP
    if device.type == "cuda":
        return int(free * GPU_DEFAULT_SHARE)
    return min(int(free * CPU_DEFAULT_SHARE), CPU_DEFAULT_CAP)


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
            f"KV cache pool does not fit on {device}: {describe(shape)} need "
            f"{need / 2**30:.2f} GiB ({need} bytes), {free / 2**30:.2f} GiB ({free} bytes) free; "
            "lower --kv-cache-memory"
        )


def describe(shape: KVCacheShape) -> str:
    return (
        f"{shape.num_blocks} blocks x {shape.block_size} tokens x {shape.num_layers} layers x "
        f"{shape.num_kv_heads} kv heads x {shape.head_dim} dims x 2 (k, v) in "
        f"{str(shape.dtype).removeprefix('torch.')}"
    )
