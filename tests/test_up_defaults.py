"""`gptq-gateway up`'s first-quantization defaults: the settings BENCHMARKS.md chose by held-out
perplexity ("up's quantization defaults (SmolLM2, CPU)"), passed to `gptq-gateway quantize` as
such, and part of the cache key so that a checkpoint quantized with the old defaults is not served
under the new ones. No model is loaded or quantized here: the quantizer is a stand-in.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gateway.cli import build_parser
from gateway.cli_up import quantize_settings
from gateway.up import model_cache
from gateway.up.model_cache import ModelSource, QuantizeSettings

# Chosen in BENCHMARKS.md; the old defaults are what `up` used before (issue 15, item 20).
CHOSEN = {"bits": 4, "group_size": 64, "act_order": True, "nsamples": 16, "seqlen": 256}
OLD = QuantizeSettings(bits=4, group_size=128, nsamples=16, seqlen=256, method="gptq")


def _up_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["up", *argv])


def _quantize_args(command: list[str]) -> argparse.Namespace:
    """What `gptq-gateway quantize` makes of the command `up` runs."""
    return build_parser().parse_args(command[command.index("gateway.cli") + 1 :])


def _fake_gguf(tmp_path: Path) -> ModelSource:
    gguf = tmp_path / "demo.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    return model_cache.resolve(str(gguf))


def _write_checkpoint(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text('{"quantization_config": {"quant_method": "gptq"}}')


@pytest.fixture
def quantize_commands(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The commands model_cache.QuantizeRunner starts; each "run" writes a stand-in checkpoint."""
    commands: list[list[str]] = []

    class FakePopen:
        def __init__(self, command: list[str], **_: object) -> None:
            commands.append(command)
            _write_checkpoint(Path(command[command.index("--out") + 1]))

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(model_cache.subprocess, "Popen", FakePopen)
    return commands


def test_up_defaults_are_the_measured_choice() -> None:
    settings = quantize_settings(_up_args())
    assert settings == QuantizeSettings()
    assert {key: getattr(settings, key) for key in CHOSEN} == CHOSEN
    assert settings.method == "gptq"


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "weights per scale, -1: per channel [64]" in text
    assert "--act-order, --no-act-order" in text and "--static-groups) [on]" in text
    assert "calibration windows [16: quick on a CPU]" in text
    assert "tokens per window [256]" in text


def test_the_quantize_command_carries_the_defaults(
    tmp_path: Path, quantize_commands: list[list[str]]
) -> None:
    source = _fake_gguf(tmp_path)
    settings = quantize_settings(_up_args())
    runner = model_cache.QuantizeRunner()
    checkpoint, fresh = model_cache.ensure_checkpoint(
        source, settings, tmp_path / "cache", "cpu", runner
    )
    assert fresh and model_cache.is_gptq_checkpoint(checkpoint)
    [command] = quantize_commands
    args = _quantize_args(command)
    assert args.command == "quantize" and args.model == source.location
    assert (args.bits, args.group_size, args.nsamples, args.seqlen) == (4, 64, 16, 256)
    assert args.method == "gptq" and args.desc_act and args.static_groups


def test_flags_turn_act_order_off_and_rtn_drops_it() -> None:
    off = quantize_settings(_up_args("--no-act-order", "--group-size", "128"))
    assert not off.act_order
    assert "--desc-act" not in off.flags() and "--static-groups" not in off.flags()
    rtn = quantize_settings(_up_args("--method", "rtn"))
    assert not rtn.act_order and "--desc-act" not in rtn.flags()  # RTN has no column order


def test_old_defaults_checkpoint_is_not_reused(
    tmp_path: Path, quantize_commands: list[list[str]]
) -> None:
    source = _fake_gguf(tmp_path)
    cache = tmp_path / "cache"
    new = quantize_settings(_up_args())
    assert model_cache.cache_key(source, OLD) != model_cache.cache_key(source, new)
    assert model_cache.cache_key(source, new) != model_cache.cache_key(
        source, QuantizeSettings(**{**CHOSEN, "act_order": False})
    )
    # A checkpoint cached by the old defaults is left alone: the new ones quantize afresh.
    old_checkpoint = model_cache.cached_checkpoint(source, OLD, cache)
    _write_checkpoint(old_checkpoint)
    runner = model_cache.QuantizeRunner()
    checkpoint, fresh = model_cache.ensure_checkpoint(source, new, cache, "cpu", runner)
    assert fresh and checkpoint != old_checkpoint and len(quantize_commands) == 1
    # ... and the next start reuses the new one.
    again, fresh = model_cache.ensure_checkpoint(source, new, cache, "cpu", runner)
    assert again == checkpoint and not fresh and len(quantize_commands) == 1
