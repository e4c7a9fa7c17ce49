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


EVAL_ARGS = ["--seqlen", "128", "--windows", "2", "--json", "--device", "cpu"]


@pytest.mark.slow  # ~10 s on an idle 2-core machine, 45 s with other jobs beside it
def test_eval_a_checkpoint_and_its_float_model(
    smollm2_w4_checkpoint: Path, smollm2_hf_dir: Path, capsys
) -> None:
    """The checkpoint through `python -m gateway.cli` in a fresh process, as a user runs it; the
    float HF directory in-process. Same text, same windows: quantization must cost a little."""
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "eval", str(smollm2_w4_checkpoint), *EVAL_ARGS],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    quantized = json.loads(proc.stdout)
    assert cli_main(["eval", str(smollm2_hf_dir), *EVAL_ARGS]) == 0
    float_model = json.loads(capsys.readouterr().out)
    for result in (quantized, float_model):
        assert result["tokens"] == 2 * 127 and math.isfinite(result["ppl"])
    assert float_model["ppl"] < quantized["ppl"] < 2 * float_model["ppl"]


def test_eval_bad_input(smollm2_w4_checkpoint: Path, tmp_path: Path, capsys) -> None:
    code = cli_main(["eval", str(smollm2_w4_checkpoint), "--text", str(tmp_path / "nope.txt")])
    assert code == 2 and "nope.txt" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    code = cli_main(["eval", str(smollm2_w4_checkpoint), "--text", str(short), "--windows", "3"])
    assert code == 2 and "needs 1536 tokens" in capsys.readouterr().err
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(range(256)))
    assert cli_main(["eval", str(broken)]) == 2
    assert str(broken) in capsys.readouterr().err
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    (gpt2 / "config.json").write_text(json.dumps(config))
    (gpt2 / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128}))
    assert cli_main(["eval", str(gpt2), "--text", str(short), "--seqlen", "2"]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture: model_type 'gpt2' (GPT2LMHeadModel)" in err
