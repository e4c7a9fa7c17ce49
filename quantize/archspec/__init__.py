"""Model families as data: one frozen spec per family, read by the quantizer and the runner.

Torch-free on purpose (it imports nothing heavier than the standard library), so config
validation and CLI errors never pay for torch. `spec` holds the vocabulary (Linears, fusions,
bias, norm, attention, sliding-window and rope rules); `families` holds the entries and the
registry.
"""

from quantize.archspec.families import (
    FAMILIES,
    family_for_architecture,
    family_for_model_type,
    resolve_family,
    supported_architectures,
    supported_model_types,
)
from quantize.archspec.spec import (
    CHECKPOINT_LAYOUTS,
    Attention,
    Bias,
    Dims,
    FamilySpec,
    LinearGroup,
    LinearSpec,
    LocalRope,
    Norms,
    QKNorm,
    SlidingWindow,
)

__all__ = [
    "CHECKPOINT_LAYOUTS",
    "FAMILIES",
    "Attention",
    "Bias",
    "Dims",
    "FamilySpec",
    "LinearGroup",
    "LinearSpec",
    "LocalRope",
    "Norms",
    "QKNorm",
    "SlidingWindow",
    "family_for_architecture",
    "family_for_model_type",
    "resolve_family",
    "supported_architectures",
    "supported_model_types",
]
