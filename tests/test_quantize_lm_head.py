"""`--quantize-lm-head` (GPTQModel's `lm_head=True`): the untied lm_head becomes a packed Linear.

On a tiny random untied Llama: the checkpoint holds `lm_head.qweight/qzeros/scales/g_idx` and says
`"lm_head": true`; it loads through gateway.model and computes what its dequantized weights compute;
GPTQ's head (Hessian from the final norm's output) beats round-to-nearest on held-out activations;
tied models are refused; without the flag nothing changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_model import TINY_LLAMA, write_tiny_model

from gateway.cli import main as cli_main
from gateway.model.slots import SlotRunner
from quantize.driver import HeadResult, Quantizer, QuantizeSettings
from quantize.errors import UserInputError
from quantize.format import CheckpointTensors
from quantize.gptq import GPTQOptions
from quantize.grid import QuantSpec
from quantize.pipeline import quantize_to_checkpoint
from quantize.reference import load_dequantized_model
from quantize.source import open_model

VOCAB = TINY_LLAMA["vocab_size"]
HIDDEN = TINY_LLAMA["hidden_size"]
HEAD_TENSORS = ["lm_head.g_idx", "lm_head.qweight", "lm_head.qzeros", "lm_head.scales"]
# Group 32 on 128 inputs: four groups per row, so the head's grid is not one scale per row.
SPEC = QuantSpec(bits=4, group_size=32, sym=True)


def random_ids(n: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("untied") / "model")


@pytest.fixture(scope="module")
def checkpoints(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """gptq and rtn with the flag, gptq without it; the same calibration windows for all."""
    root = tmp_path_factory.mktemp("ckpts")
    ids = random_ids(8, 64, seed=0)
    made = {}
    for name, method, head in (
        ("gptq", "gptq", True),
        ("rtn", "rtn", True),
        ("gptq-no-head", "gptq", False),
    ):
        settings = QuantizeSettings(spec=SPEC, method=method, quantize_lm_head=head)
        source = open_model(str(model_dir))
        calib = ids if method == "gptq" else None
        quantize_to_checkpoint(Quantizer(source, settings), calib, root / name)
        made[name] = root / name
    return made


def float_head(model_dir: Path) -> torch.Tensor:
    return open_model(str(model_dir)).tensor("lm_head.weight").float()


def head_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """||X (W - Q)^T||^2 / ||X W^T||^2: the relative error of the head's logits."""
    return float(((x @ (weight - approx).t()) ** 2).sum() / ((x @ weight.t()) ** 2).sum())


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_the_head_is_packed_and_the_configs_say_so(
    method: str, checkpoints: dict[str, Path], model_dir: Path
) -> None:
    ckpt = checkpoints[method]
    tensors = CheckpointTensors(ckpt)
    names = tensors.keys()
    assert sorted(k for k in names if k.startswith("lm_head")) == HEAD_TENSORS
    assert tensors.get("lm_head.qweight").shape == (HIDDEN * 4 // 32, VOCAB)
    assert tensors.get("lm_head.scales").shape == (HIDDEN // 32, VOCAB)
    assert tensors.get("lm_head.scales").dtype == np.float16
    assert tensors.get("model.embed_tokens.weight").dtype == np.float16  # the embedding stays
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization_config"]["lm_head"] is True
    assert json.loads((ckpt / "quantize_config.json").read_text())["lm_head"] is True

    head = tensors.linear("lm_head", 4)
    assert torch.equal(head.g_idx, torch.arange(HIDDEN, dtype=torch.int32) // 32)
    weight = float_head(model_dir)
    rel = float(((head.dequantize() - weight) ** 2).sum() / (weight**2).sum())
    assert 1e-5 < rel < 0.05  # really quantized, and to 4 bits of the right weight

    report = json.loads((ckpt / "quantize_report.json").read_text())
    assert report["settings"]["quantize_lm_head"] is True
    assert report["lm_head"]["out_features"] == VOCAB
    rel_error = report["lm_head"]["rel_error"]
    assert (0 < rel_error < 0.05) if method == "gptq" else np.isnan(rel_error)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_the_runner_computes_what_the_dequantized_checkpoint_computes(
    method: str, checkpoints: dict[str, Path]
) -> None:
    ckpt = checkpoints[method]
    runner = SlotRunner.load(ckpt, num_slots=1, max_model_len=32)
    assert type(runner.weights.lm_head).__name__ == "QuantLinear"
    reference = load_dequantized_model(ckpt, dtype=torch.float32)
    ids = random_ids(2, 16, seed=3)
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(runner.forward_logits(ids), expected, rtol=1e-4, atol=1e-4)


def test_gptq_head_beats_round_to_nearest_on_held_out_activations(
    checkpoints: dict[str, Path], model_dir: Path
) -> None:
    """The head's inputs are the final norm's outputs of the (quantized) model on tokens never
    used for calibration; GPTQ's logits error on them must be below RTN's."""
    reference = load_dequantized_model(checkpoints["gptq"], dtype=torch.float32)
    with torch.no_grad():
        held_out = reference.model(random_ids(4, 64, seed=1)).last_hidden_state
    x = held_out.reshape(-1, HIDDEN)
    weight = float_head(model_dir)
    heads = {m: CheckpointTensors(checkpoints[m]).linear("lm_head", 4) for m in ("gptq", "rtn")}
    errors = {m: head_error(weight, head.dequantize(), x) for m, head in heads.items()}
    assert 0 < errors["gptq"] < errors["rtn"], errors


def test_the_head_hessian_comes_from_the_final_norm_of_the_quantized_model(
    checkpoints: dict[str, Path], model_dir: Path
) -> None:
    """The reported calibration error of the head, computed by the quantizer from its Hessian,
    equals the error measured on the final norm's outputs of the quantized model on the same
    calibration windows (to fp16 rounding: the checkpoint's embedding and norms are fp16)."""
    report = json.loads((checkpoints["gptq"] / "quantize_report.json").read_text())
    reference = load_dequantized_model(checkpoints["gptq"], dtype=torch.float32)
    with torch.no_grad():
        x = reference.model(random_ids(8, 64, seed=0)).last_hidden_state.reshape(-1, HIDDEN)
    head = CheckpointTensors(checkpoints["gptq"]).linear("lm_head", 4).dequantize()
    measured = head_error(float_head(model_dir), head, x)
    assert report["lm_head"]["rel_error"] == pytest.approx(measured, rel=1e-3)


def test_without_the_flag_only_the_head_differs(checkpoints: dict[str, Path]) -> None:
    plain = CheckpointTensors(checkpoints["gptq-no-head"])
    quantized = CheckpointTensors(checkpoints["gptq"])
    assert "lm_head.qweight" not in plain
    assert plain.get("lm_head.weight").dtype == np.float16
    plain_dir = checkpoints["gptq-no-head"]
    assert json.loads((plain_dir / "quantize_config.json").read_text())["lm_head"] is False
    config = json.loads((plain_dir / "config.json").read_text())
    assert config["quantization_config"]["lm_head"] is False
    # Carrying the last layer's output on to the head changes none of the layers' integers.
    plain_names, quantized_names = plain.keys(), quantized.keys()
    body = sorted(k for k in plain_names if not k.startswith("lm_head"))
    assert body == sorted(k for k in quantized_names if not k.startswith("lm_head"))
    for key in body:
        assert np.array_equal(plain.get(key), quantized.get(key)), key


@pytest.mark.parametrize("act_order", [False, True])
def test_the_head_quantized_in_row_blocks_equals_one_pass(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, act_order: bool
) -> None:
    """The head is quantized a block of vocab rows at a time on one Hessian; the integers must be
    those of a single pass (a short last block included: 320 = 3 x 96 + 32)."""
    import quantize.driver as driver

    settings = QuantizeSettings(
        spec=SPEC, gptq=GPTQOptions(act_order=act_order), quantize_lm_head=True
    )
    ids = random_ids(4, 32, seed=0)

    def head() -> HeadResult:
        results = list(Quantizer(open_model(str(model_dir)), settings).run(ids))
        assert isinstance(results[-1], HeadResult) and len(results) == 3
        return results[-1]

    whole = head()
    monkeypatch.setattr(driver, "HEAD_ROWS_PER_CHUNK", 96)
    blocks = head()
    for field in ("qint", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(whole.quantized, field), getattr(blocks.quantized, field))
    assert blocks.report.rel_error == pytest.approx(whole.report.rel_error, rel=1e-5)
    natural = torch.arange(HIDDEN, dtype=torch.int32) // 32
    assert (not torch.equal(whole.quantized.g_idx, natural)) == act_order


def test_tied_embeddings_are_refused_with_the_reason(tmp_path: Path, capsys) -> None:
    tied = write_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    with pytest.raises(UserInputError, match=r"--quantize-lm-head.*tie_word_embeddings"):
        Quantizer(open_model(str(tied)), QuantizeSettings(quantize_lm_head=True))
    out = tmp_path / "out"
    code = cli_main(["quantize", str(tied), "--out", str(out), "--quantize-lm-head", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--quantize-lm-head" in err and "IS the embedding" in err
    assert not out.exists()


def test_a_vocabulary_the_packing_cannot_hold_is_refused(tmp_path: Path, capsys) -> None:
    # 321 outputs x 4 bits is not a whole number of int32 words: qzeros cannot hold the head.
    model = write_tiny_model(tmp_path / "odd", vocab_size=321)
    args = ["quantize", str(model), "--out", str(tmp_path / "o"), "--quantize-lm-head"]
    assert cli_main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "lm_head has out_features=321" in err and "no --quantize-lm-head" in err
