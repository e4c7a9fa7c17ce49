"""Matmul on GPTQ-packed weights: QuantLinear, and the dispatch seam that picks its kernel."""

from gateway.kernels.dispatch import KERNEL_NAMES, prepare
from gateway.kernels.quant_linear import QuantLinear

__all__ = ["KERNEL_NAMES", "QuantLinear", "prepare"]
