"""The seed's table on one GPU, in one run, on Llama-2-7B-shaped random weights.

    python benchmarks/bench_gpu_decode.py --workdir /tmp/llama7b [--json PATH]
        [--no-quantize-lm-head]

1. Writes a random-weight Llama-2-7B-shaped fp16 checkpoint (hidden 4096, intermediate 11008,
   32 layers, 32 heads, vocab 32000) and quantizes it to 4-bit g128 with our own quantizer (RTN:
   speed and memory do not depend on the weights' values), the lm_head included unless
   --no-quantize-lm-head (GPTQModel's lm_head=True: ~0.19 GB less VRAM, ~5% fewer bytes per token).
2. Measures: size on disk; VRAM after load (weights, KV pool separately); batch-1 greedy decode
   tok/s over 256 new tokens for transformers FP16 `generate` (the seed's baseline), our runner in
   FP16 and our runner in 4-bit; aggregate tok/s at 8, 32 and 64 sequences; time to first token
   for a 2048-token prompt; the HBM roofline (bytes read per token / measured copy bandwidth);
   and the per-shape 4-bit matmul table of benchmarks/bench_kernels.py (against FP16 cuBLAS and
   torch's int4 kernel), so every figure of the seed's table comes from this one run.
Decode is timed at the runner level (CUDA-graph step + greedy argmax on the GPU, token fed back),
so engine scheduling is not in these figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_timing import copy_bandwidth_gbs  # noqa: E402

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "torch_dtype": "float16",
}
NEW_TOKENS = 256
PROMPT = 16


def write_random_fp16(out: Path) -> None:
    """Random N(0, 0.02) fp16 weights, one tensor at a time through our streaming writer."""
    import native

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(LLAMA2_7B, indent=1))
    cfg = LLAMA2_7B
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with native.SafetensorsWriter(out, max_shard_bytes=5 * 2**30) as writer:
        for name, shape in shapes.items():
            if len(shape) == 1:
                t = torch.ones(shape, dtype=torch.float16)
            else:
                t = (torch.randn(shape, generator=gen, device="cuda") * 0.02).half().cpu()
            writer.add(name, t.numpy())
        writer.finish()


def w4_dir_name(quantize_lm_head: bool) -> str:
    """The 4-bit checkpoint's work-dir name: keyed by the lm_head choice so that a cached
    checkpoint of the other kind is never reused for this run."""
    return "w4g128-lmhead" if quantize_lm_head else "w4g128"


def check_cached_lm_head(w4_dir: Path, quantize_lm_head: bool) -> None:
    """Refuse a cached checkpoint whose quantize_config disagrees with --quantize-lm-head."""
    config = json.loads((w4_dir / "quantize_config.json").read_text())
    if bool(config.get("lm_head", False)) != quantize_lm_head:
        raise SystemExit(
            f"{w4_dir} was quantized with lm_head={config.get('lm_head')!r}, this run wants "
            f"{quantize_lm_head}: delete it or use another --workdir"
        )


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def greedy_decode(runner, batch: int, steps: int) -> float:
    """Prefill `batch` slots with PROMPT tokens, then `steps` batched greedy steps; tokens/s."""
    gen = torch.Generator().manual_seed(batch)
    tokens = torch.empty(batch, dtype=torch.int64, device="cuda")
    for slot in range(batch):
        prompt = torch.randint(3, 32000, (PROMPT,), generator=gen).tolist()
        tokens[slot] = runner.prefill(slot, prompt).argmax()
    slots = torch.arange(batch, device="cuda")

    def run() -> None:
        nonlocal tokens
        positions = torch.full((batch,), PROMPT, dtype=torch.int64, device="cuda")
        for _ in range(steps):
            tokens = runner.decode(slots, tokens, positions).argmax(dim=-1)
            positions += 1

    seconds = timed(run, repeats=2)
    return batch * steps / seconds


def decode_row(path: Path) -> dict:
    """Load with room for 64 short sequences: VRAM, then batch-1 and aggregate decode."""
    from gateway.model.slots import SlotRunner

    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    runner = SlotRunner.load(
        path, device="cuda", num_slots=64, max_model_len=PROMPT + 2 * NEW_TOKENS
    )
    row = {"load_s": time.perf_counter() - t0}
    allocated = torch.cuda.memory_allocated() - before
    row.update(
        weights_bytes=runner.spec.weight_bytes,
        kv_pool_bytes=runner.spec.kv_pool_bytes,
        vram_after_load_without_kv_bytes=allocated - runner.spec.kv_pool_bytes,
        kernels=runner.spec.kernels,
        batch1_tok_s=greedy_decode(runner, 1, NEW_TOKENS),
    )
    for batch in (8, 32, 64):
        row[f"batch{batch}_tok_s"] = greedy_decode(runner, batch, NEW_TOKENS // 2)
    return row


def prefill_seconds(path: Path) -> float:
    """Time to first token of a 2048-token prompt (prefill + the first token's argmax)."""
    from gateway.model.slots import SlotRunner

    runner = SlotRunner.load(path, device="cuda", num_slots=1, max_model_len=2048 + 8)
    prompt = torch.randint(3, 32000, (2048,)).tolist()
    runner.prefill(0, prompt)  # warm-up
    return timed(lambda: runner.prefill(0, prompt).argmax().item())


def bench_runner(path: Path, label: str, results: dict) -> None:
    row = decode_row(path)
    gc.collect()
    torch.cuda.empty_cache()
    row["ttft_2048_s"] = prefill_seconds(path)
    gc.collect()
    torch.cuda.empty_cache()
    results[label] = row
    print(f"{label}: {json.dumps(row)}", flush=True)


def transformers_row() -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    skip = ("architectures", "torch_dtype")
    config = LlamaConfig(**{k: v for k, v in LLAMA2_7B.items() if k not in skip})
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).half().eval()
    row = {}
    for batch in (1, 32):
        ids = torch.randint(3, 32000, (batch, PROMPT), device="cuda")
        steps = NEW_TOKENS if batch == 1 else NEW_TOKENS // 2

        def run(ids=ids, steps=steps) -> None:
            model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)

        run(ids, 8)
        row[f"batch{batch}_tok_s"] = batch * steps / timed(run, repeats=1)
    ids = torch.randint(3, 32000, (1, 2048), device="cuda")
    with torch.inference_mode():
        model(ids)
        row["ttft_2048_s"] = timed(lambda: model(ids).logits[:, -1].argmax().item())
    return row


