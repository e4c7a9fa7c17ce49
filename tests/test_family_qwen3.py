"""Qwen3 end to end, and the family registry (quantize/archspec) both halves read.

A tiny random Qwen3 (GQA, head_dim 48 != hidden / heads, per-head q/k RMSNorm) is quantized by
the real `gptq-gateway quantize`, then served: the runner's logits, greedy ids and top-1 logprobs
match transformers' own Qwen3ForCausalLM running the checkpoint's weights dequantized, and so do
the engine's greedy tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_engine import plain_greedy_decode
from fixtures_family import NEW_TOKENS, check_engine_matches, hf_greedy
from fixtures_model import load_reference, write_tiny_model
from test_quantize_cli import SMALL_CALIB
from test_quantize_cli import write_tiny_model as write_tiny_tokenized_model

from gateway.model import LlamaRunner
from gateway.model.config import load_model_config
from gateway.model.slots import SlotRunner
from quantize.archspec import family_for_architecture, resolve_family, supported_model_types
from quantize.errors import UnsupportedArchitectureError, UserInputError

QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "head_dim": 48,  # not hidden / heads: q_proj is [heads * 48, hidden]
}


# ---- the registry ------------------------------------------------------------------------------


def test_unsupported_model_type_is_named_with_the_supported_list() -> None:
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    with pytest.raises(UnsupportedArchitectureError) as err:
        resolve_family(config)
    message = str(err.value)
    assert "model_type 'gpt2' (GPT2LMHeadModel)" in message
    assert "gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3" in message
    assert supported_model_types() == (
        "gemma2", "gemma3_text", "llama", "mistral", "phi3", "qwen2", "qwen3",
    )  # fmt: skip


def test_runner_config_error_lists_qwen3(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(UserInputError, match=r"GPT2LMHeadModel is not supported.*Qwen3ForCausalLM"):
        load_model_config(tmp_path)


def test_qwen3_spec_shapes_and_rules() -> None:
    family = family_for_architecture("Qwen3ForCausalLM")
    assert family is resolve_family({"model_type": "qwen3"})
    config = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 48,
        "intermediate_size": 96,
        "vocab_size": 100,
    }
    assert family.linear_shapes(config) == {
        "self_attn.q_proj": (192, 64),
        "self_attn.k_proj": (96, 64),
        "self_attn.v_proj": (96, 64),
        "self_attn.o_proj": (64, 192),
        "mlp.gate_proj": (96, 64),
        "mlp.up_proj": (96, 64),
        "mlp.down_proj": (64, 96),
    }
    assert [g.name for g in family.groups] == ["qkv", "o", "gate_up", "down"]
    assert family.qk_norm is not None and "self_attn.q_norm.weight" in (
        family.unquantized_layer_tensors()
    )
    qkv_bias = family.attention_in.linears[0].bias
    assert not qkv_bias.applies(config) and qkv_bias.applies({**config, "attention_bias": True})
    # Qwen2 always has q/k/v biases; Qwen3 does not.
    assert resolve_family({"model_type": "qwen2"}).attention_in.linears[0].bias.applies(config)
    # Sliding windows only with use_sliding_window, from max_window_layers on.
    windows = family.sliding_window.windows
    assert windows({"sliding_window": 8}, 3, "c") == (None, None, None)
    assert windows(
        {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 1}, 3, "c"
    ) == (None, 8, 8)


# ---- the quantizer's sub-blocks ----------------------------------------------------------------


def test_quantizer_sub_blocks_compose_to_the_transformers_qwen3_layer() -> None:
    from transformers import AutoConfig
    from transformers.masking_utils import create_causal_mask

    from quantize.arch import build_decoder_layer, resolve_architecture
    from quantize.blocks import LayerRunner, rotary_tables

    config = AutoConfig.for_model(
        "qwen3",
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=48,
        num_hidden_layers=1,
        vocab_size=128,
        max_position_embeddings=128,
    )
    config._attn_implementation = "eager"
    arch = resolve_architecture(config)
    torch.manual_seed(0)
    reference = arch.decoder_layer_cls(config, 0).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)
    cpu = torch.device("cpu")
    layer = build_decoder_layer(arch, config, 0, dict(reference.state_dict()), cpu, torch.float32)
    x = torch.randn(3, 40, 64)
    cos, sin = rotary_tables(arch, config, 40, cpu, torch.float32)
    ours = LayerRunner(arch, layer, cos, sin).forward(x)
    mask = create_causal_mask(
        config=config,
        inputs_embeds=x,
        attention_mask=None,
        cache=None,
        position_ids=torch.arange(40).unsqueeze(0),
    )
    with torch.no_grad():
        theirs = reference(x, attention_mask=mask, position_embeddings=(cos, sin))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


# ---- the runner on unquantized weights ---------------------------------------------------------


def test_runner_matches_transformers_on_fp32_qwen3(tmp_path: Path) -> None:
    model_dir = write_tiny_model(tmp_path, **QWEN3)
    reference = load_reference(model_dir)
    runner = SlotRunner.load(model_dir, num_slots=2, max_model_len=64)
    assert runner.config.qk_norm and runner.config.head_dim == 48
    assert not runner.config.qkv_bias
    ids = torch.randint(
        0, runner.spec.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(runner.forward_logits(ids), expected, rtol=1e-4, atol=1e-4)
    # The paged path (prefill, then decode one token at a time) too.
    got = runner.prefill(1, ids[0, :12].tolist())
    torch.testing.assert_close(got, expected[0, 11], rtol=1e-4, atol=1e-4)
    for pos in range(12, 20):
        got = runner.decode(torch.tensor([1]), ids[0, pos : pos + 1], torch.tensor([pos]))
        torch.testing.assert_close(got[0], expected[0, pos], rtol=1e-4, atol=1e-4)


# ---- quantize, then serve ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory, smollm2_hf_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("qwen3")
    model = write_tiny_tokenized_model(
        root / "model", smollm2_hf_dir, model_type="qwen3", layers=3, head_dim=32, hidden_size=96,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    out = root / "ckpt"
    code = _quantize(model, out)
    assert code == 0
    return out


def _quantize(model: Path, out: Path) -> int:
    from gateway.cli import main as cli_main

    return cli_main(["quantize", str(model), "--out", str(out), "--group-size", "32", *SMALL_CALIB])


def dequantized_reference(ckpt: Path):
    """transformers' Qwen3ForCausalLM holding the checkpoint's weights, dequantized, in fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantize.format import CheckpointTensors

    config = json.loads((ckpt / "config.json").read_text())
    config.pop("quantization_config")
    config = AutoConfig.for_model(**config)
    tensors = CheckpointTensors(ckpt)
    bits = json.loads((ckpt / "quantize_config.json").read_text())["bits"]
    quantized = set(tensors.quantized_prefixes())
    state = {}
    for name in tensors.keys():  # noqa: SIM118 - not a dict
        prefix, _, suffix = name.rpartition(".")
        if prefix in quantized:
            if suffix == "qweight":
                state[f"{prefix}.weight"] = tensors.linear(prefix, bits).dequantize()
            elif suffix == "bias":
                state[name] = torch.from_numpy(tensors.get(name)).float()
            continue
        state[name] = torch.from_numpy(tensors.get(name)).float()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_quantized_qwen3_checkpoint_keeps_qk_norms_in_float(qwen3_checkpoint: Path) -> None:
    from quantize.format import CheckpointTensors

    tensors = CheckpointTensors(qwen3_checkpoint)
    prefixes = tensors.quantized_prefixes()
    assert len(prefixes) == 3 * 7 and not any("norm" in p for p in prefixes)
    for i in range(3):
        for which in ("q_norm", "k_norm"):
            value = tensors.get(f"model.layers.{i}.self_attn.{which}.weight")
            assert value.shape == (32,) and value.dtype.name == "float16"
    config = json.loads((qwen3_checkpoint / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]


def test_quantized_qwen3_matches_transformers_on_dequantized_weights(
    qwen3_checkpoint: Path,
) -> None:
    reference = dequantized_reference(qwen3_checkpoint)
    runner = LlamaRunner.load(qwen3_checkpoint, device="cpu", max_model_len=128, num_blocks=16)
    assert runner.weights.layers[0].q_norm is not None
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
    got = runner.forward_logits(ids)
    diff = float((got - expected).abs().max())
    assert diff < 1e-3, diff
    prompt = ids[0, :10].tolist()
    want_ids, want_lp = hf_greedy(reference, prompt, NEW_TOKENS)
    got_ids, got_lp = plain_greedy_decode(runner, prompt, NEW_TOKENS)
    assert got_ids == want_ids
    assert got_lp == pytest.approx(want_lp, abs=1e-3)


def test_engine_serves_quantized_qwen3_greedy_like_transformers(qwen3_checkpoint: Path) -> None:
    check_engine_matches(qwen3_checkpoint, dequantized_reference(qwen3_checkpoint))


def test_the_spec_package_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, quantize.archspec; print('torch' in sys.modules)"
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo
    )
    assert out.stdout.strip() == "False"
