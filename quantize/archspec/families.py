"""The supported families and the registry that maps model_type / architecture to them.

Adding a family that reuses the Llama block's ops is one entry here (docs/ARCHITECTURE.md,
"Adding a model family").
"""

from __future__ import annotations

from typing import Any

from quantize.archspec.spec import (
    NO_BIAS,
    Attention,
    Bias,
    FamilySpec,
    LinearGroup,
    LinearSpec,
    LocalRope,
    Norms,
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

PHI3 = FamilySpec(
    name="Phi-3",
    model_types=("phi3",),
    architectures=("Phi3ForCausalLM",),
    transformers_module="transformers.models.phi3.modeling_phi3",
    class_prefix="Phi3",
    # HF ships q|k|v and gate|up already fused: each group is one Linear (one GPTQ call over the
    # fused weight); the runner splits its output as for a fusion of its own. Checkpoints that
    # store either as its Llama-named parts (rows in this order) load too.
    attention_in=LinearGroup(
        "qkv",
        (
            LinearSpec(
                "self_attn.qkv_proj",
                "q_size+2*kv_size",
                "hidden",
                parts=_attention(NO_BIAS, NO_BIAS)[0].linears,
            ),
        ),
    ),
    attention_out=LinearGroup("o", (LinearSpec("self_attn.o_proj", "hidden", "q_size"),)),
    mlp_in=LinearGroup(
        "gate_up",
        (
            LinearSpec(
                "mlp.gate_up_proj", "2*intermediate", "hidden", parts=_mlp(NO_BIAS)[0].linears
            ),
        ),
    ),
    mlp_out=LinearGroup("down", (LinearSpec("mlp.down_proj", "hidden", "intermediate"),)),
    # GPTQModel 7.7 quantizes and saves Phi-3 with gate_up_proj split (first half gate_proj,
    # second half up_proj; defuser's Phi3MLP patch) and qkv_proj kept fused (its Phi3QModel
    # module_tree): README's supported-families notes.
    gptqmodel_unfused=("mlp.gate_up_proj",),
    sliding_window=SlidingWindow("every_layer"),
    rope_types=("default",),  # longrope (su, yarn) is not implemented
)


def _gemma(**fields: Any) -> FamilySpec:
    """Gemma 2 and 3 share the block: scaled embeddings, (1 + w) sandwich norms, gelu_tanh GLU,
    query_pre_attn_scalar, alternating local and global layers, tied embeddings."""
    attention_in, attention_out = _attention(ATTENTION_BIAS, ATTENTION_BIAS)
    mlp_in, mlp_out = _mlp(NO_BIAS)
    return FamilySpec(
        attention_in=attention_in,
        attention_out=attention_out,
        mlp_in=mlp_in,
        mlp_out=mlp_out,
        norms=Norms(
            attention_in="input_layernorm.weight",
            attention_out="post_attention_layernorm.weight",
            mlp_in="pre_feedforward_layernorm.weight",
            mlp_out="post_feedforward_layernorm.weight",
            form="one_plus_weight",
        ),
        activation="gelu_pytorch_tanh",
        activation_key="hidden_activation",
        embed_scale="sqrt_hidden",
        final_softcap_key="final_logit_softcapping",
        refused_flags=("use_bidirectional_attention",),
        **fields,
    )


GEMMA2 = _gemma(
    name="Gemma 2",
    model_types=("gemma2",),
    architectures=("Gemma2ForCausalLM",),
    transformers_module="transformers.models.gemma2.modeling_gemma2",
    class_prefix="Gemma2",
    attention=Attention(
        query_scale_key="query_pre_attn_scalar",
        query_scale_default=256,
        softcap_key="attn_logit_softcapping",
    ),
    sliding_window=SlidingWindow("alternating", default_pattern=2),
)

GEMMA3 = _gemma(
    name="Gemma 3 (text)",
    model_types=("gemma3_text",),
    architectures=("Gemma3ForCausalLM",),
    transformers_module="transformers.models.gemma3.modeling_gemma3",
    class_prefix="Gemma3",
    qk_norm=QKNorm(),
    # transformers' Gemma 3 attention does not apply attn_logit_softcapping (its configs leave it
    # null), so neither do we: no softcap_key.
    attention=Attention(query_scale_key="query_pre_attn_scalar", query_scale_default=256),
    sliding_window=SlidingWindow(
        "alternating", pattern_key="sliding_window_pattern", default_pattern=6
    ),
    rope_theta_default=1_000_000.0,
    local_rope=LocalRope(),
)

FAMILIES: tuple[FamilySpec, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, PHI3, GEMMA2, GEMMA3)

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
