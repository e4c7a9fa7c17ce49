"""Helpers for the model/kernel tests: tiny random HF models and GPTQ checkpoints made from them.

The GPTQ writer here is a deliberately plain round-to-nearest quantizer that packs through
`native.pack_qweight` / `native.pack_qzeros` (the project's real packer), so the runner's loader is
checked against the packing the quantizer writes, not against the loader's own torch unpacking.
It also returns the dequantized weights, from which a transformers reference model is built.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 128,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}

LINEAR_SUFFIXES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "self_attn.qkv_proj",  # Phi-3 ships q|k|v and gate|up already fused
    "mlp.gate_up_proj",
)


def write_tiny_model(out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A random-weight transformers model (fp32 safetensors) of TINY_LLAMA's shape + overrides."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**TINY_LLAMA, **overrides}
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-zero logits; widen the norms so layers actually matter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(out_dir)
    return out_dir


def load_reference(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int, *, sym: bool, act_order: bool, seed: int = 0
) -> dict[str, torch.Tensor]:
    """GPTQ tensors of one Linear (weight [out, in]) by round-to-nearest, + 'dequantized' [out, in].

    act_order=True permutes the input channels (random order) before grouping, as GPTQ's desc_act
    does, and writes the matching g_idx.
    """
    import native

    out_features, in_features = weight.shape
    gs = group_size if group_size > 0 else in_features
    maxq = 2**bits - 1
    order = torch.arange(in_features)
    if act_order:
        order = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_features) // gs).to(torch.int32)
    groups = -(-in_features // gs)
    w = weight.double()
    scales = torch.empty(groups, out_features, dtype=torch.float64)
    zeros = torch.empty(groups, out_features, dtype=torch.int64)
    for g in range(groups):
        cols = w[:, g_idx == g]
        low, high = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
        if sym:
            scale = torch.maximum(-low, high) * 2 / maxq
            zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int64)
        else:
            scale = (high - low) / maxq
            # v1 cannot store a zero point of 0: keep it in [1, maxq].
            zero = torch.round(-low / scale.clamp(min=1e-12)).clamp(1, maxq).to(torch.int64)
        scales[g] = scale.clamp(min=1e-8)
        zeros[g] = zero
    scales16 = scales.half()
    s, z = scales16.double()[g_idx.long()].t(), zeros[g_idx.long()].t()  # [out, in]
    q = torch.clamp(torch.round(w / s) + z, 0, maxq).to(torch.int64)
    dequantized = (q - z).double() * s
    qweight = native.pack_qweight(np.ascontiguousarray(q.t().numpy().astype(np.uint8)), bits)
    return {
        "qweight": torch.from_numpy(qweight),
        "qzeros": _pack_zeros(zeros, bits),
        "zeros": zeros,
        "scales": scales16,
        "g_idx": g_idx,
        "dequantized": dequantized,
    }


def write_gptq_checkpoint(
    hf_dir: Path,
    out_dir: Path,
    *,
    bits: int = 4,
    group_size: int = 32,
    sym: bool = False,
    act_order: bool = False,
    shards: int = 1,
    checkpoint_format: str = "gptq",
) -> Path:
    """Quantize every decoder Linear of `hf_dir` into an AutoGPTQ-format checkpoint at `out_dir`,
    and write `out_dir/reference/` (an HF dir with the dequantized weights) beside it."""
    state = load_file(str(hf_dir / "model.safetensors"))
    # Linears reading the same input share GPTQ's act-order permutation (it comes from that input's
    # Hessian), which is what lets the runner fuse q/k/v and gate/up.
    input_of = {
        "q_proj": 0,
        "k_proj": 0,
        "v_proj": 0,
        "o_proj": 1,
        "gate_proj": 2,
        "up_proj": 2,
        "down_proj": 3,
        "qkv_proj": 0,
        "gate_up_proj": 2,
    }
    quantized: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix.endswith(LINEAR_SUFFIXES):
            layer_index = int(prefix.split(".")[2])
            seed = layer_index * 10 + input_of[prefix.rsplit(".", 1)[1]]
            parts = rtn_quantize(tensor, bits, group_size, sym=sym, act_order=act_order, seed=seed)
            for key in ("qweight", "qzeros", "scales", "g_idx"):
                quantized[f"{prefix}.{key}"] = parts[key]
            if checkpoint_format == "gptq_v2":
                # v2 stores the zero point itself; native's packer stores its argument minus one.
                quantized[f"{prefix}.qzeros"] = _pack_zeros(parts["zeros"] + 1, bits)
            dequantized[name] = parts["dequantized"].float()
        else:
            quantized[name] = tensor.half() if tensor.is_floating_point() else tensor
            dequantized[name] = quantized[name].float()  # the reference sees the fp16 rounding too
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_sharded(quantized, out_dir, shards)
    config = json.loads((hf_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": act_order,
        "sym": sym,
        "checkpoint_format": checkpoint_format,
    }
    (out_dir / "config.json").write_text(json.dumps(config))
    reference = out_dir / "reference"
    reference.mkdir(exist_ok=True)
    save_file(dequantized, str(reference / "model.safetensors"))
    shutil.copy(hf_dir / "config.json", reference / "config.json")
    return out_dir


def _pack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    import native

    return torch.from_numpy(
        native.pack_qzeros(np.ascontiguousarray(zeros.numpy().astype(np.uint8)), bits)
    )


def _save_sharded(tensors: dict[str, torch.Tensor], out_dir: Path, shards: int) -> None:
    if shards == 1:
        save_file(tensors, str(out_dir / "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for index in range(shards):
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name].contiguous() for name in names[index::shards]}
        save_file(part, str(out_dir / file))
        weight_map.update(dict.fromkeys(part, file))
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
