"""Rust extension: bit packing in the AutoGPTQ layout and streaming safetensors I/O.

Everything here is implemented in ``native._native`` (native/src/); this module re-exports it.
The contract is docs/ARCHITECTURE.md, "Contracts §1"; the stub native/__init__.pyi documents
every signature.
"""

from native._native import (
    SafetensorsReader,
    SafetensorsWriter,
    __version__,
    pack_qweight,
    pack_qzeros,
    repack,
    unpack_qweight,
    unpack_qzeros,
)

__all__ = [
    "SafetensorsReader",
    "SafetensorsWriter",
    "__version__",
    "pack_qweight",
    "pack_qzeros",
    "repack",
    "unpack_qweight",
    "unpack_qzeros",
]
