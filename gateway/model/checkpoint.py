"""Load a checkpoint's weights for the Llama-block runner: GPTQ (ours, AutoGPTQ, GPTQModel) or
unquantized; names, shapes and norm forms come from the family's spec (quantize/archspec).

Tensor names follow Hugging Face (`model.layers.{i}.self_attn.q_proj...`), or, for an HF Linear
that is already fused, the parts the spec declares for it (GPTQModel's Phi-3 `mlp.gate_proj` and
`mlp.up_proj` for `mlp.gate_up_proj`); a GPTQ Linear is
`<prefix>.{qweight,qzeros,scales,g_idx}` (+ `.bias`), anything else `<prefix>.weight`. Each Linear
is loaded as whichever form the checkpoint holds, so a GPTQ checkpoint with an unquantized lm_head,
or a quantized one (GPTQModel `lm_head=True`), both load. Every shape is checked against config.json
before use, and an error names the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gateway.kernels import QuantLinear
from gateway.model.config import ModelConfig
from gateway.model.layers import DenseLinear, FusedProjection, Linear, norm_weight
from gateway.model.tensor_source import TensorSource
from quantize.archspec import Dims, LinearSpec
from quantize.archspec.families import LLAMA
from quantize.errors import UserInputError
from quantize.format import LINEAR_SUFFIXES

# The GPTQ suffixes are the checkpoint contract's; tensor names come from the family's spec
# (quantize/archspec). These are the Llama block's, which every supported family uses.
GPTQ_SUFFIXES = LINEAR_SUFFIXES
EMBED = LLAMA.embed
FINAL_NORM = LLAMA.final_norm
LM_HEAD = LLAMA.lm_head


@dataclass
class DecoderLayerWeights:
    # RMSNorm weights as rms_norm takes them (layers.norm_weight: w, or Gemma's 1 + w in fp32).
    input_norm: torch.Tensor
    mlp_norm: torch.Tensor  # before gate/up (Llama's post_attention_layernorm)
    qkv: FusedProjection
    o_proj: Linear
    gate_up: FusedProjection
    down_proj: Linear
    q_norm: torch.Tensor | None = None  # [head_dim], per-head q and k RMSNorm (Qwen3, Gemma 3)
    k_norm: torch.Tensor | None = None
    attention_out_norm: torch.Tensor | None = None  # Gemma: on o_proj's output, before the add
    mlp_out_norm: torch.Tensor | None = None  # Gemma: on down_proj's output, before the add

    def norms(self) -> list[torch.Tensor]:
        found = [self.input_norm, self.mlp_norm, self.q_norm, self.k_norm]
        found += [self.attention_out_norm, self.mlp_out_norm]
        return [t for t in found if t is not None]


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[DecoderLayerWeights]
    final_norm: torch.Tensor
    lm_head: Linear  # shares `embed` when the embeddings are tied

    @property
    def nbytes(self) -> int:
        total = _tensor_bytes(self.embed) + _tensor_bytes(self.final_norm)
        for layer in self.layers:
            total += sum(_tensor_bytes(norm) for norm in layer.norms())
            for linear in (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj):
                total += linear.weight_bytes
        if not (isinstance(self.lm_head, DenseLinear) and self.lm_head.weight is self.embed):
            total += self.lm_head.weight_bytes
        return total


class WeightLoader:
    def __init__(
        self,
        source: TensorSource,
        config: ModelConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        kernel: str,
    ) -> None:
        self.source = source
        self.config = config
        self.device = device
        self.dtype = dtype
        self.kernel = kernel
        self.keys = set(source.keys())

    # ---- tensors ------------------------------------------------------------------------------

    def tensor(
        self, name: str, shape: tuple[int, ...], *, float_weight: bool = True
    ) -> torch.Tensor:
        if name not in self.keys:
            raise UserInputError(
                f"checkpoint is missing tensor {name!r} (expected shape {list(shape)})"
            )
        found = self.source.shape(name)
        if tuple(found) != tuple(shape):
            raise UserInputError(f"tensor {name!r} has shape {list(found)}, expected {list(shape)}")
        value = self.source.get(name)
        if float_weight:
            if not value.is_floating_point():
                raise UserInputError(
                    f"tensor {name!r} has dtype {value.dtype}, expected a float type"
                )
            value = value.to(self.dtype)
        return value.to(self.device)

    # ---- linears ------------------------------------------------------------------------------

    def linear(self, prefix: str, in_features: int, out_features: int, *, bias: bool) -> Linear:
        bias_name = f"{prefix}.bias"
        if f"{prefix}.qweight" in self.keys:
            quant = self.config.quant
            if quant is None:
                raise UserInputError(
                    f"tensor {prefix + '.qweight'!r} is GPTQ-packed but config.json has no "
                    "quantization_config (and there is no quantize_config.json)"
                )
            parts = {}
            for suffix in GPTQ_SUFFIXES:
                name = f"{prefix}.{suffix}"
                if suffix == "g_idx" and name not in self.keys:
                    parts[suffix] = None  # some exporters omit g_idx when desc_act is false
                    continue
                if name not in self.keys:
                    raise UserInputError(f"checkpoint is missing tensor {name!r}")
                parts[suffix] = self.source.get(name).to(self.device)
            layer_bias = (
                self.tensor(bias_name, (out_features,)) if bias else self.raw_bias(bias_name)
            )
            layer = QuantLinear.from_gptq(
                prefix,
                qweight=parts["qweight"],
                qzeros=parts["qzeros"],
                scales=parts["scales"],
                g_idx=parts["g_idx"],
                bias=layer_bias,
                bits=quant.bits,
                group_size=quant.group_size,
                checkpoint_format=quant.checkpoint_format,
                dtype=self.dtype,
                kernel=self.kernel,
            )
            if (layer.in_features, layer.out_features) != (in_features, out_features):
                raise UserInputError(
                    f"tensor {prefix + '.qweight'!r} holds a [{layer.in_features} -> "
                    f"{layer.out_features}] Linear, expected [{in_features} -> {out_features}] "
                    "from config.json"
                )
            return layer
        if f"{prefix}.weight" not in self.keys:
            self.missing_linear(prefix, (out_features, in_features))
        weight = self.tensor(f"{prefix}.weight", (out_features, in_features))
        layer_bias = self.tensor(bias_name, (out_features,)) if bias else self.raw_bias(bias_name)
        return DenseLinear(weight, layer_bias)

    def stored(self, prefix: str) -> bool:
        """Whether the checkpoint holds a Linear `prefix` in either form."""
        return any(f"{prefix}.{s}" in self.keys for s in (*GPTQ_SUFFIXES, "weight"))

    def spec_linear(
        self, layer_prefix: str, lin: LinearSpec, dims: Dims, *, bias: bool
    ) -> list[Linear]:
        """The spec's Linear as stored: itself, or (when the spec declares `parts` and the
        checkpoint holds those instead, as GPTQModel's unfused Phi-3 gate_proj/up_proj) its
        parts, whose outputs concatenate to its output."""
        prefix = layer_prefix + lin.name
        if lin.parts and not self.stored(prefix):
            parts = [layer_prefix + part.name for part in lin.parts]
            if any(self.stored(name) for name in parts):
                return [
                    self.linear(name, *reversed(part.shape(dims)), bias=bias)
                    for name, part in zip(parts, lin.parts, strict=True)
                ]
        try:
            return [self.linear(prefix, *reversed(lin.shape(dims)), bias=bias)]
        except UserInputError as exc:
            if not lin.parts or self.stored(prefix):
                raise
            names = ", ".join(repr(layer_prefix + part.name) for part in lin.parts)
            raise UserInputError(f"{exc} (nor its unfused parts {names})") from None

    def missing_linear(self, prefix: str, shape: tuple[int, int]) -> None:
        """Neither `.qweight` nor `.weight` is there: name the one the checkpoint's other tensors
        point to. GPTQ parts without their qweight mean the qweight is missing, not a dense
        weight (which a quantized checkpoint never had)."""
        others = [s for s in GPTQ_SUFFIXES if s != "qweight" and f"{prefix}.{s}" in self.keys]
        if others:
            raise UserInputError(
                f"checkpoint is missing tensor {prefix + '.qweight'!r} (its GPTQ siblings "
                f"{', '.join(others)} are there)"
            )
        alternative = " or a GPTQ .qweight" if self.config.quant is not None else ""
        raise UserInputError(
            f"checkpoint is missing tensor {prefix + '.weight'!r} (expected shape "
            f"{list(shape)}){alternative} for Linear {prefix!r}"
        )

    def norm(self, name: str, size: int) -> torch.Tensor:
        """An RMSNorm weight in the form the runner multiplies by (the family's norm form)."""
        return norm_weight(self.tensor(name, (size,)), self.config.family.norms.form)

    def raw_bias(self, name: str) -> torch.Tensor | None:
        """A bias the config does not announce but the checkpoint carries is used, not dropped."""
        if name not in self.keys:
            return None
        return self.tensor(name, (self.source.shape(name)[0],))

    # ---- the model ----------------------------------------------------------------------------

    def load(self) -> ModelWeights:
        """The weights, once the checkpoint's checksums (checked meanwhile) have passed."""
        try:
            weights = self._load_weights()
        except UserInputError:
            self.source.verified()  # damaged bytes explain any error they caused: report those
            raise
        self.source.verified()
        return weights

    def _load_weights(self) -> ModelWeights:
        cfg = self.config
        family = cfg.family
        dims = Dims.from_config(_dims_source(cfg))
        bias = {
            family.attention_in.name: cfg.qkv_bias,
            family.attention_out.name: cfg.o_bias,
            family.mlp_in.name: cfg.mlp_bias,
            family.mlp_out.name: cfg.mlp_bias,
        }
        hidden = cfg.hidden_size
        embed = self.tensor(family.embed, (cfg.vocab_size, hidden))
        layers = []
        for i in range(cfg.num_layers):
            prefix = family.layer_prefix(i)

            def group(g, prefix=prefix):
                return [
                    part
                    for lin in g.linears
                    for part in self.spec_linear(prefix, lin, dims, bias=bias[g.name])
                ]

            qkv, (o_proj,), gate_up, (down_proj,) = (group(g) for g in family.groups)
            q_norm = k_norm = None
            if family.qk_norm is not None:
                names = (family.qk_norm.q_name, family.qk_norm.k_name)
                q_norm, k_norm = (self.norm(f"{prefix}{n}.weight", cfg.head_dim) for n in names)
            norms = family.norms

            def optional_norm(name: str | None, prefix: str = prefix) -> torch.Tensor | None:
                return None if name is None else self.norm(prefix + name, hidden)

            layers.append(
                DecoderLayerWeights(
                    input_norm=self.norm(prefix + norms.attention_in, hidden),
                    mlp_norm=self.norm(prefix + norms.mlp_in, hidden),
                    qkv=FusedProjection(qkv),
                    o_proj=o_proj,
                    gate_up=FusedProjection(gate_up),
                    down_proj=down_proj,
                    q_norm=q_norm,
                    k_norm=k_norm,
                    attention_out_norm=optional_norm(norms.attention_out),
                    mlp_out_norm=optional_norm(norms.mlp_out),
                )
            )
        final_norm = self.norm(family.final_norm, hidden)
        # Tied: the embedding is the head (as transformers ties them), unless the head is quantized.
        if cfg.tie_word_embeddings and f"{family.lm_head}.qweight" not in self.keys:
            lm_head: Linear = DenseLinear(embed)
        else:
            lm_head = self.linear(family.lm_head, hidden, cfg.vocab_size, bias=False)
        return ModelWeights(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)


def estimate_weight_bytes(source: TensorSource, dtype: torch.dtype) -> int:
    """Bytes the loaded weights take before kernel-specific copies: packed int tensors as stored,
    float tensors converted to the compute dtype."""
    element = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name in source.keys():  # noqa: SIM118 - a TensorSource is not a dict
        stored = source.dtype(name)
        if stored.is_floating_point:
            total += source.nbytes(name) // torch.empty((), dtype=stored).element_size() * element
        else:
            total += source.nbytes(name)
    return total


def checkpoint_dir(path: str | Path) -> Path:
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise UserInputError(f"model path {str(path)!r} is not a directory")
    return model_dir


def _dims_source(cfg: ModelConfig) -> dict[str, int]:
    """The validated config's sizes under config.json's names, for the spec's shape rules."""
    return {
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
    }


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
