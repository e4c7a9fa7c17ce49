"""The vocabulary of a family spec: which Linears a decoder layer has, how they fuse, and the
rules (bias, norms, activation, q/k norm, attention quirks, sliding window, rope) that differ by
family.

Config values are read through `config_get`, so a spec works on a transformers config object (the
quantizer) and on config.json's dict (the runner) alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal


def config_get(config: Any, key: str, default: Any = None) -> Any:
    """`config[key]` of a dict, or `config.key` of a config object; `default` when absent/None."""
    value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
    return default if value is None else value


@dataclass(frozen=True)
class Dims:
    """The sizes a decoder layer's shapes are written in."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config: Any) -> Dims:
        hidden = int(config_get(config, "hidden_size"))
        heads = int(config_get(config, "num_attention_heads"))
        return cls(
            hidden=hidden,
            heads=heads,
            kv_heads=int(config_get(config, "num_key_value_heads", heads)),
            head_dim=int(config_get(config, "head_dim", hidden // heads)),
            intermediate=int(config_get(config, "intermediate_size")),
            vocab=int(config_get(config, "vocab_size")),
        )

    def size(self, expr: str) -> int:
        """A size by its expression in a LinearSpec: a name ("hidden", "q_size", "kv_size",
        "intermediate") or a sum of named sizes, each optionally times an integer, as an HF
        Linear that is already fused needs ("q_size+2*kv_size", "2*intermediate")."""
        total = 0
        for term in expr.replace(" ", "").split("+"):
            count, _, name = term.rpartition("*")
            if name not in _SIZE_NAMES:
                raise ValueError(f"unknown size {name!r} in {expr!r}; known: {_SIZE_NAMES}")
            total += int(count or 1) * int(getattr(self, name))
        return total


_SIZE_NAMES = (
    "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "q_size", "kv_size",
)  # fmt: skip


@dataclass(frozen=True)
class Bias:
    """Whether a Linear has a bias: always, or when a config flag says so (default: never)."""

    always: bool = False
    config_key: str | None = None

    def applies(self, config: Any) -> bool:
        if self.always:
            return True
        return self.config_key is not None and bool(config_get(config, self.config_key, False))


NO_BIAS = Bias()


@dataclass(frozen=True)
class LinearSpec:
    """One Linear of a decoder layer: its name relative to the layer ("self_attn.q_proj"), its
    [out, in] sizes by Dims name, and its bias rule."""

    name: str
    out_dim: str
    in_dim: str
    bias: Bias = NO_BIAS
    # An HF Linear that is already fused may be stored by other writers as separate Linears
    # whose outputs, concatenated in this order, are this one's (GPTQModel unfuses Phi-3's
    # gate_up_proj into gate_proj and up_proj). The loader accepts either layout.
    parts: tuple[LinearSpec, ...] = ()

    def shape(self, dims: Dims) -> tuple[int, int]:
        """(out_features, in_features)."""
        return dims.size(self.out_dim), dims.size(self.in_dim)

    def split_sizes(self, dims: Dims) -> tuple[int, ...]:
        """The out_features of each part (ValueError when they do not add up to this Linear's)."""
        sizes = tuple(dims.size(part.out_dim) for part in self.parts)
        if sum(sizes) != dims.size(self.out_dim):
            raise ValueError(f"parts of {self.name} have {sizes} rows, not {self.out_dim}")
        return sizes


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read one input: quantized together (one Hessian) and fused at serve time
    (their outputs concatenated, in this order). `name` is the fusion's name ("qkv")."""

    name: str
    linears: tuple[LinearSpec, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(lin.name for lin in self.linears)


@dataclass(frozen=True)
class QKNorm:
    """Per-head RMSNorm of q and k (weights of head_dim), after the projection, before RoPE."""

    q_name: str = "self_attn.q_norm"
    k_name: str = "self_attn.k_norm"


NormForm = Literal["weight", "one_plus_weight"]


@dataclass(frozen=True)
class Norms:
    """A decoder layer's RMSNorms (tensor names relative to the layer) and their form.

    Llama: x + attn(norm(x)), then + mlp(norm(.)). Gemma also norms each sub-block's output
    before its residual add ("sandwich" norms: attention_out and mlp_out). form "weight" is
    norm(x) * w (Llama); "one_plus_weight" is norm(x) * (1 + w) computed in fp32 (Gemma), for
    every RMSNorm of the family (layers, q/k norms, final norm)."""

    attention_in: str = "input_layernorm.weight"
    mlp_in: str = "post_attention_layernorm.weight"
    attention_out: str | None = None
    mlp_out: str | None = None
    form: NormForm = "weight"

    @property
    def names(self) -> tuple[str, ...]:
        found = (self.attention_in, self.attention_out, self.mlp_in, self.mlp_out)
        return tuple(n for n in found if n is not None)


@dataclass(frozen=True)
class Attention:
    """How attention scores are formed, where a family departs from softmax(q k / sqrt(D)).

    query_scale_key: scores are scaled by config[key] ** -0.5 instead of head_dim ** -0.5
    (Gemma's query_pre_attn_scalar). softcap_key: when config[key] is set, scores become
    cap * tanh(scores / cap) before the mask and softmax (Gemma 2's attn_logit_softcapping)."""

    query_scale_key: str | None = None
    query_scale_default: float | None = None  # transformers' default when config.json omits it
    softcap_key: str | None = None

    def scale(self, config: Any, head_dim: int) -> float:
        if self.query_scale_key is None:
            return head_dim**-0.5
        default = self.query_scale_default or head_dim
        return float(config_get(config, self.query_scale_key, default)) ** -0.5

    def softcap(self, config: Any) -> float | None:
        if self.softcap_key is None:
            return None
        value = config_get(config, self.softcap_key)
        return None if value is None else float(value)


@dataclass(frozen=True)
class LocalRope:
    """Sliding-window layers rotate with their own rope (Gemma 3): config.json's
    rope_parameters[layer_type] (transformers >= 5), or else theta from `theta_key`."""

    layer_type: str = "sliding_attention"
    global_layer_type: str = "full_attention"
    theta_key: str = "rope_local_base_freq"
    theta_default: float = 10000.0


# How a checkpoint names the decoder Linears: "hf" as transformers' modules do (what its GPTQ
# loading needs), "gptqmodel" as GPTQModel saves them (FamilySpec.gptqmodel_unfused).
CheckpointLayout = Literal["hf", "gptqmodel"]
CHECKPOINT_LAYOUTS: tuple[str, ...] = ("hf", "gptqmodel")

SlidingWindowRule = Literal["none", "every_layer", "qwen", "alternating"]


@dataclass(frozen=True)
class SlidingWindow:
    """Which layers attend within `sliding_window` tokens.

    none: no layer (the field is ignored); every_layer: all of them (Mistral, Phi-3); qwen: only
    when `use_sliding_window` is set, then the layers `layer_types` marks "sliding_attention", or
    without layer_types those from `max_window_layers` on (Qwen2, Qwen3); alternating: the layers
    `layer_types` marks "sliding_attention", or without layer_types all but every n-th layer,
    n = config[pattern_key] or default_pattern (Gemma 2: every 2nd layer is global, Gemma 3:
    every 6th).
    """

    rule: SlidingWindowRule = "none"
    pattern_key: str | None = None
    default_pattern: int = 2

    def windows(self, config: Any, num_layers: int, where: str) -> tuple[int | None, ...]:
        """The window of each layer (None: full attention); ValueError names a bad field."""
        window = config_get(config, "sliding_window")
        if self.rule == "none" or (
            self.rule == "qwen" and not config_get(config, "use_sliding_window", False)
        ):
            window = None
        if window is None:
            return (None,) * num_layers
        if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
            raise ValueError(
                f"{where}: sliding_window must be a positive integer or null, got {window!r}"
            )
        if self.rule == "every_layer":
            return (window,) * num_layers
        layer_types = config_get(config, "layer_types")
        if layer_types is None and self.rule == "alternating":
            pattern = self.default_pattern
            if self.pattern_key is not None:
                pattern = config_get(config, self.pattern_key, pattern)
            if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern <= 0:
                raise ValueError(f"{where}: {self.pattern_key} must be a positive integer")
            return tuple(window if (i + 1) % pattern else None for i in range(num_layers))
        if layer_types is None:
            first = config_get(config, "max_window_layers", num_layers)
            return tuple(window if i >= first else None for i in range(num_layers))
        if len(layer_types) != num_layers:
            raise ValueError(
                f"{where}: layer_types has {len(layer_types)} entries for {num_layers} layers"
            )
        return tuple(window if t == "sliding_attention" else None for t in layer_types)

    def limit(self, config: Any, num_layers: int) -> int | None:
        """The narrowest window of any layer: calibration windows must not exceed it."""
        windows = [w for w in self.windows(config, num_layers, "config") if w is not None]
        return min(windows) if windows else None


@dataclass(frozen=True)
class FamilySpec:
    """Everything the quantizer and the runner need to know about one model family."""

    name: str  # shown to people: "Qwen3"
    model_types: tuple[str, ...]  # config.json model_type values; the first is canonical
    architectures: tuple[str, ...]  # config.json architectures; the first is canonical
    # transformers' implementation, whose modules the quantizer runs (import path, class prefix).
    transformers_module: str
    class_prefix: str
    # The decoder layer's Linears in true-sequential order, grouped by shared input.
    attention_in: LinearGroup
    attention_out: LinearGroup
    mlp_in: LinearGroup
    mlp_out: LinearGroup
    # Tensor names (layer norms relative to the layer).
    layers_prefix: str = "model.layers"
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head"
    norms: Norms = Norms()
    # The gated MLP's act(gate) * up: transformers' activation name, read from config[key].
    activation: str = "silu"
    activation_key: str = "hidden_act"
    qk_norm: QKNorm | None = None
    attention: Attention = Attention()
    sliding_window: SlidingWindow = SlidingWindow()
    # Embeddings times sqrt(hidden_size) (rounded to the activation dtype), as Gemma does.
    embed_scale: Literal["none", "sqrt_hidden"] = "none"
    # When config[key] is set, logits become cap * tanh(logits / cap) (Gemma 2; Gemma 3 if set).
    final_softcap_key: str | None = None
    rope_types: tuple[str, ...] = ("default", "linear", "llama3")
    rope_theta_default: float = 10000.0
    local_rope: LocalRope | None = None
    # Config flags the family's code paths do not implement: refused when true.
    refused_flags: tuple[str, ...] = ()
    # The fused Linears (by name) that GPTQModel saves as their `parts`: the checkpoint layout
    # "gptqmodel" (quantize.format.convert_layout) splits these, "hf" (the default) keeps HF's.
    gptqmodel_unfused: tuple[str, ...] = ()

    @property
    def groups(self) -> tuple[LinearGroup, ...]:
        return (self.attention_in, self.attention_out, self.mlp_in, self.mlp_out)

    @property
    def linears(self) -> tuple[LinearSpec, ...]:
        return tuple(lin for group in self.groups for lin in group.linears)

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(lin.name for lin in self.linears)

    def linear(self, name: str) -> LinearSpec:
        for lin in self.linears:
            if lin.name == name:
                return lin
        raise KeyError(f"{self.name} has no Linear {name!r}")

    def layout_splits(self, layout: CheckpointLayout) -> tuple[LinearSpec, ...]:
        """The fused Linears a checkpoint of `layout` stores as their parts."""
        if layout not in CHECKPOINT_LAYOUTS:
            raise ValueError(f"layout must be one of {CHECKPOINT_LAYOUTS}, got {layout!r}")
        names = self.gptqmodel_unfused if layout == "gptqmodel" else ()
        return tuple(self.linear(name) for name in names)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}."

    def linear_shapes(self, config: Any) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each Linear of one decoder layer."""
        dims = Dims.from_config(config)
        return {lin.name: lin.shape(dims) for lin in self.linears}

    def unquantized_layer_tensors(self) -> tuple[str, ...]:
        """Layer tensors (relative names) other than Linears: norms, kept in float."""
        names = list(self.norms.names)
        if self.qk_norm is not None:
            names += [f"{self.qk_norm.q_name}.weight", f"{self.qk_norm.k_name}.weight"]
        return tuple(names)

    def check_features(self, config: Any, where: str) -> None:
        """ValueError naming the field and its value when the config turns on something this
        family's code does not implement."""
        for flag in self.refused_flags:
            value = config_get(config, flag)
            if value:
                raise ValueError(f"{where}: {flag} {value!r} is not supported for {self.name}")

    def embedding_scale(self, config: Any) -> float | None:
        """The factor the embeddings are multiplied by (None: none)."""
        if self.embed_scale == "none":
            return None
        return float(config_get(config, "hidden_size")) ** 0.5

    def final_softcap(self, config: Any) -> float | None:
        if self.final_softcap_key is None:
            return None
        value = config_get(config, self.final_softcap_key)
        return None if value is None else float(value)
