"""Issue 15, item 23: `quantize --report DIR` writes the per-layer error table as JSON and plot."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_quantize_cli import run_cli, write_tiny_model

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODULES = {
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
}
LAYERS = 3
CALIB = ["--nsamples", "4", "--seqlen", "64", "--device", "cpu"]
# A row of quantize/progress.py's summary table: layer, mean rel err, worst Linear (err), seconds.
TABLE_ROW = re.compile(r"^\s*(\d+)\s+(\S+)\s+(\w+) \((\S+)\)\s+([\d.]+)\s*$")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_hf_dir: Path) -> Path:
    return write_tiny_model(
        tmp_path_factory.mktemp("tiny") / "model", smollm2_hf_dir, layers=LAYERS
    )


@pytest.fixture(scope="module")
def reported_run(tiny_model: Path, tmp_path_factory) -> tuple[Path, Path, str]:
    """One real `gptq-gateway quantize --report` in a subprocess: (checkpoint, report, stderr)."""
    root = tmp_path_factory.mktemp("run")
    out, report = root / "ckpt", root / "report"
    args = ["quantize", str(tiny_model), "--out", str(out), "--report", str(report)]
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args, "--group-size", "32", "--desc-act", *CALIB],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return out, report, proc.stderr


def test_json_has_every_layer_and_module_as_the_table_shows_them(reported_run) -> None:
    out, report, stderr = reported_run
    data = json.loads((report / "layer_errors.json").read_text())
    settings = data["settings"]
    assert (settings["method"], settings["bits"], settings["group_size"]) == ("gptq", 4, 32)
    assert settings["desc_act"] is True and settings["sym"] is True
    assert data["checkpoint"] == str(out.absolute()) and data["lm_head"] is None

    layers = data["layers"]
    assert [layer["layer"] for layer in layers] == list(range(LAYERS))
    for layer in layers:
        names = [m["module"] for m in layer["modules"]]
        assert len(names) == len(MODULES) and set(names) == MODULES, names
        for m in layer["modules"]:
            assert math.isfinite(m["rel_error"]) and 0 < m["rel_error"] < 1, m

    rows = [TABLE_ROW.match(line) for line in stderr.splitlines()]
    table = {int(r[1]): r for r in rows if r is not None}
    assert sorted(table) == list(range(LAYERS)), stderr
    for layer in layers:
        row = table[layer["layer"]]
        worst = max(layer["modules"], key=lambda m: m["rel_error"])
        assert f"{layer['mean_rel_error']:.3e}" == row[2]
        assert layer["worst_module"] == worst["module"]
        assert worst["module"].split(".")[-1] == row[3]
        assert f"{worst['rel_error']:.2e}" == row[4]
        assert f"{layer['seconds']:.2f}" == row[5]
        mean = sum(m["rel_error"] for m in layer["modules"]) / len(layer["modules"])
        assert layer["mean_rel_error"] == pytest.approx(mean, rel=1e-12)

    # The same numbers as the checkpoint's own quantize_report.json.
    full = json.loads((out / "quantize_report.json").read_text())
    for ours, theirs in zip(layers, full["layers"], strict=True):
        assert [m["rel_error"] for m in ours["modules"]] == [
            lin["rel_error"] for lin in theirs["linears"]
        ]


def test_png_is_a_picture_of_the_errors(reported_run) -> None:
    _, report, stderr = reported_run
    png = report / "layer_errors.png"
    raw = png.read_bytes()
    assert raw[:8] == PNG_MAGIC and len(raw) > 5000
    from matplotlib.image import imread

    pixels = imread(png)  # decodes the whole file, so a truncated one fails here
    height, width = pixels.shape[:2]
    assert width > 400 and height > 300
    assert pixels.std() > 0.05  # lines, labels and a legend; not a blank canvas
    assert f"report: {report / 'layer_errors.json'}, {png}" in stderr


def _block_matplotlib(monkeypatch) -> None:
    # A None entry in sys.modules makes `import` raise ImportError, even for a module (or
    # submodule) that this process has imported already.
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def _summary(rel_errors: list[list[float]]):
    from quantize.driver import LayerReport, LinearReport
    from quantize.pipeline import QuantizeSummary

    layers = [
        LayerReport(
            index=i,
            seconds=0.5,
            linears=[
                LinearReport(f"mod{j}", 8, 8, rel_error=err, seconds=0.1, damp=0.01)
                for j, err in enumerate(errs)
            ],
            stage_seconds={},
        )
        for i, errs in enumerate(rel_errors)
    ]
    return QuantizeSummary(
        out_dir=Path("/ckpt"),
        layers=layers,
        phase_seconds={},
        checkpoint_bytes=1,
        fp16_bytes=2,
        peak_device_bytes=None,
        info={"model": "tiny"},
    )


def test_without_matplotlib_the_json_is_still_written(tmp_path: Path, monkeypatch) -> None:
    from quantize.driver import QuantizeSettings
    from quantize.report import write_report

    (tmp_path / "layer_errors.png").write_bytes(b"a picture from an earlier run")
    _block_matplotlib(monkeypatch)
    written = write_report(_summary([[1e-3, 2e-3], [3e-3, 4e-3]]), QuantizeSettings(), tmp_path)
    assert written.png_path is None and not (tmp_path / "layer_errors.png").exists()
    assert written.note is not None and "pip install 'gptq-gateway[report]'" in written.note
    assert "\n" not in written.note
    data = json.loads(written.json_path.read_text())
    assert [[m["rel_error"] for m in lay["modules"]] for lay in data["layers"]] == [
        [1e-3, 2e-3],
        [3e-3, 4e-3],
    ]
    assert data["layers"][1]["worst_module"] == "mod1"


def test_cli_without_matplotlib_says_how_to_get_the_plot(
    tiny_model: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    _block_matplotlib(monkeypatch)
    out, report = tmp_path / "ckpt", tmp_path / "report"
    args = ["quantize", str(tiny_model), "--out", str(out), "--report", str(report), "--quiet"]
    code, stdout, err = run_cli([*args, "--group-size", "32", *CALIB], capsys)
    assert code == 0, err
    assert stdout.strip() == str(out.absolute())
    hints = [line for line in err.splitlines() if "pip install 'gptq-gateway[report]'" in line]
    assert len(hints) == 1 and hints[0].startswith("warning: matplotlib is not installed"), err
    assert len(json.loads((report / "layer_errors.json").read_text())["layers"]) == LAYERS
    assert not (report / "layer_errors.png").exists()


def test_rtn_errors_are_null_and_nothing_is_plotted(tmp_path: Path) -> None:
    from quantize.driver import QuantizeSettings
    from quantize.report import write_report

    nan = float("nan")
    written = write_report(_summary([[nan, nan]]), QuantizeSettings(method="rtn"), tmp_path)

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    data = json.loads(written.json_path.read_text(), parse_constant=refuse)
    layer = data["layers"][0]
    assert layer["mean_rel_error"] is None and layer["worst_module"] is None
    assert [m["rel_error"] for m in layer["modules"]] == [None, None]
    assert data["settings"]["method"] == "rtn"
    assert written.png_path is None and written.note is not None and "rtn" in written.note


def test_a_report_path_that_is_a_file_is_refused_before_any_work(
    tiny_model: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "report").write_text("not a directory")
    args = ["quantize", str(tiny_model), "--out", str(tmp_path / "o")]
    code, _, err = run_cli([*args, "--report", str(tmp_path / "report"), *CALIB], capsys)
    assert code == 2 and "--report path" in err and "not a directory" in err
    assert not (tmp_path / "o").exists()
