"""`--kv-cache-dtype fp8`: e4m3 values with a scale per (token, kv head). The rounding is bounded,
the paged runner over an fp8 pool equals the cache-free forward with the same rounding, the pool
holds more tokens for the same bytes, and the quality cost on the real SmolLM2 stays small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_model import write_tiny_model

from gateway.cli import main as cli_main
from gateway.model import LlamaRunner
from gateway.model.kv_cache import FP8_DTYPE, KVCacheShape, dequantize_kv, quantize_kv
from gateway.model.step_batch import SeqChunk
from quantize.errors import UserInputError

BLOCK = 4


def test_round_trip_error_is_bounded_per_head() -> None:
    gen = torch.Generator().manual_seed(0)
    # Heads of very different magnitudes: each gets its own scale, so small heads keep precision.
    x = torch.randn(64, 4, 32, generator=gen) * torch.tensor([1e-3, 1.0, 30.0, 1e3])[:, None]
    values, scale = quantize_kv(x)
    assert values.dtype == FP8_DTYPE and scale.shape == (64, 4)
    back = dequantize_kv(values, scale, torch.float32)
    amax = x.abs().amax(-1, keepdim=True)
    # 3 mantissa bits: within 1/16 of the value, or e4m3's subnormal step (2^-9 of the scale).
    bound = x.abs() / 16 + amax / 448 * 2**-9
    assert ((back - x).abs() <= bound * 1.0001).all()
    assert torch.allclose(back.abs().amax(-1, keepdim=True), amax, rtol=1e-6)  # amax kept
    zeros, zero_scale = quantize_kv(torch.zeros(2, 1, 8))
    assert torch.equal(dequantize_kv(zeros, zero_scale, torch.float32), torch.zeros(2, 1, 8))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("kv8"))


def test_paged_fp8_steps_equal_the_forward_with_the_same_rounding(model_dir: Path) -> None:
    runner = LlamaRunner.load(
        model_dir, max_model_len=48, num_blocks=32, block_size=BLOCK, kv_cache_dtype="fp8"
    )
    assert runner.spec.kv_cache_dtype == "float8_e4m3fn"
    assert runner.cache.k.dtype == FP8_DTYPE and runner.cache.k_scale is not None
    exact = LlamaRunner.load(model_dir, max_model_len=48, num_blocks=32, block_size=BLOCK)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, runner.spec.vocab_size, (30,), generator=gen)
    expected = runner.forward_logits(ids[None])[0]
    table = torch.randperm(32, generator=gen)[: -(-30 // BLOCK)].tolist()
    # A 17-token chunk, then one token at a time: prefill and decode both read fp8 blocks.
    got = [runner.execute([SeqChunk(ids[:17].tolist(), 0, table)])[0]]
    for pos in range(17, 30):
        got.append(runner.execute([SeqChunk([int(ids[pos])], pos, table)])[0])
    for row, pos in enumerate(range(16, 30)):
        assert torch.allclose(got[row], expected[pos], atol=2e-4, rtol=1e-4), pos
    # The rounding is real: the fp8 logits differ from the exact ones, but only a little.
    full = exact.forward_logits(ids[None])[0]
    assert not torch.equal(expected, full)
    assert torch.allclose(expected, full, atol=0.2)


def test_fp8_pool_holds_more_tokens_for_the_same_bytes(model_dir: Path) -> None:
    budget = 1 << 20
    runners = {
        name: LlamaRunner.load(
            model_dir, max_model_len=48, kv_cache_bytes=budget, kv_cache_dtype=name
        )
        for name in ("auto", "fp8")
    }
    auto, fp8 = runners["auto"].spec, runners["fp8"].spec
    assert (auto.kv_cache_dtype, fp8.kv_cache_dtype) == ("float32", "float8_e4m3fn")
    shape = runners["fp8"].cache.shape
    head_bytes = shape.head_dim + 4  # one byte per value plus its fp32 scale
    assert (
        shape.block_bytes
        == 2 * shape.num_layers * shape.block_size * shape.num_kv_heads * head_bytes
    )
    ratio = fp8.num_blocks / auto.num_blocks
    expected = 4 * shape.head_dim / head_bytes  # fp32 on CPU against fp8 + scale
    assert ratio == pytest.approx(expected, rel=0.02)
    # At D = 128 against fp16 (the GPU's auto): 3% more than half the bytes per block.
    fp8_block = KVCacheShape(1, 1, 16, 8, 128, FP8_DTYPE).block_bytes
    assert fp8_block / KVCacheShape(1, 1, 16, 8, 128, torch.float16).block_bytes == 132 / 256


def test_an_unknown_kv_cache_dtype_is_refused_by_name(model_dir: Path) -> None:
    with pytest.raises(
        UserInputError, match=r"kv_cache_dtype .* one of auto, fp16, fp8, got 'int4'"
    ):
        LlamaRunner.load(model_dir, max_model_len=48, num_blocks=4, kv_cache_dtype="int4")


@pytest.mark.slow
def test_fp8_kv_costs_little_perplexity_on_smollm2(
    smollm2_w4_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gptq-gateway eval --kv-cache-dtype fp8` against the same checkpoint with the exact cache."""
    ppl = {}
    for name in ("auto", "fp8"):
        args = ["eval", str(smollm2_w4_checkpoint), "--seqlen", "256", "--windows", "4"]
        assert cli_main([*args, "--json", "--device", "cpu", "--kv-cache-dtype", name]) == 0
        ppl[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"]
    assert ppl["fp8"] != ppl["auto"]
    assert ppl["fp8"] < ppl["auto"] * 1.03, ppl
