"""Which quantization settings `gptq-gateway up` should use for its demo model (SmolLM2, CPU).

`up` quantizes the demo GGUF on first start with a small calibration budget, so that a newcomer
on a laptop waits minutes, not a quarter of an hour. This benchmark runs the quantizer exactly as
`up` does (the same `gptq-gateway quantize` command, built by gateway.up.model_cache's
QuantizeSettings.flags(), from the GGUF file, in a fresh process) for a few candidate settings at
that budget, and scores each checkpoint on the built-in held-out text against the float model in
the same run. The calibration and held-out text are bench_quantize.py's (quantize.calib keeps
them apart: held-out text is never calibrated on). Then the best setting at up's budget is rerun
with a larger budget, to price the first-start time against what more calibration buys.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_up_defaults.py [--eval-windows 24]
        [--only NAME,...] [--larger 32x256,16x512] [--seeds 1,2] [--no-answers] [--resume]
        [--json-out bench-out/up_defaults.json]

Each row also records the temperature-0 answer to one chat prompt through the server's engine
(the demo's first impression; the float model's answer comes from transformers' generate).
`--seeds` reruns the old default and the best setting with other calibration seeds, to show how
much of a difference the choice of 16 windows alone makes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_quantize import (  # noqa: E402
    OUT,
    ensure_hf_dir,
    load_average,
    run_quantize,
    smollm2_gguf,
)
from gateway.up.model_cache import QuantizeSettings  # noqa: E402

FLOAT_ROW = "float (fp32 of the GGUF)"
RTN_ROW = "rtn g128"
OLD_DEFAULT = "g128 (old default)"
PROMPT = "Name three rivers."
ANSWER_TOKENS = 64
BUDGET = {"nsamples": 16, "seqlen": 256}  # up's budget before this benchmark
CANDIDATES: dict[str, QuantizeSettings] = {
    RTN_ROW: QuantizeSettings(group_size=128, method="rtn", **BUDGET),
    OLD_DEFAULT: QuantizeSettings(group_size=128, act_order=False, **BUDGET),
    "g64": QuantizeSettings(group_size=64, act_order=False, **BUDGET),
    "act-order static g128": QuantizeSettings(group_size=128, act_order=True, **BUDGET),
    "act-order static g64": QuantizeSettings(group_size=64, act_order=True, **BUDGET),
}


def _budget_free(flags: list[str]) -> list[str]:
    """`flags` without --nsamples/--seqlen (run_quantize passes those itself)."""
    out: list[str] = []
    skip = False
    for flag in flags:
        if skip:
            skip = False
        elif flag in ("--nsamples", "--seqlen"):
            skip = True
        else:
            out.append(flag)
    return out


def chat_answer_quantized(checkpoint: Path) -> str:
    """Temperature-0 answer to PROMPT through the engine the server runs."""
    from gateway.engine import Engine, EngineConfig, GenerationRequest, SamplingParams

    config = EngineConfig(device="cpu", max_num_seqs=1, max_queue=1, max_model_len=512)
    engine = Engine.from_checkpoint(checkpoint, config)
    engine.start()
    try:
        ids = engine.apply_chat_template([{"role": "user", "content": PROMPT}])
        params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0)

        async def collect() -> str:
            stream = engine.generate(GenerationRequest("rivers", ids, params))
            return "".join([event.text async for event in stream])

        return asyncio.run(collect())
    finally:
        engine.shutdown(timeout=30.0)


@torch.inference_mode()
def chat_answer_float(model: torch.nn.Module, tokenizer) -> str:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt"
    )
    if not isinstance(ids, torch.Tensor):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    out = model.generate(ids, max_new_tokens=ANSWER_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--only", default=None, help="comma-separated candidate names")
    parser.add_argument(
        "--larger",
        default="32x256,16x512",
        help="NSAMPLESxSEQLEN budgets for the best candidate ('' for none)",
    )
    parser.add_argument("--seeds", default="", help="calibration seeds to rerun, e.g. 1,2")
    parser.add_argument("--no-answers", action="store_true", help="skip the chat answers")
    parser.add_argument("--resume", action="store_true", help="keep rows already in --json-out")
    parser.add_argument("--json-out", type=Path, default=OUT / "up_defaults.json")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from quantize.calib import heldout_text, tokenize_text
    from quantize.perplexity import perplexity
    from quantize.reference import load_dequantized_model, load_tokenizer, logits_function

    OUT.mkdir(exist_ok=True)
    gguf = smollm2_gguf()
    hf_dir = ensure_hf_dir(gguf)  # the float baseline and the tokenizer; quantize reads the GGUF
    tokenizer = load_tokenizer(str(hf_dir))
    ids = tokenize_text(tokenizer, heldout_text())

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(logits_function(model), ids, args.eval_seqlen, args.eval_windows).ppl

    result: dict = {
        "model": str(gguf),
        "calibration_text": "builtin (quantize.calib.calibration_text)",
        "eval": {
            "text": "builtin held-out (quantize.calib.heldout_text)",
            "seqlen": args.eval_seqlen,
            "windows": args.eval_windows,
            "tokens": args.eval_windows * (args.eval_seqlen - 1),
        },
        "prompt": PROMPT,
        "rows": {},
    }
    if args.resume and args.json_out.is_file():
        previous = json.loads(args.json_out.read_text())
        result["rows"] = previous.get("rows", {})
        result["commands"] = previous.get("commands", [])
    rows: dict[str, dict] = result["rows"]

    def save() -> None:
        fp = rows.get(FLOAT_ROW, {}).get("ppl")
        rtn = rows.get(RTN_ROW, {}).get("ppl")
        for row in rows.values():
            if fp is not None and "ppl" in row:
                row["increase"] = row["ppl"] - fp
                row["ratio_vs_float"] = row["ppl"] / fp
                if rtn is not None and rtn > fp:
                    row["share_of_rtn_increase"] = (row["ppl"] - fp) / (rtn - fp)
        args.json_out.write_text(json.dumps(result, indent=2))

    if FLOAT_ROW not in rows:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        rows[FLOAT_ROW] = {"ppl": ppl(model)}
        if not args.no_answers:
            rows[FLOAT_ROW]["answer"] = chat_answer_float(model, tokenizer)
        del model
        save()
    print(f"float: ppl {rows[FLOAT_ROW]['ppl']:.4f}", flush=True)

    def measure(name: str, settings: QuantizeSettings, seed: int = 0) -> None:
        if name in rows:
            return
        flags = _budget_free(settings.flags()) + (["--seed", str(seed)] if seed else [])
        out = OUT / ("ck-up-" + name.replace(" ", "_").replace("(", "").replace(")", ""))
        row = run_quantize(gguf, out, flags, settings.nsamples, settings.seqlen, threads=None)
        row["settings"] = asdict(settings)
        row["seed"] = seed
        row["ppl"] = ppl(load_dequantized_model(out, dtype=torch.float32))
        if not args.no_answers:
            start = time.perf_counter()
            row["answer"] = chat_answer_quantized(out)
            row["answer_seconds"] = time.perf_counter() - start
        rows[name] = row
        save()
        print(f"{name}: ppl {row['ppl']:.4f}, {row['wall_seconds']:.0f} s wall", flush=True)

    wanted = set(args.only.split(",")) if args.only else set(CANDIDATES)
    for name, settings in CANDIDATES.items():
        if name in wanted:
            measure(name, settings)

    gptq_rows = [n for n in CANDIDATES if n in rows and CANDIDATES[n].method == "gptq"]
    best = min(gptq_rows, key=lambda n: rows[n]["ppl"]) if gptq_rows else None
    result["best_at_up_budget"] = best
    if best is not None:
        for budget in filter(None, args.larger.split(",")):
            nsamples, seqlen = (int(x) for x in budget.split("x"))
            larger = replace(CANDIDATES[best], nsamples=nsamples, seqlen=seqlen)
            measure(f"{best}, {nsamples}x{seqlen}", larger)
        for seed in (int(s) for s in filter(None, args.seeds.split(","))):
            for name in dict.fromkeys((OLD_DEFAULT, best)):
                measure(f"{name}, seed {seed}", CANDIDATES[name], seed)

    print_table(result)
    command = "python benchmarks/bench_up_defaults.py " + " ".join(sys.argv[1:])
    result["commands"] = [*result.get("commands", []), command]
    result.update(
        {
            "host": platform.node(),
            "cpu_count": os.cpu_count(),
            "load_average_end": load_average(),
            "omp_env": {k: v for k, v in os.environ.items() if k.startswith("OMP_")},
            "torch": torch.__version__,
        }
    )
    save()
    print(f"\nwrote {args.json_out}")


def print_table(result: dict) -> None:
    print(
        "\n| setting | calibration | perplexity | vs float | share of RTN's | wall s | CPU s "
        f"| load avg |\n|{'---|' * 8}"
    )
    for name, row in result["rows"].items():
        if "ppl" not in row:
            continue
        budget = f"{row['nsamples']} x {row['seqlen']}" if "nsamples" in row else "-"
        if row.get("settings", {}).get("method") == "rtn":
            budget = "none"
        share = row.get("share_of_rtn_increase")
        wall, cpu, load = row.get("wall_seconds"), row.get("cpu_seconds"), row.get("load_average")
        print(
            f"| {name} | {budget} | {row['ppl']:.3f} | +{row.get('increase', 0.0):.3f} "
            f"(x{row.get('ratio_vs_float', 1.0):.3f}) | {'-' if share is None else f'{share:.2f}'} "
            f"| {'-' if wall is None else f'{wall:.0f}'} | {'-' if cpu is None else f'{cpu:.0f}'} "
            f"| {'-' if load is None else f'{load[0]:.1f}-{load[1]:.1f}'} |"
        )
    for name, row in result["rows"].items():
        if "answer" in row:
            print(f"\n{name}: {row['answer']!r}")


if __name__ == "__main__":
    main()
