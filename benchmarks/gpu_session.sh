#!/usr/bin/env bash
# One GPU lease's measurements, run ON THE GPU MACHINE from the repository root:
#   bash benchmarks/gpu_session.sh STAGE...
# with $OUT set (the device tool's output folder; anything else works too). First run
# scripts/prepare-gpu-carry.sh on the development machine and carry
# ["native/_native.abi3.so", ".whl", ".devcarry", "gateway/proto_gen"].
#
# Stages, in the order given (each under its own time limit, so one slow stage cannot eat the
# call; everything prints into $OUT/session.log, figures go to $OUT/<stage>.json):
#   prep       start building the checkpoints in the background (put it before a stage that
#              times nothing, such as tests)
#   tests      pytest -m gpu over the whole suite
#   attention  benchmarks/bench_attention.py --sweep (decode attention, fp16 and fp8 KV)
#   profile    benchmarks/diagnostics/step_profile.py: kernel times of decode, mixed and prefix
#              steps, 4-bit (fp16 and fp8 KV) and fp16
#   kernels    benchmarks/bench_kernels.py at 1-2048 rows (with the gemlite peer)
#   serve      benchmarks/bench_serve.py, 4-bit against fp16, c=1,64,256, shim pair, prefix case
#   serve-fp8  bench_serve, 4-bit with --kv-cache-dtype fp8 at c=64,256
#   sanitize   compute-sanitizer memcheck over every kernel, racecheck over the CUDA C++ ones
# The stages that need checkpoints build Llama-2-7B-shaped random fp16 weights and their RTN
# w4g128 quantization (4-bit lm_head) in /tmp/w once (about 2 minutes on an H100).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-session}"
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || { echo "wheel install failed" >>"$LOG"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cxx11 abi', torch._C._GLIBCXX_USE_CXX11_ABI)"
} >>"$LOG" 2>&1

checkpoints() {
  if [ -n "${PREP_PID:-}" ]; then wait "$PREP_PID"; PREP_PID=; fi
  [ -f /tmp/w/w4/quantize_config.json ] && return 0
  echo "== checkpoints" >>"$LOG"
  python3 - >>"$LOG" 2>&1 <<'EOF' || return 1
import sys
from pathlib import Path

sys.path[:0] = ["benchmarks", "."]
import bench_gpu_decode

bench_gpu_decode.write_random_fp16(Path("/tmp/w/fp16"))
EOF
  cp .devcarry/tokenizer/* /tmp/w/fp16/
  python3 -m gateway.cli quantize /tmp/w/fp16 --out /tmp/w/w4 --method rtn --bits 4 \
    --group-size 128 --device cuda --quantize-lm-head >>"$LOG" 2>&1 || return 1
  cp .devcarry/tokenizer/* /tmp/w/w4/
}

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%T), limit ${limit}s)" >>"$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "== $name rc=$?" >>"$LOG"
}

SERVE=(python3 benchmarks/bench_serve.py --w4 /tmp/w/w4 --device cuda --logs /tmp/serve-logs)
for name in "$@"; do
  case "$name" in
    prep) checkpoints & PREP_PID=$! ;;  # build the checkpoints beside the next stages
    tests) stage tests 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests ;;
    attention) stage attention 200 python3 benchmarks/bench_attention.py --sweep --json "$OUT/attention.json" ;;
    profile)
      checkpoints || continue
      stage profile-w4 200 python3 benchmarks/diagnostics/step_profile.py --checkpoint /tmp/w/w4 \
        --kv-cache-dtype auto fp8 --json "$OUT/profile_w4.json"
      stage profile-fp16 120 python3 benchmarks/diagnostics/step_profile.py \
        --checkpoint /tmp/w/fp16 --json "$OUT/profile_fp16.json" ;;
    kernels) stage kernels 240 python3 benchmarks/bench_kernels.py --rows 1 16 32 64 128 256 2048 \
      --json "$OUT/kernels.json" ;;
    serve)
      checkpoints || continue
      stage serve 420 "${SERVE[@]}" --fp16 /tmp/w/fp16 --concurrency 1,64,256 --requests-per-stream 2 --shim-concurrency 64 \
        --deadline-s 330 --json "$OUT/serve.json" ;;
    serve-fp8)
      checkpoints || continue
      stage serve-fp8 240 "${SERVE[@]}" --concurrency 64,256 --kv-cache-dtype fp8 \
        --shim-concurrency 0 --no-prefix-case --json "$OUT/serve_fp8.json" ;;
    sanitize)
      stage memcheck 300 compute-sanitizer --tool memcheck --target-processes all \
        python3 benchmarks/diagnostics/sanitize_kernels.py
      stage racecheck 240 compute-sanitizer --tool racecheck --target-processes all \
        python3 benchmarks/diagnostics/sanitize_kernels.py --fragment-only ;;
    *) echo "unknown stage $name" >>"$LOG" ;;
  esac
done
echo "== done $(date -u +%T)" >>"$LOG"
