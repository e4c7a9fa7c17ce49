"""Read the tensors of a safetensors checkpoint directory (one file, or shards plus an index).

One function, `open_tensors(dir)`, hides which reader is used: the native mmap reader
(`native.SafetensorsReader`, docs/ARCHITECTURE.md §1) where the extension provides it, else the
`safetensors` package. Both give the same answers; only speed and memory differ.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from quantize.errors import UserInputError
from quantize.format import WEIGHTS_FILE, WEIGHTS_INDEX_FILE

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


def open_tensors(model_dir: Path) -> TensorSource:
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
        return _NativeSource(SafetensorsReader(str(model_dir)))
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{model_dir}: cannot read the safetensors files ({exc})") from None


class _NativeSource:
    def __init__(self, reader) -> None:  # native.SafetensorsReader
        self.reader = reader
        self._keys = list(reader.keys())

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
