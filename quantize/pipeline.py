"""Model source + settings + calibration windows -> a checkpoint directory, with a report.

The quantizer yields layers as they finish and each is packed and appended to the checkpoint at
once, so neither the float model nor the quantized one is ever held whole. Everything lands in a
staging directory that is renamed into place only after the last file is written.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantize.arch import (
    EMBED_NAME,
    FINAL_NORM_NAME,
    LM_HEAD_NAME,
    LM_HEAD_PREFIX,
    layer_prefix,
)
from quantize.archspec import Dims
from quantize.archspec.spec import CheckpointLayout
from quantize.driver import (
    HeadResult,
    LayerReport,
    LayerResult,
    LinearReport,
    Quantizer,
    QuantizeSettings,
)
from quantize.format import (
    QUANTIZE_CONFIG_FILE,
    REPORT_FILE,
    CheckpointWriter,
    QuantizationFields,
    checkpoint_config,
)
from quantize.source import ModelSource

VERSION = "0.1.0"


@dataclass
class QuantizeSummary:
    out_dir: Path
    layers: list[LayerReport]
    phase_seconds: dict[str, float]
    checkpoint_bytes: int
    fp16_bytes: int
    peak_device_bytes: int | None
    info: dict[str, Any] = field(default_factory=dict)
    lm_head: LinearReport | None = None  # set when the lm_head was quantized

    @property
    def size_ratio(self) -> float:
        return self.checkpoint_bytes / self.fp16_bytes if self.fp16_bytes else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "phase_seconds": self.phase_seconds,
            "total_seconds": sum(self.phase_seconds.values()),
            "checkpoint_bytes": self.checkpoint_bytes,
            "fp16_bytes": self.fp16_bytes,
            "size_ratio_vs_fp16": self.size_ratio,
            "peak_device_bytes": self.peak_device_bytes,
            "layers": [
                {**asdict(layer), "mean_rel_error": layer.mean_rel_error} for layer in self.layers
            ],
            "lm_head": None if self.lm_head is None else asdict(self.lm_head),
            **self.info,
        }


def stored_desc_act(settings: QuantizeSettings) -> bool:
    """`desc_act` as the files say it: True only when g_idx is really out of order.

    Act-order with static groups (or one group per row) leaves g_idx = i // group_size, an
    ordinary layout; saying desc_act there only makes vLLM refuse the checkpoint.
    """
    spec, opts = settings.spec, settings.gptq
    act_order = opts.act_order and settings.method == "gptq"
    return act_order and not opts.static_groups and spec.group_size != -1


def quantization_fields(settings: QuantizeSettings, extra_meta: dict | None = None):
    spec, opts = settings.spec, settings.gptq
    # How it was quantized goes under `meta` (as GPTQModel keeps its static_groups and
    # true_sequential there); desc_act describes the stored layout only.
    meta = {
        "act_order": opts.act_order and settings.method == "gptq",
        "static_groups": opts.static_groups,
        "true_sequential": settings.true_sequential,
        **(extra_meta or {}),
    }
    return QuantizationFields(
        bits=spec.bits,
        group_size=spec.group_size,
        desc_act=stored_desc_act(settings),
        sym=spec.sym,
        damp_percent=opts.damp_percent,
        true_sequential=settings.true_sequential,
        static_groups=opts.static_groups,
        method=settings.method,
        lm_head=settings.quantize_lm_head,
        quantizer_version=VERSION,
        extra_meta=meta,
    )


def _fp16_bytes(source: ModelSource) -> int:
    """Size of the model's weights stored in fp16 (what an unquantized fp16 checkpoint holds)."""
    total = 0
    for name in source.names():
        if name == LM_HEAD_NAME and source.tied_embeddings():
            continue
        shape = source.tensor_shape(name)
        numel = 1
        for dim in shape:
            numel *= int(dim)
        total += 2 * numel
    return total


Splits = dict[str, tuple[tuple[str, ...], tuple[int, ...]]]


def layout_parts(quantizer: Quantizer, layout: CheckpointLayout) -> Splits:
    """Fused Linear name -> (its parts' names, their rows) for the Linears `layout` stores as
    their parts (the family spec's `layout_splits`: GPTQModel's Phi-3 gate_proj + up_proj)."""
    family = quantizer.arch.spec
    dims = Dims.from_config(quantizer.config)
    return {
        lin.name: (tuple(part.name for part in lin.parts), lin.split_sizes(dims))
        for lin in family.layout_splits(layout)
    }


