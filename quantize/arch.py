"""The transformers classes behind each family the quantizer understands (quantize.archspec).

Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2 (a Llama), Phi-3 and Gemma 2/3 share one decoder layer's
shape: RMSNorm, attention with q/k/v/o projections (Qwen2 adds q/k/v biases, Qwen3 and Gemma 3
per-head q/k RMSNorm; Phi-3 ships q|k|v fused) and rotary embeddings, RMSNorm, a gated MLP (Gemma
adds norms after each sub-block). What differs is declared in quantize/archspec/families.py. The
quantizer runs that layer's sub-blocks itself (see quantize.blocks); transformers supplies the
modules (norms, rotary embedding, activation) so their numerics match the reference model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

from quantize.archspec import FamilySpec, resolve_family
from quantize.archspec.families import LLAMA
from quantize.archspec.families import describe as describe
from quantize.errors import UserInputError

# The Linears of the Llama block, which every supported family shares (names relative to a
# layer), in true-sequential order: each tuple shares one input. Per-family: FamilySpec.groups.
QKV = LLAMA.attention_in.names
O_PROJ = LLAMA.attention_out.names
GATE_UP = LLAMA.mlp_in.names
DOWN = LLAMA.mlp_out.names
QUANTIZED_LINEARS: tuple[str, ...] = LLAMA.linear_names
# With --quantize-lm-head (GPTQModel's `lm_head=True`) the head is a packed Linear of this prefix.
LM_HEAD_PREFIX = LLAMA.lm_head

LAYERS_PREFIX = LLAMA.layers_prefix
EMBED_NAME = LLAMA.embed
FINAL_NORM_NAME = LLAMA.final_norm
LM_HEAD_NAME = f"{LLAMA.lm_head}.weight"


def layer_prefix(index: int) -> str:
    return LLAMA.layer_prefix(index)


@dataclass(frozen=True)
class Architecture:
    """The transformers classes for one supported family, with its spec."""

    model_type: str
    decoder_layer_cls: type
    rotary_cls: type
    causal_lm_cls: type
    norm_cls: type  # the family's RMSNorm: the final norm feeds a quantized lm_head
    apply_rotary: Any  # transformers' apply_rotary_pos_emb for this family
    spec: FamilySpec


def resolve_architecture(config: Any) -> Architecture:
    """The classes for `config`, or an error that names the unsupported architecture (or the
    field of a feature the family's code does not implement)."""
    spec = resolve_family(config)
    try:
        spec.check_features(config, "config")
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
    module = importlib.import_module(spec.transformers_module)
    prefix = spec.class_prefix
    return Architecture(
        model_type=config.model_type,
        decoder_layer_cls=getattr(module, f"{prefix}DecoderLayer"),
        rotary_cls=getattr(module, f"{prefix}RotaryEmbedding"),
        causal_lm_cls=getattr(module, f"{prefix}ForCausalLM"),
        norm_cls=getattr(module, f"{prefix}RMSNorm"),
        apply_rotary=module.apply_rotary_pos_emb,
        spec=spec,
    )


def sliding_window_limit(config: Any) -> int | None:
    """The narrowest attention window of any layer; calibration windows must not exceed it."""
    spec = resolve_family(config)
    return spec.sliding_window.limit(config, int(config.num_hidden_layers))


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
