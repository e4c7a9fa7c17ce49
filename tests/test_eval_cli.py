"""`gptq-gateway eval` and the perplexity math behind it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gateway.cli import main as cli_main
from quantize.errors import UserInputError
from quantize.perplexity import perplexity


def test_uniform_logits_give_the_vocabulary_size() -> None:
    ids = torch.randint(0, 50, (1000,))
    result = perplexity(lambda x: torch.zeros(*x.shape, 50), ids, seqlen=100)
    assert result.windows == 10 and result.tokens == 10 * 99
    assert result.ppl == pytest.approx(50.0, rel=1e-6)


def test_a_perfect_predictor_gives_one() -> None:
    ids = torch.arange(300) % 7

    def oracle(x: torch.Tensor) -> torch.Tensor:
        logits = torch.full((*x.shape, 7), -1e4)
        logits.scatter_(-1, ((x + 1) % 7).unsqueeze(-1), 0.0)  # the next token, with certainty
        return logits

    result = perplexity(oracle, ids, seqlen=30, windows=4, batch_size=3)
    assert result.tokens == 4 * 29 and result.ppl == pytest.approx(1.0, abs=1e-6)


def test_window_requests_beyond_the_text_are_refused() -> None:
    with pytest.raises(UserInputError, match=r"--windows 5 needs 500 tokens of text, it has 450"):
        perplexity(lambda x: torch.zeros(*x.shape, 3), torch.zeros(450, dtype=torch.long), 100, 5)
    with pytest.raises(UserInputError, match="fewer than one window"):
        perplexity(lambda x: torch.zeros(*x.shape, 3), torch.zeros(50, dtype=torch.long), 100)


def _eval(model: Path, capsys) -> dict:
    args = ["--seqlen", "256", "--windows", "4", "--device", "cpu"]
    code = cli_main(["eval", str(model), "--json", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.mark.slow
def test_eval_a_checkpoint_and_its_float_model(
    smollm2_w4_checkpoint: Path, smollm2_hf_dir: Path, capsys
) -> None:
    quantized = _eval(smollm2_w4_checkpoint, capsys)
    float_model = _eval(smollm2_hf_dir, capsys)
    for result in (quantized, float_model):
        assert result["tokens"] == 4 * 255 and math.isfinite(result["ppl"])
    assert float_model["ppl"] < quantized["ppl"] < 2 * float_model["ppl"]


def test_eval_a_checkpoint_in_a_fresh_process(smollm2_w4_checkpoint: Path) -> None:
    args = ["--seqlen", "64", "--windows", "1", "--json", "--device", "cpu"]
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "eval", str(smollm2_w4_checkpoint), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)) >= {"ppl", "tokens"}


def test_eval_bad_input(smollm2_w4_checkpoint: Path, tmp_path: Path, capsys) -> None:
    code = cli_main(["eval", str(smollm2_w4_checkpoint), "--text", str(tmp_path / "nope.txt")])
    assert code == 2 and "nope.txt" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    code = cli_main(["eval", str(smollm2_w4_checkpoint), "--text", str(short), "--windows", "3"])
    assert code == 2 and "needs 1536 tokens" in capsys.readouterr().err
