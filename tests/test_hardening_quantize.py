"""Issue 15, items 11, 15, 18 and 22: killed runs, offline defaults, --help defaults, act-order
flags other tools accept, and the group-size warning."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_quantize_cli import SMALL_CALIB, run_cli, write_tiny_model

from quantize.errors import UserInputError


def _kill_and_reap(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"quantize exited early ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


# --- item 18: --help shows the defaults ---------------------------------------------------------


def test_help_shows_the_defaults_of_every_option() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "quantize", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    flat = " ".join(out.split())
    for option, default in (
        ("--bits {2,3,4,8}", "4"),
        ("--sym, --no-sym", "True"),
        ("--method {gptq,rtn}", "gptq"),
        ("--device {auto,cuda,cpu}", "auto"),
        ("--group-size {32,64,128,-1}", "128"),
        ("--seqlen SEQLEN", "2048"),
        ("--nsamples NSAMPLES", "128"),
    ):
        match = re.search(re.escape(option) + r" (.*?)\(default: ([^,)]+)", flat)
        assert match is not None, f"{option}: no default in --help"
        assert match.group(2) == default, (option, match.group(2))
    assert "(default: None)" not in flat  # required/unset options say nothing, not "None"


def test_cli_default_nsamples_matches_calib() -> None:
    from quantize import calib, cli_quantize

    assert cli_quantize.DEFAULT_NSAMPLES == calib.DEFAULT_NSAMPLES


# --- item 15: the defaults work offline on the demo model --------------------------------------


def test_default_window_count_is_capped_to_the_builtin_corpus(smollm2_hf_dir: Path) -> None:
    from quantize.calib import (
        DEFAULT_NSAMPLES,
        calibration_text,
        fit_windows,
        sample_windows,
        tokenize_text,
    )
    from quantize.source import open_model

    source = open_model(str(smollm2_hf_dir))
    ids = tokenize_text(source.load_tokenizer(), calibration_text())
    total = int(ids.numel())
    assert total < DEFAULT_NSAMPLES * 2048  # why the cap exists: ~85k tokens
    nsamples, warning = fit_windows(total, None, 2048)
    assert nsamples == total // 2048 and nsamples >= 32
    assert warning is not None and f"{nsamples} windows of 2048" in warning and "--calib" in warning
    windows = sample_windows(ids, nsamples, 2048, 0)
    assert windows.shape == (nsamples, 2048)
    # Enough text: the default stands, silently; an explicit count is never lowered.
    assert fit_windows(total, None, 512) == (DEFAULT_NSAMPLES, None)
    assert fit_windows(total, 200, 2048) == (200, None)
    with pytest.raises(UserInputError, match="calibration text is too short"):
        sample_windows(ids, 200, 2048, 0)
    with pytest.raises(UserInputError, match="less than one --seqlen 4096 window"):
        fit_windows(4000, None, 4096)


def test_defaults_on_the_demo_gguf_get_past_calibration_and_a_killed_run_is_cleaned(
    smollm2_gguf: Path, smollm2_hf_dir: Path, tmp_path: Path, capsys
) -> None:
    """`quantize <demo gguf> --out DIR` with every default: it caps the windows with a warning
    and starts quantizing (a whole CPU run takes far too long for a test, so it is SIGKILLed in
    layer 0); the next run for DIR removes the dead run's staging directory (item 11)."""
    out = tmp_path / "ckpt"
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "quantize", str(smollm2_gguf), "--out", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )
        try:
            _wait_for(lambda: "layer 0" in stderr_path.read_text(), proc, "layer 0 to start")
        finally:
            _kill_and_reap(proc)
    err = stderr_path.read_text()
    assert "calibration text is too short" not in err
    assert re.search(r"warning: the calibration text has \d+ tokens: \d+ windows of 2048 fit", err)
    partial = tmp_path / f".ckpt.partial-{proc.pid}"
    assert partial.is_dir() and (partial / ".incomplete").is_file()
    assert not (partial / "config.json").exists()

    tiny = write_tiny_model(tmp_path / "tiny", smollm2_hf_dir)
    code, _, err = run_cli(["quantize", str(tiny), "--out", str(out), *SMALL_CALIB], capsys)
    assert code == 0, err
    assert f"removed {partial}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "stderr.txt", "tiny"]


# --- item 11: killed runs --------------------------------------------------------------------

