"""AutoGPTQ bit packing in torch: vectorized, on any device, for 2/3/4/8 bits.

The layout (docs/ARCHITECTURE.md §2): `qweight` int32 [in*bits/32, out] packs along the input
dimension, `qzeros` int32 [groups, out*bits/32] along the output dimension. Within a packed axis the
values form one little-endian bit stream: value k occupies stream bits [k*bits, (k+1)*bits), word w
holds stream bits [32w, 32w+32). For 2/4/8 bits no value straddles two words; for 3 bits, 32 values
fill exactly 3 words and two of them straddle (AutoGPTQ's layout).

The native extension does the same on the host; these torch versions exist because the per-call
CPU/GPU fallback path must unpack on the device without leaving torch, and because act-order
repacking at load works on tensors that are already torch.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def packed_len(n: int, bits: int) -> int:
    """Words needed for `n` values; `n` must fill whole words (whole 32-value blocks for 3 bits)."""
    block = 32 if bits == 3 else 32 // bits
    if n % block:
        raise ValueError(
            f"{n} values of {bits} bits do not fill whole int32 words (need a multiple of {block})"
        )
    return n * bits // 32


def _stream_index(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For the 32 values of one 32-value block: the word each starts in and its bit offset there."""
    start = torch.arange(32, device=device, dtype=torch.int64) * bits
    return start // 32, start % 32


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack along dim 0: int32 [n*bits/32, cols] -> int32 [n, cols] of values in [0, 2**bits)."""
    check_bits(bits)
    words, cols = packed.shape
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
        # Arithmetic shift of negative words is harmless: the mask drops the sign-extended bits.
        values = (packed.unsqueeze(1) >> shifts.view(1, per_word, 1)) & mask
        return values.reshape(words * per_word, cols)
    if words % bits:
        raise ValueError(f"3-bit rows come in blocks of 3 words; got {words} rows")
    word_of, offset = _stream_index(bits, packed.device)
    blocks = (packed.to(torch.int64) & 0xFFFFFFFF).view(words // bits, bits, cols)
    low = blocks[:, word_of]
    high = blocks[:, (word_of + 1).clamp(max=bits - 1)]
    pair = low | (high << 32)
    values = (pair >> offset.view(1, 32, 1)) & mask
    return values.reshape(words // bits * 32, cols).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 0: int [n, cols] in [0, 2**bits) -> int32 [n*bits/32, cols]."""
    check_bits(bits)
    n, cols = values.shape
    words = packed_len(n, bits)
    v = values.to(torch.int64) & ((1 << bits) - 1)
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(0, 32, bits, device=values.device, dtype=torch.int64)
        packed = (v.view(words, per_word, cols) << shifts.view(1, per_word, 1)).sum(dim=1)
    else:
        # 3 bits: a value shifted to its offset spans at most two words; add each part to its word
        # (parts never overlap, so the sum is the bitwise or).
        word_of, offset = _stream_index(bits, values.device)
        blocks = v.view(n // 32, 32, cols)
        packed = torch.zeros(n // 32, bits, cols, dtype=torch.int64, device=values.device)
        shifted = blocks << offset.view(1, 32, 1)  # up to 34 bits: fits int64
        packed.index_add_(1, word_of, shifted & 0xFFFFFFFF)
        spill = (shifted >> 32) * (word_of < bits - 1).view(1, 32, 1)
        packed.index_add_(1, (word_of + 1).clamp(max=bits - 1), spill)
        packed = packed.view(words, cols)
    return _wrap_int32(packed)


def _wrap_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit patterns held in int64 -> the same bits as int32 (two's complement)."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack along dim 1 (qzeros): int32 [rows, n*bits/32] -> int32 [rows, n]."""
    return unpack_rows(packed.t(), bits).t().contiguous()


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 1 (qzeros): int [rows, n] -> int32 [rows, n*bits/32]."""
    return pack_rows(values.t(), bits).t().contiguous()


def ones_word(bits: int) -> int:
    """An int32 word (as an unsigned value) with 1 in every `bits`-wide field (2, 4, 8 bits)."""
    return sum(1 << shift for shift in range(0, 32, bits))


def decode_qzeros(qzeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Zero points int32 [groups, out] from qzeros int32 [groups, out*bits/32].

    "gptq_v2" stores the zero points themselves. "gptq" (v1) stores zero - 1, and writers differ
    on a zero point of 0, which has no field value: AutoGPTQ corrupts the word, GPTQModel (and our
    quantizer, see quantize/format.py) subtract one per field word-wise so the 0 borrows from the
    field above. Adding one per field word-wise (GPTQModel's v1 -> v2) undoes that exactly and
    equals AutoGPTQ's per-field +1 for every zero in 1..2**bits-1, so it is what we do for 2/4/8
    bits. For 3 bits, where fields straddle words, it is the per-field +1 modulo 8, as GPTQModel
    and quantize/format.py do (a stored 7 is the zero point 0). A zero point of 2**bits, which no
    quantizer writes (zeros lie in 0..2**bits-1), reads differently from AutoGPTQ's per-field + 1.
    """
    check_bits(bits)
    if checkpoint_format == "gptq_v2":
        return unpack_cols(qzeros, bits)
    if checkpoint_format != "gptq":
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}")
    if bits == 3:
        return (unpack_cols(qzeros, bits) + 1) & 7
    words = (qzeros.to(torch.int64) & 0xFFFFFFFF) + ones_word(bits)
    return unpack_cols(_wrap_int32(words), bits)
