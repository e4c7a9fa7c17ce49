"""Benchmark of native/: packing a Llama-2-7B's Linear weights and writing its 4-bit checkpoint.

Phases, each in its own child process so that its peak RSS is its own:
  pack           all 224 Linear weights (32 layers x q/k/v/o 4096x4096, gate/up 4096->11008,
                 down 11008->4096) packed to 4 bits by native.pack_qweight and by a vectorized
                 numpy packer, alternating per layer on the same codes; outputs compared.
  write-native   the checkpoint's ~3.4 GB of tensors (qweight, qzeros, scales, g_idx per Linear),
                 built in memory first, written by native.SafetensorsWriter.
  write-st       the same tensors written by safetensors.numpy.save_file (it needs the dict).
  stream-native  the realistic use: each Linear's tensors generated, added, dropped; measures
                 peak RSS growth inside the writer, above the tensors in flight (its timing is
                 informative only: the kernel flushes pages during the untimed generation).
Generation of random codes/tensors is never timed. With --fsync yes both writers end with an
fsync (ours: fsync=True; safetensors: os.fsync on its file, timed); with no, neither does.
The machine's 1-minute load average is recorded around every phase: on a shared machine the
write figures move a lot between runs, hence --repeat and medians.

    python benchmarks/bench_native.py --json bench_native.json [--fsync both] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

BITS = 4
GROUP_SIZE = 128
LLAMA2_7B_LAYERS = 32
# (name, in_features, out_features) of one Llama-2-7B decoder layer's Linear modules.
LLAMA2_7B_LINEARS = [
    ("self_attn.q_proj", 4096, 4096),
    ("self_attn.k_proj", 4096, 4096),
    ("self_attn.v_proj", 4096, 4096),
    ("self_attn.o_proj", 4096, 4096),
    ("mlp.gate_proj", 4096, 11008),
    ("mlp.up_proj", 4096, 11008),
    ("mlp.down_proj", 11008, 4096),
]
GB = 1e9
MB = 1e6


# --- helpers shared by the phases -----------------------------------------------------------


def numpy_pack_4bit(intweight: np.ndarray) -> np.ndarray:
    """The best plain-numpy 4-bit packer we found: pair codes into bytes with uint8 ops (half
    the data), then interleave the four bytes of each word with one strided copy."""
    rows, cols = intweight.shape
    pairs = intweight.reshape(rows // 2, 2, cols)
    nibbles = pairs[:, 0, :] | (pairs[:, 1, :] << 4)  # uint8 [rows/2, cols]
    words = np.empty((rows // 8, cols, 4), dtype=np.uint8)
    words[...] = nibbles.reshape(rows // 8, 4, cols).transpose(0, 2, 1)
    return words.view("<u4").reshape(rows // 8, cols).view(np.int32)


def linears(layers: int) -> Iterator[tuple[int, int, str, int, int]]:
    for layer in range(layers):
        for index, (name, in_features, out_features) in enumerate(LLAMA2_7B_LINEARS):
            yield layer, index, f"model.layers.{layer}.{name}", in_features, out_features


def random_codes(rng: np.random.Generator, in_features: int, out_features: int) -> np.ndarray:
    codes = rng.integers(0, 256, size=(in_features, out_features), dtype=np.uint8)
    codes &= (1 << BITS) - 1
    return codes


def checkpoint_tensors(
    layer: int, index: int, prefix: str, in_features: int, out_features: int
) -> dict[str, np.ndarray]:
    """One Linear's tensors in the AutoGPTQ layout; seeded, so every phase sees the same bytes."""
    rng = np.random.default_rng([layer, index])
    groups = in_features // GROUP_SIZE

    def random_int32(shape: tuple[int, int]) -> np.ndarray:
        return np.frombuffer(rng.bytes(shape[0] * shape[1] * 4), dtype=np.int32).reshape(shape)

    return {
        f"{prefix}.qweight": random_int32((in_features * BITS // 32, out_features)),
        f"{prefix}.qzeros": random_int32((groups, out_features * BITS // 32)),
        f"{prefix}.scales": rng.random((groups, out_features), dtype=np.float32).astype(np.float16),
        f"{prefix}.g_idx": (np.arange(in_features, dtype=np.int32) // GROUP_SIZE),
    }


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


# --- phases (run in child processes) ---------------------------------------------------------


def phase_pack(layers: int, _out: Path, _fsync: bool) -> dict:
    import native

    rss_before = rss_bytes("VmRSS")
    reset_peak_rss()
    native_s = numpy_s = 0.0
    code_bytes = packed_bytes = 0
    largest_in_flight = 0
    for layer, index, _, in_features, out_features in linears(layers):
        codes = random_codes(np.random.default_rng([layer, index, 1]), in_features, out_features)
        # Alternate who goes first so that cache warmth and machine noise even out.
        order = ("native", "numpy") if (layer * 7 + index) % 2 == 0 else ("numpy", "native")
        results = {}
        for who in order:
            start = time.perf_counter()
            if who == "native":
                results[who] = native.pack_qweight(codes, BITS)
                native_s += time.perf_counter() - start
            else:
                results[who] = numpy_pack_4bit(codes)
                numpy_s += time.perf_counter() - start
        if not np.array_equal(results["native"], results["numpy"]):
            raise AssertionError(f"packers disagree on layer {layer} linear {index}")
        code_bytes += codes.nbytes
        packed_bytes += results["native"].nbytes
        largest_in_flight = max(largest_in_flight, codes.nbytes + 2 * results["native"].nbytes)
        del codes, results
    return {
        "linears": layers * len(LLAMA2_7B_LINEARS),
        "input_bytes": code_bytes,
        "output_bytes": packed_bytes,
        "native_s": native_s,
        "numpy_s": numpy_s,
        "native_gb_s": code_bytes / native_s / GB,
        "numpy_gb_s": code_bytes / numpy_s / GB,
        "speedup": numpy_s / native_s,
        "peak_rss_above_start_mb": (rss_bytes("VmHWM") - rss_before) / MB,
        "largest_in_flight_mb": largest_in_flight / MB,
    }


def all_tensors(layers: int) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for layer, index, prefix, in_features, out_features in linears(layers):
        tensors.update(checkpoint_tensors(layer, index, prefix, in_features, out_features))
    return tensors


def phase_write_native(layers: int, out: Path, fsync: bool) -> dict:
    import native

    tensors = all_tensors(layers)
    in_flight = sum(t.nbytes for t in tensors.values())
    rss_before = rss_bytes("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    with native.SafetensorsWriter(out, fsync=fsync) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    seconds = time.perf_counter() - start
    return {
        "tensor_bytes": in_flight,
        "file_bytes": tree_bytes(out),
        "seconds": seconds,
        "gb_s": in_flight / seconds / GB,
        "peak_rss_above_in_flight_mb": (rss_bytes("VmHWM") - rss_before) / MB,
    }


def phase_write_safetensors(layers: int, out: Path, fsync: bool) -> dict:
    import safetensors.numpy

    tensors = all_tensors(layers)
    in_flight = sum(t.nbytes for t in tensors.values())
    rss_before = rss_bytes("VmRSS")
    reset_peak_rss()
    path = out / "model.safetensors"
    start = time.perf_counter()
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    if fsync:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    seconds = time.perf_counter() - start
    return {
        "tensor_bytes": in_flight,
        "file_bytes": tree_bytes(out),
        "seconds": seconds,
        "gb_s": in_flight / seconds / GB,
        "peak_rss_above_in_flight_mb": (rss_bytes("VmHWM") - rss_before) / MB,
    }


def phase_stream_native(layers: int, out: Path, fsync: bool) -> dict:
    import native

    rss_before = rss_bytes("VmRSS")
    reset_peak_rss()
    total = 0
    largest_in_flight = 0
    writer_s = 0.0
    # Peak growth while inside the writer, the tensors in flight being resident already.
    growth_in_writer = 0
    with native.SafetensorsWriter(out, fsync=fsync) as writer:
        for layer, index, prefix, in_features, out_features in linears(layers):
            tensors = checkpoint_tensors(layer, index, prefix, in_features, out_features)
            size = sum(t.nbytes for t in tensors.values())
            largest_in_flight = max(largest_in_flight, size)
            overall_peak = rss_bytes("VmHWM")
            resident = rss_bytes("VmRSS")
            reset_peak_rss()
            start = time.perf_counter()
            for name, tensor in tensors.items():
                writer.add(name, tensor)
            writer_s += time.perf_counter() - start
            growth_in_writer = max(growth_in_writer, rss_bytes("VmHWM") - resident)
            total += size
            del tensors
            # Keep the overall peak: reset_peak_rss() above forgot it.
            overall_peak = max(overall_peak, rss_bytes("VmHWM"))
        resident = rss_bytes("VmRSS")
        reset_peak_rss()
        start = time.perf_counter()
    writer_s += time.perf_counter() - start  # finish(): last header, fsync, rename
    growth_in_writer = max(growth_in_writer, rss_bytes("VmHWM") - resident)
    return {
        "tensor_bytes": total,
        "file_bytes": tree_bytes(out),
        "seconds_in_writer": writer_s,
        "largest_in_flight_mb": largest_in_flight / MB,
        "peak_rss_above_start_mb": (max(overall_peak, rss_bytes("VmHWM")) - rss_before) / MB,
        "peak_rss_above_in_flight_mb": growth_in_writer / MB,
    }


PHASES = {
    "pack": phase_pack,
    "write-native": phase_write_native,
    "write-st": phase_write_safetensors,
    "stream-native": phase_stream_native,
}


# --- orchestration ---------------------------------------------------------------------------


def device() -> dict:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    total_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(total_mem / GB, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def run_phase(phase: str, layers: int, work_dir: Path, fsync: bool) -> dict:
    out = work_dir / phase
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    os.sync()  # earlier phases' dirty pages must not be flushed on this phase's time
    load_before = os.getloadavg()[0]
    command = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--layers",
        str(layers),
        "--out-dir",
        str(out),
        "--fsync",
        "yes" if fsync else "no",
    ]
    child = subprocess.run(command, capture_output=True, text=True, check=False)
    shutil.rmtree(out, ignore_errors=True)
    if child.returncode != 0:
        raise RuntimeError(f"phase {phase} failed:\n{child.stderr}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["load_avg_1min_before"] = load_before
    result["load_avg_1min_after"] = os.getloadavg()[0]
    return result


def write_comparison(layers: int, work_dir: Path, fsync: bool, repeat: int) -> dict:
    """Both writers `repeat` times, alternating who goes first; medians summarize."""
    runs: dict[str, list[dict]] = {"write-native": [], "write-st": []}
    for r in range(repeat):
        order = ["write-native", "write-st"] if r % 2 == 0 else ["write-st", "write-native"]
        for phase in order:
            runs[phase].append(run_phase(phase, layers, work_dir, fsync))
    summary = {}
    for phase, results in runs.items():
        summary[phase] = {
            "seconds": statistics.median(r["seconds"] for r in results),
            "gb_s": statistics.median(r["gb_s"] for r in results),
            "peak_rss_above_in_flight_mb": max(r["peak_rss_above_in_flight_mb"] for r in results),
            "runs": results,
        }
    summary["ratio"] = summary["write-native"]["gb_s"] / summary["write-st"]["gb_s"]
    summary["stream-native"] = run_phase("stream-native", layers, work_dir, fsync)
    return summary


def print_table(report: dict) -> None:
    pack = report["pack"]
    print(
        f"\nnative packing and safetensors I/O: {report['device']['cpu']}, "
        f"{report['device']['cores']} cores"
    )
    print(
        f"{'what':44} {'seconds':>8} {'GB/s':>7} {'base s':>8} {'base GB/s':>9} "
        f"{'ratio':>6} {'RSS+ MB':>8}"
    )
    label = f"pack_qweight, {pack['linears']} Linear (vs numpy packer)"
    print(
        f"{label:44} {pack['native_s']:8.2f} "
        f"{pack['native_gb_s']:7.2f} {pack['numpy_s']:8.2f} {pack['numpy_gb_s']:9.2f} "
        f"{pack['speedup']:6.2f} {pack['peak_rss_above_start_mb']:8.0f}"
    )
    for mode, rows in report["write"].items():
        ours, theirs = rows["write-native"], rows["write-st"]
        label = f"SafetensorsWriter {mode} (vs save_file)"
        print(
            f"{label:44} {ours['seconds']:8.2f} {ours['gb_s']:7.2f} {theirs['seconds']:8.2f} "
            f"{theirs['gb_s']:9.2f} {rows['ratio']:6.2f} "
            f"{ours['peak_rss_above_in_flight_mb']:8.0f}"
        )
        stream = rows["stream-native"]
        label = f"  streaming {mode}: RSS above in flight"
        print(
            f"{label:44} {stream['seconds_in_writer']:8.2f} {'':7} {'':8} {'':9} {'':6} "
            f"{stream['peak_rss_above_in_flight_mb']:8.0f}"
        )
        print(
            f"{'  save_file ' + mode + ': RSS above in flight':44} {'':8} {'':7} {'':8} "
            f"{'':9} {'':6} {theirs['peak_rss_above_in_flight_mb']:8.0f}"
        )
    print("RSS+ = peak RSS above the tensors in flight (pack: above the start).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--layers", type=int, default=LLAMA2_7B_LAYERS)
    parser.add_argument("--fsync", choices=["yes", "no", "both"], default="both")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each writer per mode (median reported)"
    )
    parser.add_argument("--work-dir", type=Path, help="where the checkpoints go (default: /tmp)")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:  # child process
        result = PHASES[args.phase](args.layers, args.out_dir, args.fsync == "yes")
        print(json.dumps(result))
        return

    modes = {"yes": [True], "no": [False], "both": [False, True]}[args.fsync]
    work_dir = Path(tempfile.mkdtemp(prefix="bench_native_", dir=args.work_dir))
    try:
        report: dict = {
            "benchmark": "bench_native",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "device": device(),
            "shape": f"Llama-2-7B: {args.layers} layers x 7 Linear, {BITS}-bit, group {GROUP_SIZE}",
            "pack": run_phase("pack", args.layers, work_dir, False),
            "write": {},
        }
        for fsync in modes:
            report["write"]["fsync" if fsync else "no-fsync"] = write_comparison(
                args.layers, work_dir, fsync, args.repeat
            )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
