"""Rust extension: bit packing in the AutoGPTQ layout and streaming safetensors I/O."""

from native._native import __version__

__all__ = ["__version__"]
