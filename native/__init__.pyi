"""Type stub and reference for the Rust extension (native/src/). Contract: docs/ARCHITECTURE.md §1.

Packing follows AutoGPTQ bit for bit: each column of `qweight` (and each row of `qzeros`) is a
little-endian stream of `bits`-wide codes cut into 32-bit words, code k at bit `bits * k`; for 3
bits codes straddle word boundaries. Errors: ValueError (bad dtype, shape, value, file content)
or OSError with errno (file system); TypeError when an argument is not a numpy array. Inputs in
any layout are accepted (non-C-contiguous ones are copied into C order first); the heavy loops
run with the GIL released, in parallel (rayon).
"""

import os
from collections.abc import Iterator
from types import TracebackType

import numpy as np
import numpy.typing as npt
import torch

__version__: str

def pack_qweight(intweight: npt.NDArray[np.integer], bits: int) -> npt.NDArray[np.int32]:
    """[in_features, out_features] codes in 0..2**bits-1 (uint8, or any integer dtype holding
    small values) -> int32 [in_features*bits/32, out_features], packed along the input dim.
    bits in {2, 3, 4, 8}; in_features*bits must be a multiple of 32. An out-of-range value is
    reported with its (row, column)."""

def unpack_qweight(qweight: npt.NDArray[np.int32], bits: int) -> npt.NDArray[np.uint8]:
    """Inverse of pack_qweight: int32 (or uint32) [rows, out] -> uint8 [rows*32/bits, out]."""

def pack_qzeros(zeros: npt.NDArray[np.integer], bits: int) -> npt.NDArray[np.int32]:
    """TRUE zero points [groups, out_features] in 1..=2**bits -> int32 [groups,
    out_features*bits/32] storing zero - 1 (AutoGPTQ v1), packed along the output dim. A zero
    point of 0 is refused: v1 cannot store it."""

def unpack_qzeros(
    qzeros: npt.NDArray[np.int32], bits: int, out_features: int
) -> npt.NDArray[np.int32]:
    """Inverse of pack_qzeros: int32 [groups, out_features] holding stored + 1."""

def repack(qweight: npt.NDArray[np.int32], bits: int, layout: str) -> npt.NDArray[np.int32]:
    """Kernel layouts made at load time. "gptq": a C-contiguous copy (identity).
    "transposed": int32 [out_features, in_features*bits/32], each output channel's packed input
    words contiguous. Any other name -> ValueError listing the known ones."""

class SafetensorsWriter:
    """Streaming, sharded, atomic safetensors writer.

    `add` sends each tensor's bytes to disk at once (the model is never held). A new shard
    starts when the next tensor would push the current one past `max_shard_bytes` (a larger
    tensor gets a shard of its own). Shards are written under hidden temporary names in
    `out_dir`; `finish` fsyncs them (unless fsync=False), renames them to `model.safetensors`
    or `model-0000i-of-0000N.safetensors`, writes `model.safetensors.index.json` when N > 1, and
    removes a stale file of the other layout with the same prefix (it would shadow the new
    checkpoint in loaders). `abort()`, an exception inside `with`, a failed write (OSError), or
    the writer being garbage-collected unfinished delete every temporary file; a failed finish
    also removes what it had renamed, so nothing is left under the final names. A clean exit
    from `with` calls `finish()`. Metadata gets `"format": "pt"` unless it names a format
    (transformers requires one). Each tensor's xxh3-64 checksum is taken as it is added and each
    shard's metadata records those of its own tensors: `"gptqgw.checksum_algorithm": "xxh3_64"`
    and `"gptqgw.checksums"`, compact JSON of name -> 16 hex digits (both keys are reserved:
    passing either in `metadata` -> ValueError). Thread-safe: adds from several threads
    serialize.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        max_shard_bytes: int = 4_000_000_000,
        metadata: dict[str, str] | None = None,
        filename_prefix: str = "model",
        fsync: bool = True,
    ) -> None:
        """out_dir must exist (FileNotFoundError / NotADirectoryError naming it)."""

    def add(self, name: str, array: npt.NDArray[np.generic], dtype: str | None = None) -> None:
        """Appends one tensor. numpy dtypes: float64/32/16, int64/32/16/8, uint64/32/16/8, bool.
        `dtype` stores an integer array's raw bits under a safetensors dtype of the same width:
        dtype="BF16" for a uint16 (or int16) array of bf16 bits, "F8_E4M3"/"F8_E5M2" for uint8.
        Duplicate names and unsupported dtypes -> ValueError (the writer stays usable)."""

    def finish(self) -> list[str]:
        """Final file names: shards in order, then the index when there is more than one."""

    def abort(self) -> None: ...
    @property
    def total_size(self) -> int:
        """Tensor bytes added so far (the index's metadata.total_size)."""

    @property
    def out_dir(self) -> str: ...
    def __enter__(self) -> SafetensorsWriter: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool: ...

class SafetensorsReader:
    """Memory-mapped reader: a .safetensors file, an index .json, or a directory holding
    model.safetensors (preferred, as Hugging Face loaders do) or model.safetensors.index.json
    plus shards (or exactly one other *.safetensors / index). Headers are fully validated at
    open: truncation, header length beyond the file, bad JSON, unknown dtypes, offsets out of
    range or overlapping, byte counts that do not match dtype and shape, index entries not in
    their shard -> ValueError naming the file and tensor. Tensors are returned as views of the
    mapping; each view keeps its mapping alive, also after close(). (A file truncated on disk by
    another process while mapped would fault on access: the OS gives no way to prevent that.)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None: ...
    def keys(self) -> list[str]:
        """Tensor names, sorted."""

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype such as "F16", "BF16", "I32"; shape)."""

    def get(self, name: str, *, copy_on_write: bool = False) -> np.ndarray:
        """Zero-copy, read-only numpy view over the file (bf16 as uint16, fp8 as uint8). With
        copy_on_write=True it is writable through a private mapping (writes never reach the
        file). A tensor at an offset not aligned to its item size comes back as a copy.
        torch.from_numpy on the read-only view works but warns; use get_torch or
        copy_on_write=True to avoid the warning. Unknown name -> KeyError."""

    def get_torch(self, name: str) -> torch.Tensor:
        """torch.Tensor over a copy-on-write view (no copy, no warning); BF16 and F8 come back
        as torch.bfloat16 / float8_e4m3fn / float8_e5m2. Imports torch on first use."""

    def verify_checksums(self) -> int:
        """Checks every tensor against the checksum its file recorded (see SafetensorsWriter),
        in parallel with the GIL released; returns how many were checked (0 for files from other
        tools, which record none). A damaged tensor -> ValueError naming it and its file (and up
        to five more); malformed checksum metadata, or a tensor missing from a file's recorded
        checksums -> ValueError naming the file."""

    def metadata(self) -> dict[str, str]:
        """__metadata__ of the first file (the writer puts the same in every shard)."""

    @property
    def files(self) -> list[str]: ...
    def close(self) -> None:
        """Drops the reader's mappings; views already handed out stay valid."""

    def __contains__(self, name: str) -> bool: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[str]: ...
    def __enter__(self) -> SafetensorsReader: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool: ...
