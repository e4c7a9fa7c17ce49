"""What the user sees while quantizing: a per-layer progress bar with ETA, then a summary table."""

from __future__ import annotations

import math
import sys

from quantize.driver import LayerResult
from quantize.pipeline import QuantizeSummary


class LayerProgress:
    """A tqdm bar over decoder layers; the postfix names the sub-step being worked on."""

    def __init__(self, num_layers: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=num_layers, unit="layer", desc="quantize", file=sys.stderr)

    def stage(self, index: int, name: str) -> None:
        # The lm_head comes after the last layer (index == num_layers) and is not a layer.
        text = name if name == "lm_head" else f"layer {index} {name}"
        self.bar.set_postfix_str(text, refresh=True)

    def layer_done(self, result: LayerResult) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def summary_table(summary: QuantizeSummary) -> str:
    """Per-layer error and time, then the size on disk against fp16 and the time per phase."""
    lines = [
        f"{'layer':>5}  {'mean rel err':>12}  {'worst Linear (rel err)':<28}  {'seconds':>8}",
    ]
    for layer in summary.layers:
        worst = max(
            layer.linears, key=lambda lin: -1.0 if math.isnan(lin.rel_error) else lin.rel_error
        )
        if math.isnan(worst.rel_error):  # RTN runs without calibration data
            worst_text, mean = "-", "-"
        else:
            worst_text = f"{worst.name.split('.')[-1]} ({worst.rel_error:.2e})"
            mean = f"{layer.mean_rel_error:.3e}"
        lines.append(f"{layer.index:>5}  {mean:>12}  {worst_text:<28}  {layer.seconds:>8.2f}")
    head = summary.lm_head
    if head is not None:
        err = "-" if math.isnan(head.rel_error) else f"{head.rel_error:.3e}"
        lines.append(f"{'head':>5}  {err:>12}  {'lm_head':<28}  {head.seconds:>8.2f}")
    lines.append(
        f"size on disk: {_mib(summary.checkpoint_bytes)} vs fp16 {_mib(summary.fp16_bytes)} "
        f"({summary.size_ratio:.1%})"
    )
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in summary.phase_seconds.items())
    lines.append(f"time: {phases}; total {sum(summary.phase_seconds.values()):.1f}s")
    if summary.peak_device_bytes is not None:
        lines.append(f"peak device memory: {_mib(summary.peak_device_bytes)}")
    return "\n".join(lines)
