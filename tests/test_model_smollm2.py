"""The runner on the real model, SmolLM2-135M-Instruct (fixtures from tests/conftest.py).

- FP32 HF directory: logits equal transformers' LlamaForCausalLM on the same weights.
- 4-bit g128 GPTQ checkpoint: the first 32 greedy tokens equal those of the dequantizing reference
  model (quantize.reference, a transformers model holding scale * (q - zero)) on the test prompts.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from gateway.model import LlamaRunner
from gateway.model.slots import SlotRunner

PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the nth Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
)
GREEDY_TOKENS = 32


@functools.cache
def tokenizer_of(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def chat_prompt(model_dir: Path, text: str) -> list[int]:
    tokenizer = tokenizer_of(model_dir)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def runner_greedy(runner: LlamaRunner, prompts: list[list[int]], count: int) -> list[list[int]]:
    """Greedy continuations of all prompts at once: one slot each, decoded as one batch."""
    outs = [[int(runner.prefill(slot, prompt).argmax())] for slot, prompt in enumerate(prompts)]
    slots = torch.arange(len(prompts))
    for step in range(count - 1):
        tokens = torch.tensor([out[-1] for out in outs])
        positions = torch.tensor([len(prompt) + step for prompt in prompts])
        for out, token in zip(
            outs, runner.decode(slots, tokens, positions).argmax(-1), strict=True
        ):
            out.append(int(token))
    return outs


def reference_greedy(model: torch.nn.Module, prompt: list[int], count: int) -> list[int]:
    """Plain argmax continuation, EOS included. Not `generate(min_new_tokens=...)`: that masks
    EOS, which the runner's argmax does not, so the two part ways wherever EOS is the top token."""
    tokens: list[int] = []
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(count):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(
                torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True
            )
    return tokens


@pytest.mark.slow
def test_fp32_logits_match_transformers(smollm2_hf_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    runner = SlotRunner.load(smollm2_hf_dir, num_slots=1, max_model_len=128)
    ids = torch.tensor([chat_prompt(smollm2_hf_dir, PROMPTS[0])])
    with torch.inference_mode():
        expected = reference(ids).logits
    torch.testing.assert_close(runner.forward_logits(ids), expected, rtol=1e-4, atol=1e-4)
    # Same weights through the cache: prefill's last-token logits.
    torch.testing.assert_close(
        runner.prefill(0, ids[0].tolist()), expected[0, -1], rtol=1e-4, atol=1e-4
    )


@pytest.mark.slow
def test_4bit_greedy_tokens_equal_dequantized_reference(smollm2_w4_checkpoint: Path) -> None:
    from quantize.reference import load_dequantized_model

    reference = load_dequantized_model(smollm2_w4_checkpoint, dtype=torch.float32)
    runner = SlotRunner.load(smollm2_w4_checkpoint, num_slots=len(PROMPTS), max_model_len=160)
    assert runner.spec.quantization["bits"] == 4
    prompts = [chat_prompt(smollm2_w4_checkpoint, text) for text in PROMPTS]
    got = runner_greedy(runner, prompts, GREEDY_TOKENS)
    for text, prompt, tokens in zip(PROMPTS, prompts, got, strict=True):
        assert tokens == reference_greedy(reference, prompt, GREEDY_TOKENS), text
