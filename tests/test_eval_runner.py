"""`eval` runs a checkpoint through the server's 4-bit runner; its perplexity must be the one
the dequantizing float reference gives for the same integers."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli_eval import checkpoint_logits_fn
from quantize.calib import heldout_text, tokenize_text
from quantize.errors import UserInputError
from quantize.perplexity import perplexity
from quantize.reference import load_dequantized_model, load_tokenizer, logits_function


@pytest.mark.slow
def test_runner_perplexity_equals_the_dequantized_reference(smollm2_w4_checkpoint: Path) -> None:
    path = str(smollm2_w4_checkpoint)
    ids = tokenize_text(load_tokenizer(path), heldout_text())
    runner = perplexity(checkpoint_logits_fn(path, "cpu", 128), ids, seqlen=128, windows=3)
    reference = logits_function(load_dequantized_model(path, device="cpu"))
    expected = perplexity(reference, ids, seqlen=128, windows=3)
    assert runner.tokens == expected.tokens == 3 * 127
    assert runner.ppl == pytest.approx(expected.ppl, rel=1e-3)


def test_a_window_longer_than_the_model_names_seqlen(smollm2_w4_checkpoint: Path) -> None:
    with pytest.raises(UserInputError, match="--seqlen 100000"):
        checkpoint_logits_fn(str(smollm2_w4_checkpoint), "cpu", 100_000)
