"""The runner's logits agree with transformers' own models on the same weights (fp32, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_model import load_reference, write_tiny_model

from gateway.model.slots import SlotRunner

VARIANTS = {
    "llama-tied": {"tie_word_embeddings": True},
    "llama3-rope-scaling": {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    },
    "llama-linear-rope-bias": {
        "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        "attention_bias": True,
        "mlp_bias": True,
    },
    "qwen2-qkv-bias": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
    "mistral-sliding-window": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "sliding_window": 7,
        "head_dim": 48,
    },
    "qwen2-sliding-layers": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "use_sliding_window": True,
        "sliding_window": 5,
        "max_window_layers": 1,
    },
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    model_dir = write_tiny_model(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    return request.param, model_dir, load_reference(model_dir)


def test_forward_logits_match_transformers(variant) -> None:
    name, model_dir, reference = variant
    runner = SlotRunner.load(model_dir, num_slots=2, max_model_len=64)
    ids = torch.randint(
        0, runner.spec.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = reference(ids).logits
    got = runner.forward_logits(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if "sliding" in name:
        # The window is narrower than the sequence, so it must have changed something.
        assert any(w is not None and w < ids.shape[1] for w in runner.config.sliding_windows)


def test_cached_generation_matches_transformers(variant) -> None:
    _, model_dir, reference = variant
    runner = SlotRunner.load(model_dir, num_slots=2, max_model_len=64)
    ids = torch.randint(
        0, runner.spec.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected = reference(ids).logits[0]
    torch.testing.assert_close(
        runner.prefill(1, ids[0, :12].tolist()), expected[11], rtol=1e-4, atol=1e-4
    )
    for pos in range(12, 20):
        got = runner.decode(torch.tensor([1]), ids[0, pos : pos + 1], torch.tensor([pos]))
        torch.testing.assert_close(got[0], expected[pos], rtol=1e-4, atol=1e-4)


def test_sharded_half_precision_checkpoint(tmp_path: Path) -> None:
    # fp16 and bf16 storage, sharded with an index: the baseline path for unquantized HF models.
    from transformers import AutoModelForCausalLM

    source = write_tiny_model(tmp_path / "fp32")
    for dtype in (torch.float16, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        out = tmp_path / str(dtype)
        model.save_pretrained(out, max_shard_size="100KB")
        assert (out / "model.safetensors.index.json").exists()
        runner = SlotRunner.load(out, num_slots=1, max_model_len=32)
        reference = load_reference(out)  # upcast to fp32: the same rounded weights
        ids = torch.arange(10)[None] * 7
        with torch.no_grad():
            expected = reference(ids).logits
        torch.testing.assert_close(runner.forward_logits(ids), expected, rtol=1e-4, atol=1e-4)
        assert runner.spec.quantization is None
        assert runner.spec.kernels == ("dense",)


def test_spec_reports_sizes_and_tokens(tmp_path: Path) -> None:
    model_dir = write_tiny_model(tmp_path, tie_word_embeddings=True)
    config = json.loads((model_dir / "config.json").read_text())
    runner = SlotRunner.load(model_dir, num_slots=3, max_model_len=40)
    spec = runner.spec
    assert (spec.vocab_size, spec.num_blocks, spec.max_model_len) == (config["vocab_size"], 9, 40)
    assert spec.model_type == "llama" and spec.dtype == "float32" and spec.device == "cpu"
    assert spec.eos_token_ids == (config["eos_token_id"],) and spec.bos == config["bos_token_id"]
    # k and v: layers x (3 slots x 3 blocks of 16 tokens) x kv_heads x head_dim x 4 bytes
    assert spec.block_size == 16
    assert spec.kv_pool_bytes == 2 * 2 * 9 * 16 * 2 * 32 * 4
    params = sum(t.numel() for t in load_reference(model_dir).state_dict().values() if t.dim())
    lm_head = config["vocab_size"] * config["hidden_size"]
    assert spec.weight_bytes == (params - lm_head) * 4  # tied head shares the embedding
