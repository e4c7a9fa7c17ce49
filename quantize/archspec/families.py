"""The supported families and the registry that maps model_type / architecture to them.

Adding a family that reuses the Llama block's ops is one entry here (docs/ARCHITECTURE.md,
"Adding a model family").
"""

from __future__ import annotations

from typing import Any

from quantize.archspec.spec import (
    Bias,
    FamilySpec,
    LinearGroup,
    LinearSpec,
    QKNorm,
    SlidingWindow,
    config_get,
)
from quantize.errors import UnsupportedArchitectureError

ATTENTION_BIAS = Bias(config_key="attention_bias")
MLP_BIAS = Bias(config_key="mlp_bias")


def _attention(qkv_bias: Bias, o_bias: Bias) -> tuple[LinearGroup, LinearGroup]:
    return (
        LinearGroup(
            "qkv",
            (
                LinearSpec("self_attn.q_proj", "q_size", "hidden", qkv_bias),
                LinearSpec("self_attn.k_proj", "kv_size", "hidden", qkv_bias),
                LinearSpec("self_attn.v_proj", "kv_size", "hidden", qkv_bias),
            ),
        ),
        LinearGroup("o", (LinearSpec("self_attn.o_proj", "hidden", "q_size", o_bias),)),
    )


def _mlp(bias: Bias) -> tuple[LinearGroup, LinearGroup]:
    return (
        LinearGroup(
            "gate_up",
            (
                LinearSpec("mlp.gate_proj", "intermediate", "hidden", bias),
                LinearSpec("mlp.up_proj", "intermediate", "hidden", bias),
            ),
        ),
        LinearGroup("down", (LinearSpec("mlp.down_proj", "hidden", "intermediate", bias),)),
    )


def _llama_block(qkv_bias: Bias, o_bias: Bias) -> dict[str, LinearGroup]:
    attention_in, attention_out = _attention(qkv_bias, o_bias)
    mlp_in, mlp_out = _mlp(MLP_BIAS)
    return {
        "attention_in": attention_in,
        "attention_out": attention_out,
        "mlp_in": mlp_in,
        "mlp_out": mlp_out,
    }


LLAMA = FamilySpec(
    name="Llama",  # Llama 2/3/3.1+, SmolLM2
    model_types=("llama",),
    architectures=("LlamaForCausalLM",),
    transformers_module="transformers.models.llama.modeling_llama",
    class_prefix="Llama",
    **_llama_block(ATTENTION_BIAS, ATTENTION_BIAS),
)

MISTRAL = FamilySpec(
    name="Mistral",
    model_types=("mistral",),
    architectures=("MistralForCausalLM",),
    transformers_module="transformers.models.mistral.modeling_mistral",
    class_prefix="Mistral",
    sliding_window=SlidingWindow("every_layer"),
    **_llama_block(ATTENTION_BIAS, ATTENTION_BIAS),
)

QWEN2 = FamilySpec(
    name="Qwen2",  # Qwen2, Qwen2.5
    model_types=("qwen2",),
    architectures=("Qwen2ForCausalLM",),
    transformers_module="transformers.models.qwen2.modeling_qwen2",
    class_prefix="Qwen2",
    sliding_window=SlidingWindow("qwen"),
    **_llama_block(Bias(always=True), Bias()),  # q/k/v carry biases, o_proj never
)

QWEN3 = FamilySpec(
    name="Qwen3",
    model_types=("qwen3",),
    architectures=("Qwen3ForCausalLM",),
    transformers_module="transformers.models.qwen3.modeling_qwen3",
    class_prefix="Qwen3",
    qk_norm=QKNorm(),
    sliding_window=SlidingWindow("qwen"),
    **_llama_block(ATTENTION_BIAS, ATTENTION_BIAS),
)

FAMILIES: tuple[FamilySpec, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3)

_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}
_BY_ARCHITECTURE = {a: f for f in FAMILIES for a in f.architectures}


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_BY_MODEL_TYPE))


def supported_architectures() -> tuple[str, ...]:
    return tuple(_BY_ARCHITECTURE)


def family_for_model_type(model_type: Any) -> FamilySpec | None:
    return _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None


def family_for_architecture(architecture: Any) -> FamilySpec | None:
    return _BY_ARCHITECTURE.get(architecture) if isinstance(architecture, str) else None


def describe(config: Any) -> str:
    """ "model_type 'x' (XForCausalLM)" for error messages."""
    archs = config_get(config, "architectures") or []
    model_type = config_get(config, "model_type")
    return f"model_type {model_type!r}" + (f" ({', '.join(archs)})" if archs else "")


def resolve_family(config: Any) -> FamilySpec:
    """The family of a config (object or dict) by its model_type, or an error that names the
    model_type and lists the supported ones."""
    family = family_for_model_type(config_get(config, "model_type"))
    if family is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture: {describe(config)}; supported model types: "
            f"{', '.join(supported_model_types())} (SmolLM2 is a llama)"
        )
    return family
