"""Helpers for the per-family end-to-end tests (tests/test_family_*.py): quantize a tiny random
model with the real CLI, then hold our runner and engine against transformers' own model running
the checkpoint's weights dequantized."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from fixtures_engine import plain_greedy_decode

from gateway.model import LlamaRunner

NEW_TOKENS = 8


def quantize(model: Path, out: Path, *, seqlen: int = 64, nsamples: int = 4) -> None:
    """`gptq-gateway quantize` at 4 bits, group 32, on the built-in calibration text."""
    from gateway.cli import main as cli_main

    args = ["quantize", str(model), "--out", str(out), "--group-size", "32", "--quiet"]
    args += ["--nsamples", str(nsamples), "--seqlen", str(seqlen), "--device", "cpu"]
    assert cli_main(args) == 0


def dequantized_reference(ckpt: Path):
    """transformers' model of the checkpoint's family holding its weights dequantized, in fp32
    (quantize.reference, the yardstick the eval command uses too)."""
    from quantize.reference import load_dequantized_model

    return load_dequantized_model(ckpt, device="cpu", dtype=torch.float32)


def hf_greedy(model, prompt: list[int], count: int) -> tuple[list[int], list[float]]:
    ids = list(prompt)
    logprobs = []
    with torch.no_grad():
        for _ in range(count):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            token = int(logits.argmax())
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids.append(token)
    return ids[len(prompt) :], logprobs


def check_runner_matches(ckpt: Path, reference, *, length: int = 40, prompt_len: int = 24) -> None:
    """Our runner on the checkpoint: all-position logits (no cache) and greedy decoding through
    the paged cache (ids equal, top-1 logprobs close) match the reference."""
    runner = LlamaRunner.load(ckpt, device="cpu", max_model_len=128, num_blocks=16)
    ids = torch.randint(
        0, runner.spec.vocab_size, (2, length), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = reference(ids).logits
    diff = float((runner.forward_logits(ids) - expected).abs().max())
    assert diff < 1e-3, diff
    prompt = ids[0, :prompt_len].tolist()
    want_ids, want_lp = hf_greedy(reference, prompt, NEW_TOKENS)
    got_ids, got_lp = plain_greedy_decode(runner, prompt, NEW_TOKENS)
    assert got_ids == want_ids
    assert got_lp == pytest.approx(want_lp, abs=1e-3)


def check_engine_matches(ckpt: Path, reference, text: str = "The capital of France is") -> None:
    """The real engine's greedy tokens and logprobs equal transformers' on the same prompt."""
    from gateway.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

    config = EngineConfig(device="cpu", max_num_seqs=4, max_queue=8, max_model_len=128)
    engine = Engine.from_checkpoint(ckpt, config)
    prompt = engine.encode(text)
    want_ids, want_lp = hf_greedy(reference, prompt, NEW_TOKENS)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=1)

    async def collect():
        return [e async for e in engine.generate(GenerationRequest("f", prompt, params))]

    engine.start()
    try:
        events = asyncio.run(collect())
    finally:
        assert engine.shutdown(timeout=30.0)
    assert [t for e in events for t in e.token_ids] == want_ids
    got_lp = [lp.logprob for e in events for lp in (e.logprobs or [])]
    assert got_lp == pytest.approx(want_lp, abs=1e-3)


def write_config(path: Path, **fields) -> Path:
    """A config.json of a tiny model with `fields` (for the config-validation tests)."""
    base = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
    }
    (path / "config.json").write_text(json.dumps({**base, **fields}))
    return path


def assert_layer_matches_transformers(
    arch, config, reference: torch.nn.Module, layer_type: str | None = None
) -> torch.nn.Module:
    """The quantizer's decoder layer, built from `reference`'s weights, runs its sub-blocks in
    turn (quantize.blocks.LayerRunner) to the same output as transformers' layer. Returns ours."""
    from transformers.masking_utils import create_causal_mask

    from quantize.arch import build_decoder_layer
    from quantize.blocks import LayerRunner, rotary_tables

    cpu = torch.device("cpu")
    layer = build_decoder_layer(arch, config, 0, dict(reference.state_dict()), cpu, torch.float32)
    x = torch.randn(3, 40, 64)
    extra = () if layer_type is None else (layer_type,)
    cos, sin = rotary_tables(arch, config, 40, cpu, torch.float32, *extra)
    ours = LayerRunner(arch, layer, cos, sin).forward(x)
    positions = torch.arange(40).unsqueeze(0)
    mask = create_causal_mask(
        config=config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=positions
    )
    with torch.no_grad():
        theirs = reference(x, attention_mask=mask, position_embeddings=(cos, sin))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    return layer
