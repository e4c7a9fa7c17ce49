"""Read the tensors of a safetensors checkpoint directory (one file, or shards plus an index).

One function, `open_tensors(dir)`, hides which reader is used: the native mmap reader
(`native.SafetensorsReader`, docs/ARCHITECTURE.md §1) where the extension provides it, else the
`safetensors` package. Both give the same answers; only speed and memory differ.

With `verify` (the default) every tensor is checked against the checksum our writer recorded in
its file's metadata (native/src/checksum.rs), in parallel on a background thread (the hashing runs
in Rust without the GIL) while the caller reads the tensors, so it adds little to a load; the
caller must call `verified()` before trusting the data: it waits, and a damaged checkpoint fails
there naming the tensor instead of serving garbage. Checkpoints from other tools record
no checksums and load as before; so does everything when the native extension is missing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from quantize.errors import UserInputError
from quantize.format import WEIGHTS_FILE, WEIGHTS_INDEX_FILE

log = logging.getLogger(__name__)

INDEX_NAME = WEIGHTS_INDEX_FILE
SINGLE_NAME = WEIGHTS_FILE

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorSource(Protocol):
    def keys(self) -> Iterable[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> torch.Tensor: ...

    def nbytes(self, name: str) -> int: ...

    def verified(self) -> int:
        """Waits for checksum verification; returns how many tensors it checked."""
        ...


def open_tensors(model_dir: Path, *, verify: bool = True) -> TensorSource:
    if not (model_dir / INDEX_NAME).exists() and not (model_dir / SINGLE_NAME).exists():
        found = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if len(found) != 1:
            raise UserInputError(
                f"{model_dir}: no {SINGLE_NAME} or {INDEX_NAME}"
                + (f" (found {', '.join(found)})" if found else "")
            )
    try:
        from native import SafetensorsReader
    except ImportError:
        return _SafetensorsPackageSource(model_dir)
    try:
        reader = SafetensorsReader(str(model_dir))
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{model_dir}: cannot read the safetensors files ({exc})") from None
    return _NativeSource(reader, model_dir, verify=verify)


def verify_checksums(reader, model_dir: Path) -> int:  # reader: native.SafetensorsReader
    """Checks every tensor that has a recorded checksum; returns how many were checked."""
    try:
        checked = reader.verify_checksums()
    except ValueError as exc:
        raise UserInputError(
            f"{model_dir}: checksum verification failed, the checkpoint is damaged: {exc}. "
            "Copy or quantize it again (--no-verify loads it anyway)"
        ) from None
    if checked:
        log.info("verified the checksums of %d tensors in %s", checked, model_dir)
    return checked


class _NativeSource:
    def __init__(self, reader, model_dir: Path, *, verify: bool) -> None:  # native reader
        self.reader = reader
        self._keys = list(reader.keys())
        self._verification: Future[int] | None = None
        if verify:
            pool = ThreadPoolExecutor(1, thread_name_prefix="verify-checksums")
            self._verification = pool.submit(verify_checksums, reader, model_dir)
            pool.shutdown(wait=False)  # the one task still runs; the thread ends after it

    def verified(self) -> int:
        return 0 if self._verification is None else self._verification.result()

    def keys(self) -> Iterable[str]:
        return self._keys

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.reader.info(name)[1])

    def dtype(self, name: str) -> torch.dtype:
        return _torch_dtype(self.reader.info(name)[0], name)

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shape(name), dtype=np.int64)) * _element_size(self.dtype(name))

    def get(self, name: str) -> torch.Tensor:
        # The reader hands out read-only views over the mmap; copy once so torch owns the memory.
        return self.reader.get_torch(name).clone()


class _SafetensorsPackageSource:
    def __init__(self, model_dir: Path) -> None:
        from safetensors import safe_open

        index_path = model_dir / INDEX_NAME
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UserInputError(f"{index_path}: not a safetensors index ({exc})") from None
            files = sorted(set(weight_map.values()))
        else:
            single = model_dir / SINGLE_NAME
            files = [single.name if single.exists() else next(model_dir.glob("*.safetensors")).name]
            weight_map = None
        self._handles = {}
        for file in files:
            path = model_dir / file
            if not path.exists():
                raise UserInputError(f"{index_path}: names shard {file!r}, which does not exist")
            try:
                self._handles[file] = safe_open(str(path), framework="pt")
            except Exception as exc:  # the package raises its own untyped errors for bad headers
                raise UserInputError(f"{path}: not a readable safetensors file ({exc})") from None
        if weight_map is None:
            (file,) = files
            weight_map = dict.fromkeys(self._handles[file].keys(), file)
        self._where = weight_map

    def keys(self) -> Iterable[str]:
        return self._where.keys()

    def _slice(self, name: str):
        return self._handles[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _torch_dtype(self._slice(name).get_dtype(), name)

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shape(name), dtype=np.int64)) * _element_size(self.dtype(name))

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def verified(self) -> int:
        return 0  # without the native extension there is nothing to verify with


def _torch_dtype(code: str, name: str) -> torch.dtype:
    key = code.upper().removeprefix("TORCH.")
    aliases = {
        "FLOAT32": "F32",
        "FLOAT16": "F16",
        "BFLOAT16": "BF16",
        "INT32": "I32",
        "INT64": "I64",
        "FLOAT64": "F64",
        "INT8": "I8",
        "UINT8": "U8",
        "INT16": "I16",
    }
    key = aliases.get(key, key)
    if key not in _DTYPES:
        raise UserInputError(f"tensor {name}: unsupported dtype {code}")
    return _DTYPES[key]


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
