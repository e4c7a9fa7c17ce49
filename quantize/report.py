"""`quantize --report DIR`: the per-layer error table as JSON, and as a plot of error per layer."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantize.driver import LayerReport, LinearReport, QuantizeSettings
from quantize.pipeline import QuantizeSummary

JSON_FILE = "layer_errors.json"
PNG_FILE = "layer_errors.png"
INSTALL_HINT = "pip install 'gptq-gateway[report]'"
REL_ERROR_MEANING = "||(W - Q) X||^2 / ||W X||^2 on the calibration inputs (null for rtn)"


@dataclass
class WrittenReport:
    json_path: Path
    png_path: Path | None  # None when no plot was drawn; `note` says why
    note: str | None = None


def _finite_or_none(value: float) -> float | None:
    # RTN has no calibration inputs, so its errors are NaN; JSON has no NaN, so they become null.
    return value if math.isfinite(value) else None


def _module_record(linear: LinearReport) -> dict[str, Any]:
    return {
        "module": linear.name,
        "rel_error": _finite_or_none(linear.rel_error),
        "seconds": linear.seconds,
        "out_features": linear.out_features,
        "in_features": linear.in_features,
        "damp": linear.damp,
    }


def _layer_record(layer: LayerReport) -> dict[str, Any]:
    scored = [lin for lin in layer.linears if math.isfinite(lin.rel_error)]
    worst = max(scored, key=lambda lin: lin.rel_error) if scored else None
    return {
        "layer": layer.index,
        "seconds": layer.seconds,
        "mean_rel_error": _finite_or_none(layer.mean_rel_error),
        "worst_module": None if worst is None else worst.name,
        "modules": [_module_record(lin) for lin in layer.linears],
    }


def settings_record(settings: QuantizeSettings) -> dict[str, Any]:
    """The flags that shape the errors, under the CLI's names, so runs can be compared."""
    spec, gptq = settings.spec, settings.gptq
    return {
        "method": settings.method,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "sym": spec.sym,
        "desc_act": gptq.act_order,
        "static_groups": gptq.static_groups,
        "damp_percent": gptq.damp_percent,
        "true_sequential": settings.true_sequential,
        "clip_search": spec.clip_search,
        "quantize_lm_head": settings.quantize_lm_head,
    }


def report_dict(summary: QuantizeSummary, settings: QuantizeSettings) -> dict[str, Any]:
    return {
        "model": summary.info.get("model"),
        "checkpoint": str(summary.out_dir),
        "settings": settings_record(settings),
        "calibration": summary.info.get("calibration"),
        "rel_error": REL_ERROR_MEANING,
        "layers": [_layer_record(layer) for layer in summary.layers],
        "lm_head": None if summary.lm_head is None else _module_record(summary.lm_head),
    }


def plot_layer_errors(report: dict[str, Any], path: Path) -> str | None:
    """Draw relative error per layer, one line per module; returns why not, or None once drawn."""
    try:
        # Imported here: matplotlib is an optional extra and slow to import.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return f"matplotlib is not installed, so no {PNG_FILE}; {INSTALL_HINT} gives the plot"

    layers = report["layers"]
    modules: list[str] = []  # in quantization order (q, k, v, o, gate, up, down)
    for layer in layers:
        modules += [m["module"] for m in layer["modules"] if m["module"] not in modules]
    values = [m["rel_error"] for layer in layers for m in layer["modules"]]
    if not any(v is not None for v in values):
        return f"no {PNG_FILE}: --method rtn measures no error (it has no calibration inputs)"

    # A figure and Agg canvas of our own, not pyplot: no global backend switch, no GUI, no state
    # left behind in a process that imported pyplot for something else.
    width = min(16.0, 6.0 + 0.2 * len(layers))
    fig = Figure(figsize=(width, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [layer["layer"] for layer in layers]
    for name in modules:
        ys = []
        for layer in layers:
            found = [m["rel_error"] for m in layer["modules"] if m["module"] == name]
            ys.append(found[0] if found and found[0] is not None else math.nan)
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=name)
    means = [math.nan if lay["mean_rel_error"] is None else lay["mean_rel_error"] for lay in layers]
    ax.plot(xs, means, color="black", linestyle="--", linewidth=1.5, label="mean")
    # Modules' errors differ by a decade or more (on SmolLM2, v_proj against a layer's o_proj),
    # so a log axis keeps every line readable; it needs positive values (a zero keeps it linear).
    if all(v is None or v > 0 for v in values):
        ax.set_yscale("log")
    s = report["settings"]
    group = "per channel" if s["group_size"] == -1 else f"group {s['group_size']}"
    flags = ", desc_act" if s["desc_act"] else ""
    model = str(report["model"])
    # A local path's last part names the model; the cache path before it only crowds the title.
    title_model = Path(model).name if Path(model).exists() else model
    ax.set_title(f"{title_model}: {s['method']} {s['bits']}-bit, {group}{flags}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative error  ||(W-Q)X||² / ||WX||²")
    ax.set_xticks(xs if len(xs) <= 40 else xs[:: math.ceil(len(xs) / 40)])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    fig.savefig(path, dpi=120)
    return None


def write_report(
    summary: QuantizeSummary, settings: QuantizeSettings, out_dir: str | Path
) -> WrittenReport:
    """DIR/layer_errors.json always; DIR/layer_errors.png when matplotlib is there to draw it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = report_dict(summary, settings)
    json_path = out / JSON_FILE
    # allow_nan=False: the file must stay valid JSON for tools other than Python's json module.
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    png_path = out / PNG_FILE
    # A picture left by an earlier run would contradict the JSON beside it.
    png_path.unlink(missing_ok=True)
    note = plot_layer_errors(report, png_path)
    return WrittenReport(json_path, None if note else png_path, note)