def _write_layer(writer: CheckpointWriter, result: LayerResult, splits: Splits) -> None:
    prefix = layer_prefix(result.index)
    other = dict(result.other)
    for name, weight in result.quantized.items():  # the family's Linears (quantize.archspec)
        bias = other.pop(f"{name}.bias", None)
        if name not in splits:
            writer.add_linear(prefix + name, weight, bias)
            continue
        # Quantized as one matrix on one Hessian; GPTQ's rows are independent given it, so the
        # row blocks are exactly what quantizing each part on that Hessian gives.
        parts, sizes = splits[name]
        biases = [None] * len(parts) if bias is None else bias.split(list(sizes))
        for part, part_weight, part_bias in zip(
            parts, weight.split_rows(sizes), biases, strict=True
        ):
            writer.add_linear(prefix + part, part_weight, part_bias)
    for name, tensor in other.items():
        writer.add_fp16(prefix + name, tensor)


def quantize_to_checkpoint(
    quantizer: Quantizer,
    calib_ids: torch.Tensor | None,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    layout: CheckpointLayout = "hf",
    run_info: dict[str, Any] | None = None,
    on_stage: Callable[[int, str], None] | None = None,
    on_layer: Callable[[LayerResult], None] | None = None,
) -> QuantizeSummary:
    """Quantize every decoder layer of the quantizer's model (and its lm_head, when the settings
    say so) and write the checkpoint, its Linears named as `layout` has them
    (quantize.archspec.CHECKPOINT_LAYOUTS)."""
    source, settings = quantizer.source, quantizer.settings
    splits = layout_parts(quantizer, layout)  # a bad layout fails before any work
    device = quantizer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    info = dict(run_info or {})
    phases: dict[str, float] = dict(info.pop("phase_seconds", {}))
    reports: list[LayerReport] = []
    head_report: LinearReport | None = None
    start = time.perf_counter()
    with CheckpointWriter(out_dir, overwrite=overwrite) as writer:
        writer.add_fp16(EMBED_NAME, source.tensor(EMBED_NAME))
        write_seconds = 0.0
        for result in quantizer.run(calib_ids, on_stage=on_stage):
            t = time.perf_counter()
            if isinstance(result, HeadResult):
                writer.add_linear(LM_HEAD_PREFIX, result.quantized, None)
                write_seconds += time.perf_counter() - t
                head_report = result.report
                continue
            _write_layer(writer, result, splits)
            write_seconds += time.perf_counter() - t
            reports.append(result.report)
            if on_layer is not None:
                on_layer(result)
        phases["calibrate+quantize"] = time.perf_counter() - start - write_seconds
        t = time.perf_counter()
        writer.add_fp16(FINAL_NORM_NAME, source.tensor(FINAL_NORM_NAME))
        if not source.tied_embeddings() and head_report is None:
            writer.add_fp16(LM_HEAD_NAME, source.tensor(LM_HEAD_NAME))
        fields = quantization_fields(settings, info.get("meta"))
        model_config = source.config.to_dict()
        if not model_config.get("architectures"):
            model_config["architectures"] = [quantizer.arch.causal_lm_cls.__name__]
        writer.write_json("config.json", checkpoint_config(model_config, fields))
        writer.write_json(QUANTIZE_CONFIG_FILE, fields.quantize_config())
        source.write_tokenizer_files(writer.staging)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        checkpoint_bytes = writer.finish_weights()
        phases["write"] = write_seconds + time.perf_counter() - t
        summary = QuantizeSummary(
            out_dir=writer.out_dir,
            layers=reports,
            phase_seconds=phases,
            checkpoint_bytes=checkpoint_bytes,
            fp16_bytes=_fp16_bytes(source),
            peak_device_bytes=peak,
            lm_head=head_report,
            info={
                **info,
                "settings": {
                    "method": settings.method,
                    "true_sequential": settings.true_sequential,
                    "quantize_lm_head": settings.quantize_lm_head,
                    "layout": layout,
                    "spec": asdict(settings.spec),
                    "gptq": asdict(settings.gptq),
                },
                "device": str(device),
                "device_name": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "quantizer": f"gptq-gateway {VERSION}",
            },
        )
        writer.write_json(REPORT_FILE, summary.as_dict())
        summary.out_dir = writer.commit()
    return summary
