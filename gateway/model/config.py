"""What the runner needs from config.json (and quantize_config.json, generation_config.json).

Read straight from the JSON (no transformers model classes at run time), validated here so that a
config the runner cannot serve fails at load with the field named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantize.archspec import FAMILIES, FamilySpec, family_for_architecture
from quantize.errors import UserInputError
from quantize.format import CONFIG_FILE, QUANTIZE_CONFIG_FILE

# architecture -> model_type, from the family specs (quantize/archspec/families.py).
SUPPORTED_ARCHITECTURES = {
    arch: family.model_types[0] for family in FAMILIES for arch in family.architectures
}
# Every family takes these today; a family's spec may narrow them (FamilySpec.rope_types).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_QUANT_BITS = (2, 3, 4, 8)
# AutoGPTQ v1 stores zero-1 ("gptq"); GPTQModel's internal v2 stores the zero itself.
SUPPORTED_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0


@dataclass(frozen=True)
class QuantConfig:
    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    checkpoint_format: str
    raw: dict[str, Any] = field(compare=False, repr=False)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None
    quant: QuantConfig | None
    family: FamilySpec = field(compare=False, repr=False, default=FAMILIES[0])
    # The family's attention and embedding quirks, resolved from config.json (quantize/archspec).
    attention_scale: float | None = None  # None: head_dim ** -0.5
    attention_softcap: float | None = None  # scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    embed_scale: float | None = None  # embeddings times this
    local_rope: RopeConfig | None = None  # the rope of sliding-window layers, when their own

    @property
    def layer_ropes(self) -> tuple[int, ...]:
        """Per layer: 0 for `rope`, 1 for `local_rope` (its sliding-window layers)."""
        if self.local_rope is None:
            return (0,) * self.num_layers
        return tuple(0 if w is None else 1 for w in self.sliding_windows)


def read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open() as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise UserInputError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: expected a JSON object")
    return data


def load_model_config(model_dir: Path) -> ModelConfig:
    cfg = read_json(model_dir / CONFIG_FILE)
    where = f"{model_dir / CONFIG_FILE}"

    def need(key: str, kind: type = int) -> Any:
        if key not in cfg or cfg[key] is None:
            raise UserInputError(f"{where}: missing field {key!r}")
        value = cfg[key]
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise UserInputError(f"{where}: {key} must be a positive integer, got {value!r}")
        if kind is float and (
            not isinstance(value, int | float) or isinstance(value, bool) or value <= 0
        ):
            raise UserInputError(f"{where}: {key} must be a positive number, got {value!r}")
        return value

    architectures = cfg.get("architectures") or []
    architecture = architectures[0] if architectures else None
    model_type = cfg.get("model_type")
    if architecture is None:
        by_type = {t: a for a, t in SUPPORTED_ARCHITECTURES.items()}
        architecture = by_type.get(model_type)
    family = family_for_architecture(architecture)
    if family is None:
        shown = architectures[0] if architectures else f"model_type {model_type!r}"
        raise UserInputError(
            f"{where}: architectures: {shown!s} is not supported; the runner serves "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (model types "
            f"{', '.join(sorted(set(SUPPORTED_ARCHITECTURES.values())))})"
        )
    model_type = family.model_types[0]

    act_key = family.activation_key
    hidden_act = cfg.get(act_key) or family.activation
    if hidden_act != family.activation:
        raise UserInputError(
            f"{where}: {act_key} {hidden_act!r} is not supported for {family.name} "
            f"(only {family.activation!r})"
        )
    try:
        family.check_features(cfg, where)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None

    hidden = need("hidden_size")
    num_heads = need("num_attention_heads")
    num_kv_heads = cfg.get("num_key_value_heads") or num_heads
    if not isinstance(num_kv_heads, int) or num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise UserInputError(
            f"{where}: num_key_value_heads ({num_kv_heads!r}) must divide "
            f"num_attention_heads ({num_heads})"
        )
    head_dim = cfg.get("head_dim") or hidden // num_heads
    if not isinstance(head_dim, int) or head_dim % 2:
        raise UserInputError(f"{where}: head_dim must be an even integer, got {head_dim!r}")
    num_layers = need("num_hidden_layers")
    max_pos = need("max_position_embeddings")
    rope, local_rope = _ropes(cfg, where, max_pos, family)
    sliding_windows = _sliding_windows(cfg, where, family, num_layers)

    return ModelConfig(
        name=model_dir.resolve().name,  # the directory the user chose, not a hub id it came from
        architecture=architecture,
        model_type=model_type,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=need("rms_norm_eps", float),
        rope=rope,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family.attention_in.linears[0].bias.applies(cfg),
        o_bias=family.attention_out.linears[0].bias.applies(cfg),
        mlp_bias=family.mlp_in.linears[0].bias.applies(cfg),
        qk_norm=family.qk_norm is not None,
        sliding_windows=sliding_windows,
        bos_token_id=cfg.get("bos_token_id") if isinstance(cfg.get("bos_token_id"), int) else None,
        eos_token_ids=_eos_ids(cfg, model_dir),
        torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        quant=load_quant_config(model_dir, cfg),
        family=family,
        attention_scale=family.attention.scale(cfg, head_dim),
        attention_softcap=_positive(
            family.attention.softcap(cfg), family.attention.softcap_key, where
        ),
        final_softcap=_positive(family.final_softcap(cfg), family.final_softcap_key, where),
        embed_scale=family.embedding_scale(cfg),
        local_rope=local_rope,
    )


def _positive(value: float | None, key: str | None, where: str) -> float | None:
    if value is not None and not value > 0:
        raise UserInputError(f"{where}: {key} must be a positive number or null, got {value}")
    return value


def _ropes(
    cfg: dict[str, Any], where: str, max_pos: int, family: FamilySpec
) -> tuple[RopeConfig, RopeConfig | None]:
    """The rope of the (global) layers, and that of the sliding-window layers when the family
    gives them their own (Gemma 3), else None."""
    local = family.local_rope
    supported = family.rope_types
    params = cfg.get("rope_parameters")
    if local is not None and isinstance(params, dict) and local.global_layer_type in params:
        # transformers >= 5: one rope_parameters entry per layer type.
        ropes = []
        for layer_type in (local.global_layer_type, local.layer_type):
            entry = params.get(layer_type) or {}
            field_name = f"rope_parameters.{layer_type}"
            if not isinstance(entry, dict):
                raise UserInputError(f"{where}: {field_name} must be an object, got {entry!r}")
            default = local.theta_default if layer_type == local.layer_type else None
            rope = _rope_config(
                {"rope_parameters": entry}, where, max_pos, supported,
                theta_default=default or family.rope_theta_default, field_name=field_name,
            )  # fmt: skip
            ropes.append(rope)
        return ropes[0], ropes[1]
    rope = _rope_config(cfg, where, max_pos, supported, theta_default=family.rope_theta_default)
    if local is None:
        return rope, None
    theta = cfg.get(local.theta_key, local.theta_default)
    if not isinstance(theta, int | float) or isinstance(theta, bool) or theta <= 0:
        raise UserInputError(f"{where}: {local.theta_key} must be a positive number, got {theta!r}")
    return rope, RopeConfig(theta=float(theta))


def _rope_config(
    cfg: dict[str, Any],
    where: str,
    max_pos: int,
    supported: tuple[str, ...] = SUPPORTED_ROPE_TYPES,
    *,
    theta_default: float = 10000.0,
    field_name: str | None = None,
) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older configs have rope_theta + rope_scaling.
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", theta_default))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if field_name is None:
        field_name = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    if rope_type not in supported:
        raise UserInputError(
            f"{where}: {field_name}.rope_type {rope_type!r} is not supported; supported: "
            f"{', '.join(supported)}"
        )
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UserInputError(
            f"{where}: partial_rotary_factor {partial!r} is not supported (only 1.0: rotary "
            "embedding over the whole head)"
        )
    if not isinstance(theta, int | float) or theta <= 0:
        raise UserInputError(f"{where}: rope_theta must be a positive number, got {theta!r}")
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    factor = params.get("factor")
    if not isinstance(factor, int | float) or factor < 1.0:
        raise UserInputError(f"{where}: {field_name}.factor must be a number >= 1, got {factor!r}")
    if rope_type == "linear":
        return RopeConfig(theta=float(theta), rope_type="linear", factor=float(factor))
    try:
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    except (KeyError, TypeError, ValueError):
        raise UserInputError(
            f"{where}: {field_name} of rope_type 'llama3' needs low_freq_factor and "
            "high_freq_factor"
        ) from None
    if not high > low > 0:
        raise UserInputError(f"{where}: {field_name}: need high_freq_factor > low_freq_factor > 0")
    original = params.get(
        "original_max_position_embeddings", cfg.get("original_max_position_embeddings", max_pos)
    )
    return RopeConfig(
        theta=float(theta),
        rope_type="llama3",
        factor=float(factor),
        low_freq_factor=low,
        high_freq_factor=high,
        original_max_position_embeddings=int(original),
    )


def _sliding_windows(
    cfg: dict[str, Any], where: str, family: FamilySpec, num_layers: int
) -> tuple[int | None, ...]:
    try:
        return family.sliding_window.windows(cfg, num_layers, where)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None


def _eos_ids(cfg: dict[str, Any], model_dir: Path) -> tuple[int, ...]:
    ids: list[int] = []
    sources = [cfg]
    gen_path = model_dir / "generation_config.json"
    if gen_path.exists():
        sources.append(read_json(gen_path))
    for source in sources:
        value = source.get("eos_token_id")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int) and item not in ids:
                ids.append(item)
    return tuple(ids)


def load_quant_config(model_dir: Path, cfg: dict[str, Any]) -> QuantConfig | None:
    """GPTQ settings from config.json's quantization_config, else quantize_config.json; None if
    the checkpoint is not quantized."""
    raw = cfg.get("quantization_config")
    where = f"{model_dir / CONFIG_FILE}: quantization_config"
    if raw is None and (model_dir / QUANTIZE_CONFIG_FILE).exists():
        raw = read_json(model_dir / QUANTIZE_CONFIG_FILE)
        where = f"{model_dir / QUANTIZE_CONFIG_FILE}"
    if raw is None:
        return None
    method = raw.get("quant_method", "gptq")
    if method != "gptq":
        raise UserInputError(f"{where}: quant_method {method!r} is not supported (only 'gptq')")
    bits = raw.get("bits")
    if bits not in SUPPORTED_QUANT_BITS:
        raise UserInputError(
            f"{where}: bits {bits!r} is not supported; supported: {SUPPORTED_QUANT_BITS}"
        )
    group_size = raw.get("group_size", -1)
    if not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise UserInputError(
            f"{where}: group_size must be a positive integer or -1, got {group_size!r}"
        )
    fmt = raw.get("checkpoint_format") or raw.get("format") or "gptq"
    if fmt not in SUPPORTED_CHECKPOINT_FORMATS:
        raise UserInputError(
            f"{where}: checkpoint_format {fmt!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_CHECKPOINT_FORMATS)}"
        )
    if raw.get("dynamic"):
        raise UserInputError(f"{where}: dynamic (per-module bits/group size) is not supported")
    return QuantConfig(
        bits=bits,
        group_size=group_size,
        desc_act=bool(raw.get("desc_act", False)),
        sym=bool(raw.get("sym", True)),
        checkpoint_format=fmt,
        raw=dict(raw),
    )
