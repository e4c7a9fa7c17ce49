"""GPTQ checkpoints (AutoGPTQ v1 and GPTQModel v2 zeros, act-order or not, sym or not, sharded or
not, 2/3/4/8 bits) load and compute what their dequantized weights compute in transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures_model import load_reference, write_gptq_checkpoint, write_tiny_model
from test_family_gemma import FAMILIES as GEMMA

from gateway.kernels import QuantLinear
from gateway.model.slots import SlotRunner

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


# GPTQModel writes the Hugging Face module names of each family (Phi-3's fused qkv_proj and
# gate_up_proj included), v2 zero points, act-order and shards: such a checkpoint of every family
# computes what transformers computes on its weights dequantized.
GPTQMODEL_FAMILIES = {
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 32},
    "phi3": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "pad_token_id": 0},
    "gemma2": GEMMA["gemma2"],
    "gemma3_text": GEMMA["gemma3_text"],
}


@pytest.mark.parametrize("family", sorted(GPTQMODEL_FAMILIES))
def test_gptqmodel_checkpoints_of_each_family_load(family: str, tmp_path: Path) -> None:
    hf = write_tiny_model(tmp_path / "hf", num_hidden_layers=3, **GPTQMODEL_FAMILIES[family])
    ckpt = write_gptq_checkpoint(
        hf, tmp_path / "ckpt", act_order=True, shards=2, checkpoint_format="gptq_v2"
    )
    reference = load_reference(ckpt / "reference")
    runner = SlotRunner.load(ckpt, num_slots=2, max_model_len=40)
    ids = torch.randint(
        0, runner.spec.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(runner.forward_logits(ids), expected, rtol=1e-4, atol=1e-4)
    assert runner.spec.model_type == family
    assert runner.spec.quantization["checkpoint_format"] == "gptq_v2"
