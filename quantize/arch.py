"""Which model families the quantizer understands, and the shape of their decoder layers.

Llama 2/3, Mistral, Qwen2 and SmolLM2 (a Llama) share one decoder layer: RMSNorm, attention with
q/k/v/o projections (Qwen2 adds q/k/v biases) and rotary embeddings, RMSNorm, a gated MLP. The
quantizer runs that layer's sub-blocks itself (see quantize.blocks); transformers supplies the
modules (norms, rotary embedding, activation) so their numerics match the reference model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

from quantize.errors import UnsupportedArchitectureError

# model_type -> the transformers module and class-name prefix that implement it.
SUPPORTED_MODEL_TYPES: dict[str, tuple[str, str]] = {
    "llama": ("transformers.models.llama.modeling_llama", "Llama"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
}

# The Linears of a decoder layer in true-sequential order: each tuple shares one input.
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
O_PROJ = ("self_attn.o_proj",)
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
DOWN = ("mlp.down_proj",)
QUANTIZED_LINEARS: tuple[str, ...] = QKV + O_PROJ + GATE_UP + DOWN
# With --quantize-lm-head (GPTQModel's `lm_head=True`) the head is a packed Linear of this prefix.
LM_HEAD_PREFIX = "lm_head"

LAYERS_PREFIX = "model.layers"
EMBED_NAME = "model.embed_tokens.weight"
FINAL_NORM_NAME = "model.norm.weight"
LM_HEAD_NAME = "lm_head.weight"


def layer_prefix(index: int) -> str:
    return f"{LAYERS_PREFIX}.{index}."


@dataclass(frozen=True)
class Architecture:
    """The transformers classes for one supported model_type."""

    model_type: str
    decoder_layer_cls: type
    rotary_cls: type
    causal_lm_cls: type
    norm_cls: type  # the family's RMSNorm: the final norm feeds a quantized lm_head
    apply_rotary: Any  # transformers' apply_rotary_pos_emb for this family


def describe(config: Any) -> str:
    archs = getattr(config, "architectures", None) or []
    model_type = getattr(config, "model_type", None)
    return f"model_type {model_type!r}" + (f" ({', '.join(archs)})" if archs else "")


def resolve_architecture(config: Any) -> Architecture:
    """The classes for `config`, or an error that names the unsupported architecture."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        raise UnsupportedArchitectureError(
            f"unsupported architecture: {describe(config)}; the quantizer supports the Llama "
            f"family ({supported}; SmolLM2 is a llama)"
        )
    module_name, prefix = SUPPORTED_MODEL_TYPES[model_type]
    module = importlib.import_module(module_name)
    return Architecture(
        model_type=model_type,
        decoder_layer_cls=getattr(module, f"{prefix}DecoderLayer"),
        rotary_cls=getattr(module, f"{prefix}RotaryEmbedding"),
        causal_lm_cls=getattr(module, f"{prefix}ForCausalLM"),
        norm_cls=getattr(module, f"{prefix}RMSNorm"),
        apply_rotary=module.apply_rotary_pos_emb,
    )


def sliding_window_limit(config: Any) -> int | None:
    """The attention window, if the model uses one; calibration windows must not exceed it."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    if getattr(config, "model_type", None) == "qwen2" and not getattr(
        config, "use_sliding_window", False
    ):
        return None
    return int(window)


def build_decoder_layer(
    arch: Architecture,
    config: Any,
    index: int,
    tensors: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.nn.Module:
    """One decoder layer with its weights, built on the meta device and then filled.

    `tensors` are named relative to the layer ("self_attn.q_proj.weight"). Nothing is allocated
    twice: the module is created empty and takes the given tensors (moved to device and dtype).
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        layer = arch.decoder_layer_cls(config, index)
    expected = {name for name, _ in layer.named_parameters()}
    missing = expected - tensors.keys()
    if missing:
        raise ValueError(f"layer {index} is missing tensors: {', '.join(sorted(missing))}")
    state = {name: tensors[name].to(device=device, dtype=dtype) for name in expected}
    layer.load_state_dict(state, strict=True, assign=True)
    # Buffers that transformers creates itself (none in these layers today) would still be meta.
    for name, buf in layer.named_buffers():
        if buf.is_meta:
            raise ValueError(f"layer {index}: buffer {name} has no value")
    return layer.eval()