KILL_AT_COMMIT = textwrap.dedent(
    """
    import os, signal, sys
    from quantize.format import CheckpointWriter
    from gateway.cli import main

    def killed(self):  # SIGKILL at the last moment before the rename: nothing can clean up
        os.kill(os.getpid(), signal.SIGKILL)

    CheckpointWriter.commit = killed
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_run_killed_before_the_rename_leaves_nothing_loadable(
    smollm2_hf_dir: Path, tmp_path: Path, capsys
) -> None:
    from quantize.format import is_checkpoint, read_checkpoint_info

    tiny = write_tiny_model(tmp_path / "tiny", smollm2_hf_dir)
    out = tmp_path / "ckpt"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            KILL_AT_COMMIT,
            "quantize",
            str(tiny),
            "--out",
            str(out),
            *SMALL_CALIB,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (partial,) = tmp_path.glob(".ckpt.partial-*")
    names = {p.name for p in partial.iterdir()}
    # Weights, tokenizer and report are all there, but not the configs, and the marker is.
    assert {"model.safetensors", "tokenizer.json", ".incomplete"} <= names
    assert not names & {"config.json", "quantize_config.json"}
    assert not is_checkpoint(partial)
    with pytest.raises(UserInputError, match="unfinished checkpoint"):
        read_checkpoint_info(partial)
    assert not out.exists()

    # A live process's staging directory is left alone; a dead one's goes.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".ckpt.partial-{sleeper.pid}"
        busy.mkdir()
        code, _, err = run_cli(["quantize", str(tiny), "--out", str(out), *SMALL_CALIB], capsys)
        assert code == 0, err
        assert not partial.exists() and f"removed {partial}" in err
        assert busy.is_dir()
    finally:
        _kill_and_reap(sleeper)
    assert is_checkpoint(out) and not (out / ".incomplete").exists()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4


# --- item 22: act-order that vLLM accepts, and the group-size warning -------------------------


def _quant_configs(out: Path) -> tuple[dict, dict]:
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    return config, json.loads((out / "quantize_config.json").read_text())


@pytest.mark.parametrize(
    ("flags", "desc_act", "trivial_g_idx"),
    [
        (["--desc-act"], True, False),
        (["--desc-act", "--static-groups"], False, True),
        (["--desc-act", "--group-size", "-1"], False, True),
    ],
)
def test_desc_act_is_true_only_when_g_idx_is_permuted_and_our_loader_agrees(
    smollm2_hf_dir: Path,
    tmp_path: Path,
    capsys,
    flags: list[str],
    desc_act: bool,
    trivial_g_idx: bool,
) -> None:
    from gateway.model.slots import SlotRunner
    from quantize.format import CheckpointTensors

    tiny = write_tiny_model(tmp_path / "tiny", smollm2_hf_dir)
    out = tmp_path / "ckpt"
    args = ["quantize", str(tiny), "--out", str(out), "--group-size", "32", *flags]
    code, _, err = run_cli([*args, *SMALL_CALIB], capsys)
    assert code == 0, err
    for quant in _quant_configs(out):
        assert quant["desc_act"] is desc_act
        assert quant["meta"]["act_order"] is True  # how it was quantized is still recorded
        assert quant["meta"]["static_groups"] is ("--static-groups" in flags)
    tensors = CheckpointTensors(out)
    g_idx = torch.from_numpy(tensors.get("model.layers.0.self_attn.q_proj.g_idx"))
    width = 32 if "-1" not in flags else 64
    assert torch.equal(g_idx, torch.arange(64, dtype=torch.int32) // width) == trivial_g_idx

    # Our loader reads the layout from g_idx, whatever desc_act says: same logits either way.
    runner = SlotRunner.load(out, num_slots=1, max_model_len=32)
    assert (runner.weights.layers[0].down_proj.perm is not None) == (not trivial_g_idx)
    assert runner.spec.quantization["desc_act"] is desc_act
    assert torch.isfinite(runner.forward_logits(torch.arange(12)[None] * 7)).all()


def test_group_size_that_does_not_divide_in_features_warns_and_names_vllm(
    smollm2_hf_dir: Path, tmp_path: Path, capsys
) -> None:
    from transformers import AutoConfig

    from quantize.driver import group_size_warnings
    from quantize.grid import QuantSpec

    smollm2 = AutoConfig.from_pretrained(smollm2_hf_dir)  # 576 inputs: 4.5 groups of 128
    (message,) = group_size_warnings(smollm2, QuantSpec(group_size=128))
    assert "self_attn.q_proj (576)" in message and "mlp.down_proj" not in message  # 1536 is fine
    assert "vLLM refuses it" in message and 'backend="torch"' in message
    assert group_size_warnings(smollm2, QuantSpec(group_size=64)) == []
    assert group_size_warnings(smollm2, QuantSpec(group_size=-1)) == []

    tiny = write_tiny_model(tmp_path / "tiny", smollm2_hf_dir, hidden_size=96)
    args = ["quantize", str(tiny), "--out", str(tmp_path / "o"), "--group-size", "64"]
    code, _, err = run_cli([*args, *SMALL_CALIB], capsys)
    assert code == 0, err
    assert "warning: --group-size 64 does not divide in_features" in err and "vLLM" in err
    code, _, err = run_cli(
        [*args[:3], str(tmp_path / "o2"), "--group-size", "32", *SMALL_CALIB], capsys
    )
    assert code == 0, err
    assert "does not divide" not in err
