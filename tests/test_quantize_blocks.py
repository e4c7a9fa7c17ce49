"""The quantizer's own sub-block execution against transformers' decoder layers."""

from __future__ import annotations

import pytest
import torch
from fixtures_family import assert_layer_matches_transformers

from quantize.arch import resolve_architecture
from quantize.blocks import HessianAccumulator
from quantize.errors import UnsupportedArchitectureError

TINY = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 1,
    "vocab_size": 128,
    "max_position_embeddings": 128,
}


def tiny_config(model_type: str, **extra):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **TINY, **extra)


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                }
            },
        ),
        ("mistral", {}),
        ("qwen2", {}),  # q/k/v carry biases
    ],
)
def test_sub_blocks_compose_to_the_transformers_layer(model_type: str, extra: dict) -> None:
    config = tiny_config(model_type, **extra)
    config._attn_implementation = "eager"
    arch = resolve_architecture(config)
    torch.manual_seed(0)
    reference = arch.decoder_layer_cls(config, 0).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.2)
    layer = assert_layer_matches_transformers(arch, config, reference)
    if model_type == "qwen2":
        assert layer.self_attn.q_proj.bias is not None


def test_unknown_architecture_is_named() -> None:
    config = tiny_config("gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'"):
        resolve_architecture(config)


def test_hessian_is_two_x_xt_over_n() -> None:
    acc = HessianAccumulator(1100, torch.device("cpu"))  # wide: blocked upper triangle
    chunks = [torch.randn(2, 50, 1100), torch.randn(1, 30, 1100)]
    for c in chunks:
        acc.add(c)
    x = torch.cat([c.reshape(-1, 1100) for c in chunks]).double()
    torch.testing.assert_close(acc.hessian().double(), 2 * x.t() @ x / 130, rtol=1e-5, atol=1e-5)
