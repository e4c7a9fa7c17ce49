"""`gptq-gateway quantize` end to end on tiny models, and every bad input it must refuse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gateway.cli import main as cli_main

VOCAB_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_tiny_model(
    out: Path, tokenizer_dir: Path, model_type: str = "llama", layers: int = 2, **extra
) -> Path:
    """A random Llama-family model of small shape with SmolLM2's tokenizer (vocab 49152)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": layers,
        "vocab_size": 49152,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        **extra,
    }
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.1)
    model.save_pretrained(out)
    for name in VOCAB_FILES:
        (out / name).write_bytes((tokenizer_dir / name).read_bytes())
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_hf_dir: Path) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", smollm2_hf_dir)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli_main(args)
    out, err = capsys.readouterr()
    return code, out, err


SMALL_CALIB = ["--nsamples", "4", "--seqlen", "64", "--device", "cpu", "--quiet"]


def test_quantize_then_eval_a_tiny_model(tiny_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ckpt"
    args = ["quantize", str(tiny_model), "--out", str(out), "--no-sym", "--desc-act"]
    code, stdout, err = run_cli([*args, "--group-size", "32", *SMALL_CALIB], capsys)
    assert code == 0, err
    assert stdout.strip() == str(out.absolute())
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    assert (quant["quant_method"], quant["bits"], quant["group_size"]) == ("gptq", 4, 32)
    assert quant["desc_act"] is True and quant["sym"] is False
    assert quant["checkpoint_format"] == "gptq" and config["torch_dtype"] == "float16"
    autogptq = json.loads((out / "quantize_config.json").read_text())
    assert autogptq["model_file_base_name"] == "model" and autogptq["desc_act"] is True
    report = json.loads((out / "quantize_report.json").read_text())
    assert len(report["layers"]) == 2 and report["size_ratio_vs_fp16"] < 1.0
    assert all(0 <= lin["rel_error"] < 1 for lay in report["layers"] for lin in lay["linears"])
    for name in (*VOCAB_FILES, "generation_config.json", "model.safetensors"):
        assert (out / name).is_file(), name

    code, stdout, err = run_cli(
        ["eval", str(out), "--seqlen", "64", "--windows", "2", "--json", "--device", "cpu"], capsys
    )
    assert code == 0, err
    result = json.loads(stdout)
    assert result["tokens"] == 2 * 63 and np.isfinite(result["ppl"]) and result["ppl"] > 1


def test_quantize_lm_head_flag_packs_the_head_and_reports_it(
    tiny_model: Path, tmp_path: Path, capsys
) -> None:
    """--quantize-lm-head end to end (tests/test_quantize_lm_head.py checks the numbers)."""
    from quantize.format import CheckpointTensors

    out = tmp_path / "ckpt"
    args = ["quantize", str(tiny_model), "--out", str(out), "--quantize-lm-head"]
    code, _, err = run_cli([*args, *[a for a in SMALL_CALIB if a != "--quiet"]], capsys)
    assert code == 0, err
    assert " head " in err and "lm_head" in err  # the summary table's head row
    assert json.loads((out / "quantize_config.json").read_text())["lm_head"] is True
    tensors = CheckpointTensors(out)
    assert "lm_head" in tensors.quantized_prefixes() and "lm_head.weight" not in tensors
    assert tensors.get("lm_head.qweight").shape == (64 * 4 // 32, 49152)


@pytest.mark.parametrize("act_order", [False, True])
def test_checkpoint_integers_equal_the_quantizers_including_zero_points_of_zero(
    tiny_model: Path, tmp_path: Path, act_order: bool
) -> None:
    """Asymmetric GPTQ on a model with an all-positive row: its zero point is 0, which v1 cannot
    store field by field; it must still come back exactly (with act-order: g_idx permuted)."""
    from quantize.calib import calibration_text, sample_windows, tokenize_text
    from quantize.driver import Quantizer, QuantizeSettings
    from quantize.format import CheckpointTensors
    from quantize.gptq import GPTQOptions
    from quantize.grid import QuantSpec
    from quantize.pipeline import quantize_to_checkpoint
    from quantize.source import open_model

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    from safetensors.torch import load_file, save_file

    for f in tiny_model.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    state = load_file(str(model_dir / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"][5] = state["model.layers.0.mlp.up_proj.weight"][
        5
    ].abs()
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})

    source = open_model(str(model_dir))
    ids = sample_windows(tokenize_text(source.load_tokenizer(), calibration_text()), 4, 64, 0)
    settings = QuantizeSettings(
        spec=QuantSpec(sym=False, group_size=32), gptq=GPTQOptions(act_order=act_order)
    )
    quantizer = Quantizer(source, settings)
    in_memory = {}
    quantize_to_checkpoint(
        quantizer,
        ids,
        tmp_path / "ckpt",
        on_layer=lambda r: in_memory.update(
            {f"model.layers.{r.index}.{k}": v for k, v in r.quantized.items()}
        ),
    )
    assert int(in_memory["model.layers.0.mlp.up_proj"].zeros[:, 5].min()) == 0
    tensors = CheckpointTensors(tmp_path / "ckpt")
    assert sorted(tensors.quantized_prefixes()) == sorted(in_memory)
    for prefix, expected in in_memory.items():
        got = tensors.linear(prefix, 4)
        assert torch.equal(got.qint, expected.qint), prefix
        assert torch.equal(got.zeros, expected.zeros), prefix
        assert torch.equal(got.scales, expected.scales), prefix
        assert torch.equal(got.g_idx, expected.g_idx), prefix
    natural = torch.arange(64, dtype=torch.int32) // 32
    q_proj = in_memory["model.layers.0.self_attn.q_proj"]
    assert torch.equal(q_proj.g_idx, natural) == (not act_order)


# --- bad input ---------------------------------------------------------------------------------


def test_unknown_architecture_is_named(tmp_path: Path, smollm2_hf_dir: Path, capsys) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    model.save_pretrained(tmp_path / "gpt2")
    code, _, err = run_cli(
        ["quantize", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2
    assert "unsupported architecture" in err and "'gpt2'" in err and "GPT2LMHeadModel" in err


def test_existing_output_is_refused_before_any_work(tiny_model: Path, tmp_path: Path, capsys):
    (tmp_path / "o").mkdir()
    code, _, err = run_cli(["quantize", str(tiny_model), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "already exists; pass --overwrite" in err


def test_short_calibration_text_says_what_is_needed(tiny_model: Path, tmp_path: Path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words of text here.")
    args = ["quantize", str(tiny_model), "--out", str(tmp_path / "o"), "--calib", str(text)]
    code, _, err = run_cli([*args, "--nsamples", "8", "--seqlen", "128", "--quiet"], capsys)
    assert code == 2 and "needs 1024" in err and "calibration text is too short" in err
    assert not (tmp_path / "o").exists()


def test_unpackable_shapes_are_refused(tmp_path: Path, smollm2_hf_dir: Path, capsys) -> None:
    # 80 inputs x 3 bits = 240 bits: not a whole number of int32 words.
    model = write_tiny_model(tmp_path / "m", smollm2_hf_dir, hidden_size=80, layers=1)
    args = ["quantize", str(model), "--out", str(tmp_path / "o"), "--bits", "3"]
    code, _, err = run_cli([*args, "--quiet"], capsys)
    assert code == 2 and "in_features=80" in err and "multiple of 32" in err


def test_files_that_do_not_parse_are_named(tmp_path: Path, tiny_model: Path, capsys) -> None:
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(256))
    code, _, err = run_cli(["quantize", str(gguf), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and str(gguf) in err

    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    code, _, err = run_cli(["quantize", str(bad_config), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "config.json" in err

    bad_weights = tmp_path / "bad_weights"
    bad_weights.mkdir()
    (bad_weights / "config.json").write_text((tiny_model / "config.json").read_text())
    (bad_weights / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    code, _, err = run_cli(["quantize", str(bad_weights), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "model.safetensors" in err
    assert not (tmp_path / "o").exists()


def test_ctrl_c_leaves_no_partial_checkpoint(tmp_path: Path, smollm2_hf_dir: Path) -> None:
    model = write_tiny_model(tmp_path / "m", smollm2_hf_dir, layers=12, hidden_size=256)
    out = tmp_path / "ckpt"
    args = ["--nsamples", "32", "--seqlen", "256", "--device", "cpu", "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "quantize", str(model), "--out", str(out), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(".ckpt.partial-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.0)  # inside the layer loop, with tensors written to the staging directory
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_crash_mid_run_leaves_the_old_checkpoint_and_no_partial_one(
    tiny_model: Path, tmp_path: Path
) -> None:
    from quantize.calib import calibration_text, sample_windows, tokenize_text
    from quantize.driver import Quantizer, QuantizeSettings
    from quantize.pipeline import quantize_to_checkpoint
    from quantize.source import open_model

    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a previous checkpoint, replaced only on success
    source = open_model(str(tiny_model))
    ids = sample_windows(tokenize_text(source.load_tokenizer(), calibration_text()), 4, 64, 0)

    def crash(result) -> None:
        raise RuntimeError(f"simulated crash after layer {result.index}")

    with pytest.raises(RuntimeError, match="simulated crash after layer 0"):
        quantize_to_checkpoint(
            Quantizer(source, QuantizeSettings()), ids, out, overwrite=True, on_layer=crash
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_hub_ids_fail_clearly_when_offline(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(
        ["quantize", "no-such-org/no-such-model", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "'no-such-org/no-such-model'" in err and "hub" in err


def test_same_seed_same_checkpoint(tiny_model: Path, tmp_path: Path, capsys) -> None:
    from quantize.format import CheckpointTensors

    for name in ("a", "b"):
        args = ["quantize", str(tiny_model), "--out", str(tmp_path / name), "--desc-act"]
        assert run_cli([*args, "--seed", "7", *SMALL_CALIB], capsys)[0] == 0
    a, b = CheckpointTensors(tmp_path / "a"), CheckpointTensors(tmp_path / "b")
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():  # noqa: SIM118 - not a dict
        assert np.array_equal(a.get(key), b.get(key)), key


# --- --layout ------------------------------------------------------------------------------------


def test_layout_gptqmodel_is_a_no_op_for_a_family_without_a_difference(
    tiny_model: Path, tmp_path: Path, capsys
) -> None:
    """Llama's GPTQModel layout is HF's: --layout gptqmodel writes the same checkpoint (RTN keeps
    it fast; the Phi-3 split is in tests/test_family_phi3.py), which the gateway serves."""
    from gateway.model.slots import SlotRunner
    from quantize.format import CheckpointTensors

    args = ["quantize", str(tiny_model), "--method", "rtn", "--device", "cpu", "--quiet"]
    for layout in ("hf", "gptqmodel"):
        assert run_cli([*args, "--out", str(tmp_path / layout), "--layout", layout], capsys)[0] == 0
    hf, split = CheckpointTensors(tmp_path / "hf"), CheckpointTensors(tmp_path / "gptqmodel")
    assert sorted(split.keys()) == sorted(hf.keys())
    assert "model.layers.0.mlp.gate_proj" in split.quantized_prefixes()
    for key in hf.keys():  # noqa: SIM118 - not a dict
        assert np.array_equal(split.get(key), hf.get(key)), key
    for name in ("config.json", "quantize_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "gptqmodel" / name).read_bytes()
    runner = SlotRunner.load(tmp_path / "gptqmodel", num_slots=1, max_model_len=16)
    assert torch.isfinite(runner.forward_logits(torch.tensor([[1, 2, 3, 4]]))).all()


def test_bad_layout_gets_argparses_error(tiny_model: Path, tmp_path: Path, capsys) -> None:
    args = ["quantize", str(tiny_model), "--out", str(tmp_path / "o"), "--layout", "vllm"]
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --layout: invalid choice: 'vllm'" in err
    assert "hf" in err and "gptqmodel" in err
    assert not (tmp_path / "o").exists()


def test_help_says_what_each_layout_is_for(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["quantize", "--help"])
    assert exc.value.code == 0
    flat = " ".join(capsys.readouterr().out.split())
    assert "--layout {hf,gptqmodel}" in flat and "(default: hf)" in flat
    help_text = flat[flat.index("--layout {hf,gptqmodel}") :]
    assert "hf: as Hugging Face's modules, for transformers and vLLM." in help_text
    assert "gptqmodel: as GPTQModel saves them, for GPTQModel's loader" in help_text