def bench_transformers(results: dict) -> None:
    results["transformers_fp16"] = transformers_row()
    print(f"transformers_fp16: {json.dumps(results['transformers_fp16'])}", flush=True)
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument(
        "--quantize-lm-head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="quantize the 4-bit checkpoint's lm_head too (`quantize --quantize-lm-head`)",
    )
    args = parser.parse_args()
    fp16_dir, w4_dir = args.workdir / "fp16", args.workdir / w4_dir_name(args.quantize_lm_head)
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    results["quantize_lm_head"] = args.quantize_lm_head
    results["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    t0 = time.perf_counter()
    if not (fp16_dir / "config.json").exists():
        write_random_fp16(fp16_dir)
    results["write_fp16_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not (w4_dir / "config.json").exists():
        head = ["--quantize-lm-head"] if args.quantize_lm_head else []
        subprocess.run(
            [sys.executable, "-m", "gateway.cli", "quantize", str(fp16_dir), "--out", str(w4_dir),
             "--method", "rtn", "--bits", "4", "--group-size", "128", "--device", "cuda", *head],
            check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    check_cached_lm_head(w4_dir, args.quantize_lm_head)
    results["quantize_rtn_s"] = time.perf_counter() - t0
    results["disk_bytes"] = {"fp16": dir_bytes(fp16_dir), "w4g128": dir_bytes(w4_dir)}
    print(json.dumps(results), flush=True)

    if not args.skip_kernels:
        from benchmarks import bench_kernels

        kernel_rows = (1, 8, 32, 2048)
        results["kernels"] = bench_kernels.run(None, list(bench_kernels.SHAPES), kernel_rows)
        gc.collect()
        torch.cuda.empty_cache()
    bench_runner(w4_dir, "ours_4bit", results)
    bench_runner(fp16_dir, "ours_fp16", results)
    if not args.skip_transformers:
        bench_transformers(results)
    w4 = results["ours_4bit"]
    bytes_per_token = w4["weights_bytes"]
    results["roofline_tok_s"] = results["copy_bandwidth_gbs"] * 1e9 / bytes_per_token
    print_table(results)
    results["command"] = " ".join(["python", *sys.argv])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def print_table(r: dict) -> None:
    gb = 1e9
    w4, f16 = r["ours_4bit"], r["ours_fp16"]
    hf = r.get("transformers_fp16", {})
    head = "4-bit" if r.get("quantize_lm_head") else "fp16"
    print(f"\n{r['device']}  copy {r['copy_bandwidth_gbs']:.0f} GB/s  4-bit lm_head: {head}")
    disk = r["disk_bytes"]
    print(f"disk: fp16 {disk['fp16'] / gb:.2f} GB, 4-bit g128 {disk['w4g128'] / gb:.2f} GB")
    print(
        f"VRAM after load without KV: 4-bit {w4['vram_after_load_without_kv_bytes'] / gb:.2f} GB, "
        f"fp16 {f16['vram_after_load_without_kv_bytes'] / gb:.2f} GB; KV pool (64 slots x "
        f"{PROMPT + 2 * NEW_TOKENS} tokens) {w4['kv_pool_bytes'] / gb:.2f} GB"
    )
    print(f"{'':28}{'transformers fp16':>18}{'ours fp16':>12}{'ours 4-bit':>12}{'4-bit/fp16':>12}")
    for key, label in (
        ("batch1_tok_s", "batch 1 tok/s"),
        ("batch8_tok_s", "8 seqs tok/s"),
        ("batch32_tok_s", "32 seqs tok/s"),
        ("batch64_tok_s", "64 seqs tok/s"),
        ("ttft_2048_s", "TTFT 2048 (s)"),
    ):
        hv = hf.get(key)
        print(
            f"{label:28}{'-' if hv is None else format(hv, '.3f' if 'ttft' in key else '.1f'):>18}"
            f"{f16[key]:12.{3 if 'ttft' in key else 1}f}{w4[key]:12.{3 if 'ttft' in key else 1}f}"
            f"{w4[key] / f16[key]:12.2f}"
        )
    print(f"roofline (weights once per token at copy bandwidth): {r['roofline_tok_s']:.0f} tok/s")


if __name__ == "__main__":
    main()
