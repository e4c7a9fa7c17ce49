"""`gptq-gateway quantize MODEL --out DIR`: GPTQ (or RTN) to an AutoGPTQ-compatible checkpoint."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from quantize.archspec import CHECKPOINT_LAYOUTS  # config files only: no torch for --help

# quantize.calib.DEFAULT_NSAMPLES, repeated so that --help does not import torch (a test checks).
DEFAULT_NSAMPLES = 128

DESCRIPTION = """\
Quantize a Hugging Face model (hub id, local directory, or GGUF file) layer by layer with GPTQ and
write a checkpoint that transformers, AutoGPTQ, GPTQModel, vLLM and `gptq-gateway serve` load
(Phi-3 for GPTQModel: --layout gptqmodel).
Only one decoder layer is on the device at a time; weights stream in from safetensors."""


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" for every option with a default; none for required or unset ones."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.required or action.default in (None, argparse.SUPPRESS):
            return help_text
        return super()._get_help_string(action)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="quantize a model to a 4-bit (or 2/3/8-bit) GPTQ checkpoint",
        description=DESCRIPTION,
        formatter_class=_DefaultsFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="hub id, model directory or .gguf file")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4, help="bits per weight")
    p.add_argument(
        "--group-size", type=int, choices=(32, 64, 128, -1), default=128, help="-1: per channel"
    )
    p.add_argument("--damp-percent", type=float, default=0.01, help="Hessian damping")
    p.add_argument("--desc-act", action="store_true", help="act-order: columns by Hessian size")
    p.add_argument(
        "--static-groups",
        action="store_true",
        help="with --desc-act: fix groups before GPTQ so g_idx stays in order",
    )
    p.add_argument(
        "--sym",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="symmetric grid (fixed zero point); --no-sym fits a zero point per group",
    )
    p.add_argument(
        "--true-sequential",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="quantize q/k/v, o, gate/up, down in turn on already-quantized inputs",
    )
    p.add_argument(
        "--clip-search",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="per group and row, shrink the grid's range to the smallest rounding error",
    )
    p.add_argument(
        "--method",
        choices=("gptq", "rtn"),
        default="gptq",
        help="gptq, or rtn: round to nearest without calibration",
    )
    p.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help="quantize the lm_head too, on the blocks' grid (GPTQModel's lm_head=True; its GPTQ "
        "Hessian comes from the final norm's output); refused for tied embeddings",
    )
    p.add_argument(
        "--nsamples",
        type=int,
        default=None,
        help=f"calibration windows (default: {DEFAULT_NSAMPLES}, or as many as the calibration "
        "text holds, with a warning)",
    )
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="picks the calibration windows")
    p.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="auto: cuda when available, else cpu",
    )
    p.add_argument(
        "--calib",
        metavar="c4|wikitext2|PATH",
        default=None,
        help="calibration text: c4 or wikitext2 (hub, online only) or a .txt/.jsonl file "
        "(jsonl: one {'text': ...} per line). Default: the built-in corpus, "
        "CPython's pydoc topics (calibration part, ~85k SmolLM2 tokens: 128 x 512, or 41 "
        "windows of 2048)",
    )
    p.add_argument(
        "--layout",
        choices=CHECKPOINT_LAYOUTS,
        default="hf",
        help="how the Linears are stored. hf: as Hugging Face's modules, for transformers and "
        "vLLM. gptqmodel: as GPTQModel saves them, for GPTQModel's loader (Phi-3's "
        "mlp.gate_up_proj as mlp.gate_proj + mlp.up_proj; the other families: the same as hf). "
        "gptq-gateway serves both",
    )
    p.add_argument("--lora", metavar="ADAPTER_DIR", help="merge this PEFT LoRA adapter first")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    p.add_argument(
        "--report",
        metavar="DIR",
        help="write the per-layer error table to DIR/layer_errors.json and plot it to "
        "DIR/layer_errors.png (the plot needs the [report] extra: matplotlib)",
    )
    p.set_defaults(handler=run)


def _check_out_dir(out: str, overwrite: bool) -> None:
    from quantize.errors import UserInputError

    path = Path(out)
    if path.exists() and not overwrite:
        raise UserInputError(f"output directory {out!r} already exists; pass --overwrite")
    if path.exists() and not path.is_dir():
        raise UserInputError(f"output path {out!r} exists and is not a directory")


def _check_report_dir(report: str | None) -> None:
    from quantize.errors import UserInputError

    # Checked before quantizing: finding out after an hour's run would lose the report.
    if report is not None and Path(report).exists() and not Path(report).is_dir():
        raise UserInputError(f"--report path {report!r} exists and is not a directory")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _remove_stale_staging(out: str) -> None:
    """Staging directories of killed runs for this --out go before any work starts."""
    from quantize.format import remove_stale_staging

    for path, size in remove_stale_staging(out):
        print(
            f"removed {path} ({size / 2**20:.1f} MiB), left by a quantize run that was killed",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    from quantize.calib import fit_windows, load_calibration_text, sample_windows, tokenize_text
    from quantize.driver import Quantizer, QuantizeSettings, group_size_warnings
    from quantize.errors import UserInputError
    from quantize.gptq import GPTQOptions
    from quantize.grid import QuantSpec
    from quantize.pipeline import quantize_to_checkpoint
    from quantize.progress import LayerProgress, summary_table
    from quantize.source import open_model

    _check_out_dir(args.out, args.overwrite)
    _check_report_dir(args.report)
    _remove_stale_staging(args.out)
    if (args.nsamples is not None and args.nsamples < 1) or args.seqlen < 2:
        raise UserInputError("--nsamples must be >= 1 and --seqlen >= 2")
    if not 0.0 < args.damp_percent < 1.0:
        raise UserInputError(f"--damp-percent must be in (0, 1), got {args.damp_percent}")
    if args.static_groups and not args.desc_act:
        raise UserInputError("--static-groups only matters with --desc-act; add --desc-act")
    settings = QuantizeSettings(
        spec=QuantSpec(
            bits=args.bits, group_size=args.group_size, sym=args.sym, clip_search=args.clip_search
        ),
        gptq=GPTQOptions(
            damp_percent=args.damp_percent,
            act_order=args.desc_act,
            static_groups=args.static_groups,
        ),
        method=args.method,
        true_sequential=args.true_sequential,
        device=args.device,
        quantize_lm_head=args.quantize_lm_head,
    )
    phases: dict[str, float] = {}
    t = time.perf_counter()
    source = open_model(args.model, lora=args.lora)
    quantizer = Quantizer(source, settings)  # checks architecture, shapes and device up front
    phases["load"] = time.perf_counter() - t
    for message in group_size_warnings(
        quantizer.config, settings.spec, lm_head=settings.quantize_lm_head
    ):
        _warn(message)

    calib_ids = None
    calibration: dict = {"method": args.method}
    if args.method == "gptq":
        t = time.perf_counter()
        text = load_calibration_text(args.calib)
        token_ids = tokenize_text(source.load_tokenizer(), text)
        nsamples, capped = fit_windows(int(token_ids.numel()), args.nsamples, args.seqlen)
        if capped:
            _warn(capped)
        calib_ids = sample_windows(token_ids, nsamples, args.seqlen, args.seed)
        phases["calibration text"] = time.perf_counter() - t
        calibration = {
            "source": args.calib or "builtin:pydoc_topics[calibration]",
            "text_tokens": int(token_ids.numel()),
            "nsamples": nsamples,
            "nsamples_requested": args.nsamples or DEFAULT_NSAMPLES,
            "seqlen": args.seqlen,
            "seed": args.seed,
        }
    progress = None if args.quiet else LayerProgress(quantizer.num_layers)
    try:
        summary = quantize_to_checkpoint(
            quantizer,
            calib_ids,
            args.out,
            overwrite=args.overwrite,
            layout=args.layout,
            run_info={
                "model": args.model,
                "lora": args.lora,
                "calibration": calibration,
                "phase_seconds": phases,
            },
            on_stage=None if progress is None else progress.stage,
            on_layer=None if progress is None else progress.layer_done,
        )
    finally:
        if progress is not None:
            progress.close()
        source.close()
    if not args.quiet:
        print(summary_table(summary), file=sys.stderr)
    if args.report is not None:
        from quantize.report import write_report

        written = write_report(summary, settings, args.report)
        if written.note is not None:
            _warn(written.note)  # the checkpoint and the JSON are fine; only the picture is missing
        if not args.quiet:
            paths = [p for p in (written.json_path, written.png_path) if p is not None]
            print("report: " + ", ".join(str(p) for p in paths), file=sys.stderr)
    print(summary.out_dir)
    return 0
