"""GPTQ checkpoints (AutoGPTQ v1 and GPTQModel v2 zeros, act-order or not, sym or not, sharded or
not, 2/3/4/8 bits) load and compute what their dequantized weights compute in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_model import load_reference, write_gptq_checkpoint, write_tiny_model
from safetensors.torch import load_file, save_file
from test_family_gemma import FAMILIES as GEMMA

from gateway.kernels import QuantLinear
from gateway.model.slots import SlotRunner
from quantize.errors import UserInputError

# (bits, group_size, sym, act_order, shards, checkpoint_format)
CASES = {
    "w4-g32-asym": (4, 32, False, False, 1, "gptq"),
    "w4-g64-sym-actorder-sharded": (4, 64, True, True, 3, "gptq"),
    "w4-g48-actorder": (4, 48, False, True, 1, "gptq"),  # 48 divides neither 128 nor 192
    "w4-g32-v2": (4, 32, False, False, 1, "gptq_v2"),
    "w8-g32-actorder": (8, 32, False, True, 1, "gptq"),
    "w3-g64": (3, 64, False, False, 1, "gptq"),
    "w2-per-channel-sym": (2, -1, True, False, 1, "gptq"),
}


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(
        tmp_path_factory.mktemp("hf"), tie_word_embeddings=True, attention_bias=True
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_gptq_checkpoint_matches_dequantized_reference(
    case: str, tiny_hf: Path, tmp_path: Path
) -> None:
    bits, group_size, sym, act_order, shards, fmt = CASES[case]
    ckpt = write_gptq_checkpoint(
        tiny_hf,
        tmp_path / case,
        bits=bits,
        group_size=group_size,
        sym=sym,
        act_order=act_order,
        shards=shards,
        checkpoint_format=fmt,
    )
    reference = load_reference(ckpt / "reference")
    runner = SlotRunner.load(ckpt, num_slots=2, max_model_len=32)
    ids = torch.randint(
        0, runner.spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(runner.forward_logits(ids), expected, rtol=1e-4, atol=1e-4)

    layer = runner.weights.layers[0]
    assert layer.qkv.is_fused and layer.gate_up.is_fused  # shared act-order permutations fuse
    assert isinstance(layer.down_proj, QuantLinear)
    assert (layer.down_proj.perm is not None) == act_order
    assert runner.spec.quantization == {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": act_order,
        "sym": sym,
        "checkpoint_format": fmt,
        # This fixture's quantize_config.json does not record how it was quantized.
        "damp_percent": None,
        "true_sequential": None,
        "static_groups": None,
    }


@pytest.mark.parametrize("kernel", ["torch", "torch_dequant", "torch_int4"])
def test_every_cpu_kernel_gives_the_same_logits(kernel: str, tiny_hf: Path, tmp_path: Path) -> None:
    ckpt = write_gptq_checkpoint(tiny_hf, tmp_path / "w4", bits=4, group_size=64, act_order=True)
    reference = load_reference(ckpt / "reference")
    runner = SlotRunner.load(ckpt, num_slots=1, max_model_len=32, kernel=kernel)
    assert runner.spec.kernels == (kernel,)
    ids = torch.arange(12)[None] * 11
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(runner.forward_logits(ids), expected, rtol=1e-4, atol=1e-4)
    logits = runner.prefill(0, ids[0, :8].tolist())
    torch.testing.assert_close(logits, expected[0, 7], rtol=1e-4, atol=1e-4)


# GPTQModel writes the Hugging Face module names of each family, v2 zero points, act-order and
# shards, except that it unfuses Phi-3's gate_up_proj (GPTQModel 7.7: gptqmodel/models/definitions/
# phi3.py's module_tree lists mlp.gate_proj and mlp.up_proj, which defuser's Phi3MLP patch splits
# from gate_up_proj's first and second halves) while keeping qkv_proj fused. Such a checkpoint of
# every family computes what transformers computes on its weights dequantized; so do Phi-3 with
# HF's fused names (ours, transformers') and with q/k/v split as well.
PHI3 = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "pad_token_id": 0}
GPTQMODEL_FAMILIES = {
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 32},
    "phi3": PHI3,
    "phi3-hf-fused": PHI3,
    "phi3-all-split": PHI3,
    "gemma2": GEMMA["gemma2"],
    "gemma3_text": GEMMA["gemma3_text"],
}
# The fused HF Linears each case stores as their parts (rows in order: sizes as fractions).
UNFUSED = {
    "phi3": {"mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")},
    "phi3-all-split": {
        "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
        "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    },
}


def unfuse(ckpt: Path, split: dict[str, tuple[str, ...]], sizes: dict[str, list[int]]) -> None:
    """Store each fused Linear of `split` as its parts, as GPTQModel's defused modules save them:
    qweight, scales and qzeros cut along their output columns (qzeros packed 8 per int32 at 4
    bits), g_idx shared."""
    files = sorted(ckpt.glob("*.safetensors"))
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    for file in files:
        tensors = load_file(str(file))
        for name in list(tensors):
            prefix, _, suffix = name.rpartition(".")
            linear = next((lin for lin in split if prefix.endswith(f".{lin}")), None)
            if linear is None:
                continue
            layer = prefix.removesuffix(f".{linear}")
            value = tensors.pop(name)
            rows = sizes[linear]
            if suffix == "g_idx":
                pieces = [value.clone() for _ in rows]
            else:
                total = sum(rows)
                width = value.shape[1]
                pieces = value.split([r * width // total for r in rows], dim=1)
            for part, piece in zip(split[linear], pieces, strict=True):
                key = f"{layer}.{part}.{suffix}"
                tensors[key] = piece.contiguous()
                if index is not None:
                    index["weight_map"][key] = file.name
            if index is not None:
                del index["weight_map"][name]
        save_file(tensors, str(file))
    if index is not None:
        index_file.write_text(json.dumps(index))


@pytest.mark.parametrize("family", sorted(GPTQMODEL_FAMILIES))
def test_gptqmodel_checkpoints_of_each_family_load(family: str, tmp_path: Path) -> None:
    hf = write_tiny_model(tmp_path / "hf", num_hidden_layers=3, **GPTQMODEL_FAMILIES[family])
    ckpt = write_gptq_checkpoint(
        hf, tmp_path / "ckpt", act_order=True, shards=2, checkpoint_format="gptq_v2"
    )
    if family in UNFUSED:
        # TINY_LLAMA: q 4 heads, k and v 2 heads of 32; gate and up 192 rows each.
        unfuse(
            ckpt,
            UNFUSED[family],
            {"mlp.gate_up_proj": [192, 192], "self_attn.qkv_proj": [128, 64, 64]},
        )
    keys = set()
    for file in ckpt.glob("*.safetensors"):
        keys |= set(load_file(str(file)))
    if family.startswith("phi3"):
        split_mlp = family != "phi3-hf-fused"
        assert ("model.layers.0.mlp.gate_proj.qweight" in keys) == split_mlp
        assert ("model.layers.0.mlp.gate_up_proj.qweight" in keys) != split_mlp
        split_qkv = family == "phi3-all-split"
        assert ("model.layers.0.self_attn.qkv_proj.qweight" in keys) != split_qkv
    reference = load_reference(ckpt / "reference")
    runner = SlotRunner.load(ckpt, num_slots=2, max_model_len=40)
    ids = torch.randint(
        0, runner.spec.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(runner.forward_logits(ids), expected, rtol=1e-4, atol=1e-4)
    assert runner.spec.model_type == family.split("-")[0]
    assert runner.spec.quantization["checkpoint_format"] == "gptq_v2"
    layer = runner.weights.layers[0]
    assert layer.qkv.is_fused and layer.gate_up.is_fused  # split parts fuse again at load


def test_phi3_missing_both_layouts_names_the_fused_linear_and_its_parts(tmp_path: Path) -> None:
    hf = write_tiny_model(tmp_path / "hf", **PHI3)
    ckpt = write_gptq_checkpoint(hf, tmp_path / "ckpt")
    state = load_file(str(ckpt / "model.safetensors"))
    for suffix in ("qweight", "qzeros", "scales", "g_idx"):
        del state[f"model.layers.1.mlp.gate_up_proj.{suffix}"]
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(
        UserInputError, match=r"gate_up_proj.*nor its unfused parts.*mlp\.gate_proj"
    ):
        SlotRunner.load(ckpt, num_slots=1, max_model_len=16)


def test_phi3_with_one_part_missing_names_it(tmp_path: Path) -> None:
    hf = write_tiny_model(tmp_path / "hf", **PHI3)
    ckpt = write_gptq_checkpoint(hf, tmp_path / "ckpt")
    unfuse(ckpt, UNFUSED["phi3"], {"mlp.gate_up_proj": [192, 192]})
    state = load_file(str(ckpt / "model.safetensors"))
    del state["model.layers.0.mlp.up_proj.qweight"]
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(UserInputError, match=r"missing tensor 'model\.layers\.0\.mlp\.up_proj"):
        SlotRunner.load(ckpt, num_slots=1, max_model_len=16)
