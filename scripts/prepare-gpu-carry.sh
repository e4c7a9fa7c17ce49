#!/usr/bin/env bash
# Run HERE (the development machine, online to PyPI) before a GPU lease: fills the two ignored
# folders that a device call carries, so benchmarks/gpu_session.sh runs on a machine without network.
#   .whl/                 wheels for Python 3.12 x86-64 of what the GPU machine lacks (the gRPC
#                         stack, the REST shim, xgrammar, gguf, pytest, the openai client, and
#                         gemlite), at the versions of this checkout's .venv, so the generated
#                         gRPC code matches.
#   .devcarry/tokenizer/  SmolLM2's tokenizer cut to ids below 32,000, for the Llama-2-7B-shaped
#                         random checkpoints (vocab 32,000) that the GPU benchmarks serve.
# Carry them with: ["native/_native.abi3.so", ".whl", ".devcarry", "gateway/proto_gen"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "run scripts/test.sh (or README's set-up) first: no .venv" >&2; exit 1; }

PACKAGES='grpcio|grpcio-health-checking|grpcio-reflection|protobuf|uvloop|fastapi|starlette|pydantic|pydantic_core|annotated-types|typing-inspection|typing_extensions|anyio|sniffio|uvicorn|h11|click|prometheus_client|xgrammar|apache-tvm-ffi|platformdirs|gguf|pytest|pluggy|iniconfig|hypothesis|sortedcontainers|openai|jiter'
LIST=$(mktemp)
"$PY" -m pip freeze | grep -iE "^($PACKAGES)==" > "$LIST"
PLATFORMS=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 any; do
  PLATFORMS+=(--platform "$p")
done
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl -r "$LIST"
rm -f "$LIST"
# gemlite, bench_kernels' Triton peer: an sdist on PyPI, so built into a wheel here (its needs,
# numpy, tqdm and triton, are on the GPU machine already).
python3 -m pip wheel -q --no-deps gemlite==0.6.0.post2 -w .whl

mkdir -p .devcarry
"$PY" - <<'EOF'
import json
from pathlib import Path

from transformers import AutoTokenizer

from gateway.up.model_cache import demo_gguf

gguf = demo_gguf()
out = Path(".devcarry/tokenizer")
AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
data = json.loads((out / "tokenizer.json").read_text())
vocab = {piece: i for piece, i in data["model"]["vocab"].items() if i < 32000}
data["model"]["vocab"] = vocab
data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < 32000]


def parts(merge):
    return merge.split(" ") if isinstance(merge, str) else merge


# A merge survives only if both halves and their join are still pieces of the cut vocabulary.
data["model"]["merges"] = [
    m for m in data["model"]["merges"] if all(p in vocab for p in parts(m)) and "".join(parts(m)) in vocab
]
(out / "tokenizer.json").write_text(json.dumps(data))
print(f"{out}: {len(vocab)} pieces, {len(data['model']['merges'])} merges")
EOF
du -sh .whl .devcarry
