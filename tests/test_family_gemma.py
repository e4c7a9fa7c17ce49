"""Gemma 2 and Gemma 3 (text) end to end.

Tiny random models with every Gemma quirk switched on where the runner can tell: embeddings
scaled by sqrt(hidden), (1 + w) RMSNorms in fp32 (sandwich norms around attention and MLP, Gemma
3's per-head q/k norms), gelu_tanh GLU, query_pre_attn_scalar != head_dim, attention soft-capping
(Gemma 2) and final-logit soft-capping with small caps so they bite, alternating local (16-token
window) and global layers, Gemma 3's local rope theta and linear rope scaling of global layers,
head_dim != hidden / heads, tied embeddings. Each is quantized by the real `gptq-gateway quantize`
and served: the runner's logits, greedy ids and top-1 logprobs over 40 positions match
transformers' own model running the checkpoint's weights dequantized, and so do the engine's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_family import (
    assert_layer_matches_transformers,
    check_engine_matches,
    check_runner_matches,
    dequantized_reference,
    quantize,
    write_config,
)
from fixtures_model import load_reference, write_tiny_model
from test_quantize_cli import write_tiny_model as write_tiny_tokenized_model

from gateway.model.config import load_model_config
from gateway.model.slots import SlotRunner
from quantize.archspec import resolve_family
from quantize.errors import UserInputError

WINDOW = 16
COMMON = {
    "head_dim": 32,  # q_proj is [4 * 32, hidden] whatever hidden is
    "query_pre_attn_scalar": 24,  # scores scaled by 24 ** -0.5, not 32 ** -0.5
    "sliding_window": WINDOW,
    "final_logit_softcapping": 5.0,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}
FAMILIES = {
    "gemma2": {
        **COMMON,
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "attn_logit_softcapping": 2.0,
    },
    "gemma3_text": {
        **COMMON,
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "sliding_window_pattern": 2,  # layers 0 and 2 local, 1 global
        "rope_theta": 50000.0,
        "rope_local_base_freq": 500.0,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    },
}


# ---- the specs -------------------------------------------------------------------------------


def test_gemma_specs() -> None:
    gemma2, gemma3 = (resolve_family({"model_type": t}) for t in ("gemma2", "gemma3_text"))
    for family in (gemma2, gemma3):
        assert family.norms.form == "one_plus_weight" and family.norms.mlp_out is not None
        assert family.activation == "gelu_pytorch_tanh" and family.embed_scale == "sqrt_hidden"
        assert family.attention.scale({"query_pre_attn_scalar": 16}, 32) == 0.25
        assert family.attention.scale({}, 32) == 256**-0.5  # transformers' default
    assert gemma2.attention.softcap({"attn_logit_softcapping": 50.0}) == 50.0
    # transformers' Gemma 3 attention ignores attn_logit_softcapping; so do we.
    assert gemma3.attention.softcap({"attn_logit_softcapping": 50.0}) is None
    assert gemma3.qk_norm is not None and gemma2.qk_norm is None
    # Without layer_types: Gemma 2 alternates, Gemma 3 has every 6th (or the pattern's) global.
    assert gemma2.sliding_window.windows({"sliding_window": 8}, 4, "c") == (8, None, 8, None)
    windows = gemma3.sliding_window.windows
    assert windows({"sliding_window": 8}, 7, "c") == (8, 8, 8, 8, 8, None, 8)
    assert windows({"sliding_window": 8, "sliding_window_pattern": 3}, 3, "c") == (8, 8, None)
    layer_types = ["full_attention", "sliding_attention"]
    assert windows({"sliding_window": 8, "layer_types": layer_types}, 2, "c") == (None, 8)


def test_gemma3_config_resolves_local_and_global_ropes(tmp_path: Path) -> None:
    fields = FAMILIES["gemma3_text"]
    config = load_model_config(write_config(tmp_path, num_hidden_layers=3, **fields))
    assert config.sliding_windows == (WINDOW, None, WINDOW)
    assert config.layer_ropes == (1, 0, 1)
    assert (config.rope.theta, config.rope.rope_type, config.rope.factor) == (5e4, "linear", 2.0)
    assert config.local_rope is not None and config.local_rope.theta == 500.0
    assert config.attention_scale == 24**-0.5 and config.attention_softcap is None
    assert config.final_softcap == 5.0 and config.embed_scale == 8.0  # sqrt(64)
    # transformers >= 5 writes one rope_parameters entry per layer type.
    per_type = {
        "full_attention": {"rope_type": "default", "rope_theta": 7.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 3.0},
    }
    rest = {k: v for k, v in fields.items() if not k.startswith("rope")}
    config = load_model_config(write_config(tmp_path, **rest, rope_parameters=per_type))
    assert (config.rope.theta, config.local_rope.theta) == (7.0, 3.0)


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "fields", "message"),
    [
        (
            "gemma3_text",
            {"use_bidirectional_attention": True},
            r"use_bidirectional_attention True is not supported for Gemma 3",
        ),
        ("gemma2", {"hidden_activation": "gelu"}, r"hidden_activation 'gelu' is not supported"),
        (
            "gemma3_text",
            {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 8.0}}},
            r"rope_parameters\.full_attention\.rope_type 'yarn' is not supported",
        ),
        (
            "gemma2",
            {"attn_logit_softcapping": -1.0},
            r"attn_logit_softcapping must be a positive number or null, got -1\.0",
        ),
    ],
)
def test_unsupported_gemma_features_name_the_field_and_value(
    tmp_path: Path, model_type: str, fields: dict, message: str
) -> None:
    write_config(tmp_path, model_type=model_type, **fields)
    with pytest.raises(UserInputError, match=message):
        load_model_config(tmp_path)


def test_the_quantizer_refuses_bidirectional_gemma3() -> None:
    from transformers import AutoConfig

    from quantize.arch import resolve_architecture

    config = AutoConfig.for_model("gemma3_text", use_bidirectional_attention=True)
    with pytest.raises(UserInputError, match="use_bidirectional_attention True"):
        resolve_architecture(config)


# ---- the quantizer's pieces --------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantizer_sub_blocks_compose_to_the_transformers_gemma_layer(family: str) -> None:
    # Sandwich norms, gelu_tanh, query scale, (Gemma 2) soft-capped scores in calibration.
    from transformers import AutoConfig

    from quantize.arch import resolve_architecture

    fields = {k: v for k, v in FAMILIES[family].items() if k != "architectures"}
    fields["sliding_window"] = 64  # calibration windows never exceed the window
    config = AutoConfig.for_model(
        **fields, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, num_hidden_layers=2, vocab_size=128, max_position_embeddings=128,
    )  # fmt: skip
    config._attn_implementation = "eager"
    arch = resolve_architecture(config)
    torch.manual_seed(0)
    reference = arch.decoder_layer_cls(config, 0).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.uniform_(-0.5, 0.5) if "norm" in name else p.normal_(0, 0.2)
    assert_layer_matches_transformers(arch, config, reference, config.layer_types[0])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantizer_calibrates_on_scaled_embeddings(tmp_path: Path, family: str) -> None:
    from quantize.driver import Quantizer, QuantizeSettings
    from quantize.source import open_model

    model_dir = write_tiny_model(tmp_path, num_hidden_layers=3, **FAMILIES[family])
    quantizer = Quantizer(open_model(str(model_dir)), QuantizeSettings(device="cpu"))
    ids = torch.randint(0, 320, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_reference(model_dir).model.embed_tokens(ids)
    torch.testing.assert_close(quantizer._embed(ids), expected)


# ---- the runner on unquantized weights ---------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_runner_matches_transformers_on_fp32_gemma(tmp_path: Path, family: str) -> None:
    model_dir = write_tiny_model(tmp_path, num_hidden_layers=3, **FAMILIES[family])
    reference = load_reference(model_dir)
    runner = SlotRunner.load(model_dir, num_slots=2, max_model_len=64)
    assert runner.config.sliding_windows == (WINDOW, None, WINDOW)
    ids = torch.randint(
        0, runner.spec.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(runner.forward_logits(ids), expected, rtol=1e-4, atol=1e-4)
    got = runner.prefill(1, ids[0, :20].tolist())  # prefill past the window, then decode
    torch.testing.assert_close(got, expected[0, 19], rtol=1e-4, atol=1e-4)
    for pos in range(20, 30):
        got = runner.decode(torch.tensor([1]), ids[0, pos : pos + 1], torch.tensor([pos]))
        torch.testing.assert_close(got[0], expected[0, pos], rtol=1e-4, atol=1e-4)


# ---- quantize, then serve ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def gemma_checkpoint(request, tmp_path_factory, smollm2_hf_dir: Path) -> Path:
    root = tmp_path_factory.mktemp(request.param)
    fields = {k: v for k, v in FAMILIES[request.param].items() if k != "architectures"}
    model = write_tiny_tokenized_model(root / "model", smollm2_hf_dir, layers=3, **fields)
    out = root / "ckpt"
    quantize(model, out, seqlen=WINDOW, nsamples=8)  # calibration windows fit the window
    return out


@pytest.fixture(scope="module")
def gemma_reference(gemma_checkpoint: Path):
    return dequantized_reference(gemma_checkpoint)


def test_quantized_gemma_checkpoint_layout(gemma_checkpoint: Path) -> None:
    from quantize.format import CheckpointTensors

    tensors = CheckpointTensors(gemma_checkpoint)
    prefixes = tensors.quantized_prefixes()
    assert len(prefixes) == 3 * 7 and not any("norm" in p for p in prefixes)
    assert "lm_head.weight" not in tensors  # tied: the embedding is the head
    for norm in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
        assert tensors.get(f"model.layers.0.{norm}.weight").dtype.name == "float16"
    config = json.loads((gemma_checkpoint / "config.json").read_text())
    assert config["architectures"][0] in ("Gemma2ForCausalLM", "Gemma3ForCausalLM")


def test_quantized_gemma_matches_transformers_on_dequantized_weights(
    gemma_checkpoint: Path, gemma_reference
) -> None:
    check_runner_matches(gemma_checkpoint, gemma_reference)


def test_engine_serves_quantized_gemma_greedy_like_transformers(
    gemma_checkpoint: Path, gemma_reference
) -> None:
    check_engine_matches(gemma_checkpoint, gemma_reference)
