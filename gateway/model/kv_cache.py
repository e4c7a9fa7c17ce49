"""The paged KV cache: one pool of fixed-size blocks shared by every sequence.

Layout k, v: [layers, num_blocks, block_size, kv_heads, head_dim]. Position p of a sequence lives at
slot `table[p // block_size] * block_size + p % block_size` of the flat [num_blocks * block_size,
kv_heads, head_dim] view of a layer, so a step writes all its new tokens with one index_copy and
attention reads a sequence by gathering its blocks. Which blocks a sequence owns is decided by
gateway/engine/block_manager.py; this module only holds the tensors and sizes them.

`--kv-cache-dtype fp8` stores k and v as float8 e4m3 with one fp32 scale per (token, kv head) in
k_scale, v_scale [layers, num_blocks, kv_heads, block_size]: a head's values are divided by
amax / 448 before the cast, so every head uses e4m3's whole range whatever its magnitude. The
scales cost 4 bytes per head_dim bytes (3% at D = 128); within a block they are grouped by head,
so attention reading one head's keys reads its scales in whole sectors, not 4 bytes of each.
`quantize_kv`/`dequantize_kv` are the numerics; the Triton kernels (gateway/kernels/triton_ops.py)
compute the same in registers.
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

# --kv-cache-dtype: "auto" stores the compute dtype (fp16 on GPU, fp32 on CPU).
KV_CACHE_DTYPES = ("auto", "fp16", "fp8")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value
# Keeps a head of zeros from dividing by zero (its values all cast to 0 whatever the scale).
_MIN_SCALE = 1e-12

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


def kv_storage_dtype(name: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype the pool stores for a --kv-cache-dtype name."""
    if name not in KV_CACHE_DTYPES:
        raise UserInputError(
            f"kv_cache_dtype (--kv-cache-dtype) must be one of {', '.join(KV_CACHE_DTYPES)}, "
            f"got {name!r}"
        )
    return {"auto": compute_dtype, "fp16": torch.float16, "fp8": FP8_DTYPE}[name]


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] -> (e4m3 values [..., D], fp32 scales [...]) with x ~= values * scale."""
    scale = (x.float().abs().amax(dim=-1) / FP8_MAX).clamp_min(_MIN_SCALE)
    return (x.float() / scale[..., None]).to(FP8_DTYPE), scale


def dequantize_kv(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (values.float() * scale[..., None]).to(dtype)


def block_scales(scale: torch.Tensor) -> torch.Tensor:
    """`quantize_kv`'s scales of block-shaped values [num_blocks, block_size, kv_heads] in the
    pool's scale layout [num_blocks, kv_heads, block_size] (see the module docstring)."""
    return scale.transpose(1, 2).contiguous()


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """What reading x back from an fp8 cache gives (perplexity evaluation without a cache)."""
    return dequantize_kv(*quantize_kv(x), x.dtype)


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def scaled(self) -> bool:
        """fp8 storage: values carry a scale per (token, kv head)."""
        return self.dtype == FP8_DTYPE

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers, k and v (and their scales)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        per_head = self.head_dim * element + (4 if self.scaled else 0)
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * per_head

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
        # Per (token, kv head) scales of an fp8 pool; None otherwise.
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        if shape.scaled:
            scale_dims = (shape.num_layers, shape.num_blocks, shape.num_kv_heads, shape.block_size)
            self.k_scale = torch.ones(scale_dims, dtype=torch.float32, device=device)
            self.v_scale = torch.ones(scale_dims, dtype=torch.float32, device=device)

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

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [T, kv_heads, head_dim] at flat rows `slots` (torch path; the Triton kernel
        rope_and_cache does the same fused with RoPE)."""
        k_flat, v_flat = self.flat(layer)
        scales = self.layer_scales(layer)
        if scales is None:
            k_flat.index_copy_(0, slots, k.to(k_flat.dtype))
            v_flat.index_copy_(0, slots, v.to(v_flat.dtype))
            return
        block_size = self.shape.block_size
        blocks, offsets = slots // block_size, slots % block_size
        for flat, scale, x in ((k_flat, scales[0], k), (v_flat, scales[1], v)):
            values, x_scale = quantize_kv(x)
            # As bytes: torch's CPU index ops do not take float8 tensors.
            flat.view(torch.uint8).index_copy_(0, slots, values.view(torch.uint8))
            scale[blocks, :, offsets] = x_scale

    def gather(
        self, layer: int, blocks: torch.Tensor, count: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `count` positions of `blocks` as k, v [count, kv_heads, head_dim] in dtype."""
        s = self.shape
        out = []
        for values, scales in ((self.k, self.k_scale), (self.v, self.v_scale)):
            if scales is None:
                x = values[layer].index_select(0, blocks)
                out.append(x.view(-1, s.num_kv_heads, s.head_dim)[:count])
            else:
                x = values[layer].view(torch.uint8).index_select(0, blocks).view(FP8_DTYPE)
                scale = scales[layer].index_select(0, blocks).transpose(1, 2)
                scale = scale.reshape(-1, s.num_kv_heads)[:count]
                x = x.view(-1, s.num_kv_heads, s.head_dim)[:count]
                out.append(dequantize_kv(x, scale, dtype))
        return out[0], out[1]

    def layer_scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One layer's k and v scales [num_blocks, kv_heads, block_size] (fp8 only)."""
        if self.k_scale is None or self.v_scale is None:
            return None
        return self.k_scale[layer], self.v_scale[layer]


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
