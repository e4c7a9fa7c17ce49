"""The checkpoint contract (docs/ARCHITECTURE.md, Contracts §2): names, config fields, packing.

A checkpoint is a directory that Hugging Face tooling already understands:

- config.json with `quantization_config` (quant_method "gptq", bits, group_size, desc_act, sym,
  damp_percent, true_sequential, static_groups, checkpoint_format "gptq"), and
  quantize_config.json with AutoGPTQ's fields (AutoGPTQ and GPTQModel read this one); desc_act is
  true only when g_idx is permuted, and `meta` records how it was quantized (act_order, ...);
- tokenizer files, chat template, generation_config.json, copied from the source model;
- model.safetensors, or shards plus model.safetensors.index.json, written by native's
  SafetensorsWriter one tensor at a time as layers finish.

Per quantized Linear `<prefix>`:
  qweight int32 [in*bits/32, out]    integers packed along the input dimension (AutoGPTQ order)
  qzeros  int32 [groups, out*bits/32] zero points, "v1": each stored as zero - 1
  scales  fp16  [groups, out]
  g_idx   int32 [in]                  group of each input column (act-order makes it unordered)
  bias    fp16  [out]                 when the Linear has one
groups = ceil(in / group_size), the last one possibly shorter; group_size -1 means one group.
Everything else (embeddings, norms, an untied lm_head) is fp16 under its Hugging Face name; with
`--quantize-lm-head` the untied lm_head is a packed Linear `lm_head` too and both configs say
`"lm_head": true` (GPTQModel's convention).
Weight = scales[g_idx[i], o] * (int[i, o] - zero[g_idx[i], o]).
Linear names are Hugging Face's modules' ("hf" layout, what transformers' GPTQ loading builds);
`convert_layout` rewrites a checkpoint into GPTQModel's ("gptqmodel": Phi-3's gate_up_proj stored
as gate_proj + up_proj, FamilySpec.gptqmodel_unfused) or back.

Zero points of 0 (asymmetric grids only). The v1 layout stores zero - 1, so a zero of 0 has no
field value of its own. We do exactly what GPTQModel does when it saves format "gptq" (its
v2 -> v1 conversion): for 2, 4 and 8 bits it packs the true zeros and subtracts the packed
constant (0x11111111 for 4 bits: one per field) from each int32 word modulo 2**32, so a 0 zero
borrows from the field above it; for 3 bits, whose fields straddle words, it subtracts 1 per field
modulo 2**3 (current GPTQModel, `_shift_gptq_qzeros`; releases before it subtracted whole-word
constants for 3 bits too, which misreads the straddling fields). Fields whose zero is >= 1 come
out exactly as AutoGPTQ's `zero - 1` packing, so
symmetric checkpoints (zeros 2**(bits-1)) and every asymmetric group without a 0 zero are plain
v1. Readers that undo it the same way (GPTQModel's v1 -> v2 conversion, and `unpack_zeros` here)
recover every zero exactly; readers that add 1 per field (AutoGPTQ's kernels, native's
`unpack_qzeros`) misread only the 0 zeros and, for 2/4/8 bits, the field above each, which is the
"~<=13% overflow" GPTQModel documents for asymmetric v1 checkpoints. The alternative, clamping
zeros to >= 1 in the quantizer, would change the grid of those groups for every reader.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantize.errors import UserInputError
from quantize.qtensor import QuantizedWeight

CHECKPOINT_FORMAT = "gptq"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
REPORT_FILE = "quantize_report.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
QUANTIZER_NAME = "gptq-gateway"
# In a staging directory until the rename: tells readers (and people) it is not a checkpoint.
INCOMPLETE_MARKER = ".incomplete"
# Written last, just before the rename, so a killed run never leaves a loadable-looking directory.
LAST_FILES = (CONFIG_FILE, QUANTIZE_CONFIG_FILE)
DEFAULT_MAX_SHARD_BYTES = 4 << 30
LINEAR_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


# --- packing -----------------------------------------------------------------------------------


def _pack_fields(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [groups, out] packed along `out` in AutoGPTQ's bit order, any value 0..2**bits-1.

    native.pack_qzeros refuses 0 (it stores zero - 1), so the fields are packed with
    native.pack_qweight, whose layout along its first axis is the same, on the transpose.
    """
    import native

    packed = native.pack_qweight(np.ascontiguousarray(values.T, dtype=np.uint8), bits)
    return np.ascontiguousarray(packed.T)


def _unpack_fields(words: np.ndarray, bits: int) -> np.ndarray:
    import native

    fields = native.unpack_qweight(np.ascontiguousarray(words.T).view(np.int32), bits)
    return np.ascontiguousarray(fields.T).astype(np.int32)


def _word_arithmetic(bits: int) -> bool:
    # 3-bit fields straddle int32 words, so GPTQModel shifts them per field instead.
    return bits != 3


def pack_zeros(zeros: np.ndarray, bits: int) -> np.ndarray:
    """True zero points uint8 [groups, out] (0..2**bits-1) to v1 qzeros int32 (see module doc)."""
    import native

    zeros = np.ascontiguousarray(zeros, dtype=np.uint8)
    if zeros.size == 0 or int(zeros.min()) >= 1:
        return native.pack_qzeros(zeros, bits)
    if not _word_arithmetic(bits):
        shifted = (zeros.astype(np.int32) - 1) & (2**bits - 1)
        return _pack_fields(shifted.astype(np.uint8), bits)
    ones = _pack_fields(np.ones_like(zeros), bits).view(np.uint32)
    stored = _pack_fields(zeros, bits).view(np.uint32) - ones  # wraps modulo 2**32
    return stored.view(np.int32)


def unpack_zeros(qzeros: np.ndarray, bits: int, out_features: int) -> np.ndarray:
    """v1 qzeros int32 [groups, out*bits/32] back to true zero points int32 [groups, out].

    GPTQModel's v1 -> v2 rule (word-wise + one per field; per field modulo 2**bits for 3 bits), so
    zeros of 0 written by `pack_zeros` come back exactly; for every checkpoint without them it
    equals AutoGPTQ's per-field `stored + 1`.
    """
    qzeros = np.ascontiguousarray(qzeros, dtype=np.int32)
    if qzeros.shape[1] * 32 != out_features * bits:
        raise ValueError(
            f"qzeros has {qzeros.shape[1]} words per group, {out_features} outputs at {bits} "
            f"bits need {out_features * bits // 32}"
        )
    if not _word_arithmetic(bits):
        return (_unpack_fields(qzeros, bits) + 1) & (2**bits - 1)
    ones = _pack_fields(np.ones((qzeros.shape[0], out_features), dtype=np.uint8), bits)
    words = qzeros.view(np.uint32) + ones.view(np.uint32)  # wraps modulo 2**32
    return _unpack_fields(words.view(np.int32), bits)


def pack_linear(qw: QuantizedWeight) -> dict[str, np.ndarray]:
    """The four checkpoint tensors of one Linear, packed by native."""
    import native

    intweight = np.ascontiguousarray(qw.qint.t().numpy(), dtype=np.uint8)  # [in, out]
    return {
        "qweight": native.pack_qweight(intweight, qw.bits),
        "qzeros": pack_zeros(qw.zeros.numpy(), qw.bits),
        "scales": qw.scales.to(torch.float16).numpy(),
        "g_idx": qw.g_idx.to(torch.int32).numpy(),
    }


def unpack_linear(tensors: dict[str, np.ndarray], bits: int) -> QuantizedWeight:
    """A Linear's qweight/qzeros/scales/g_idx back to integers, exactly as quantized."""
    import native

    qweight = np.ascontiguousarray(tensors["qweight"], dtype=np.int32)
    out_features = qweight.shape[1]
    intweight = native.unpack_qweight(qweight, bits)  # [in, out]
    zeros = unpack_zeros(tensors["qzeros"], bits, out_features)
    return QuantizedWeight(
        qint=torch.from_numpy(np.ascontiguousarray(intweight.T)),
        scales=torch.from_numpy(np.asarray(tensors["scales"])).float(),
        zeros=torch.from_numpy(zeros).to(torch.uint8),
        g_idx=torch.from_numpy(np.asarray(tensors["g_idx"], dtype=np.int32)),
        bits=bits,
    )


# --- configs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizationFields:
    """What config.json's quantization_config and quantize_config.json record."""

    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    damp_percent: float
    true_sequential: bool
    static_groups: bool
    method: str = "gptq"
    lm_head: bool = False  # GPTQModel's flag: the lm_head is a packed Linear too
    quantizer_version: str = "0.1.0"
    extra_meta: dict[str, Any] | None = None

    def meta(self) -> dict[str, Any]:
        meta = {"quantizer": [f"{QUANTIZER_NAME}:{self.quantizer_version}"], "method": self.method}
        meta.update(self.extra_meta or {})
        return meta

    def quantization_config(self) -> dict[str, Any]:
        """config.json's `quantization_config` (transformers, vLLM, GPTQModel read it)."""
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "damp_percent": self.damp_percent,
            "true_sequential": self.true_sequential,
            "static_groups": self.static_groups,
            "checkpoint_format": CHECKPOINT_FORMAT,
            "lm_head": self.lm_head,
            "meta": self.meta(),
        }

    def quantize_config(self) -> dict[str, Any]:
        """quantize_config.json as AutoGPTQ's BaseQuantizeConfig writes it (plus GPTQModel's)."""
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "damp_percent": self.damp_percent,
            "desc_act": self.desc_act,
            "static_groups": self.static_groups,
            "sym": self.sym,
            "true_sequential": self.true_sequential,
            "model_name_or_path": None,
            "model_file_base_name": "model",
            "quant_method": "gptq",
            "checkpoint_format": CHECKPOINT_FORMAT,
            "lm_head": self.lm_head,
            "meta": self.meta(),
        }


def checkpoint_config(model_config: dict[str, Any], fields: QuantizationFields) -> dict[str, Any]:
    """The model's config.json with fp16 as its dtype and the quantization_config added."""
    config = dict(model_config)
    config["torch_dtype"] = "float16"  # read by AutoGPTQ, vLLM and older transformers
    config["dtype"] = "float16"
    config["quantization_config"] = fields.quantization_config()
    return config


# --- reading -----------------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    path: Path
    config: dict[str, Any]
    quant: dict[str, Any]

    @property
    def bits(self) -> int:
        return int(self.quant["bits"])

    @property
    def group_size(self) -> int:
        return int(self.quant.get("group_size", -1))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path} does not hold a JSON object")
    return data


def is_checkpoint(path: str | Path) -> bool:
    """A directory whose config says GPTQ (in config.json or quantize_config.json)."""
    p = Path(path)
    if not p.is_dir() or (p / INCOMPLETE_MARKER).exists():
        return False
    if (p / QUANTIZE_CONFIG_FILE).is_file():
        return True
    try:
        config = _read_json(p / CONFIG_FILE)
    except UserInputError:
        return False
    quant = config.get("quantization_config") or {}
    return str(quant.get("quant_method", "")).lower() == "gptq"


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """config.json plus the quantization fields (quantize_config.json wins where both exist)."""
    p = Path(path)
    if (p / INCOMPLETE_MARKER).exists():
        raise UserInputError(
            f"{p} is an unfinished checkpoint (a quantize run was killed); delete it"
        )
    config = _read_json(p / CONFIG_FILE)
    quant = dict(config.get("quantization_config") or {})
    if (p / QUANTIZE_CONFIG_FILE).is_file():
        quant.update(_read_json(p / QUANTIZE_CONFIG_FILE))
    method = str(quant.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise UserInputError(f"{p / CONFIG_FILE}: quant_method {method!r} is not gptq")
    fmt = str(quant.get("checkpoint_format", CHECKPOINT_FORMAT)).lower()
    if fmt != CHECKPOINT_FORMAT:
        raise UserInputError(f"{p}: checkpoint_format {fmt!r} is not supported (only 'gptq')")
    if int(quant.get("bits", 0)) not in (2, 3, 4, 8):
        raise UserInputError(f"{p}: bits={quant.get('bits')!r} is not one of 2, 3, 4, 8")
    return CheckpointInfo(path=p, config=config, quant=quant)


class CheckpointTensors:
    """Read-only access to a checkpoint's tensors by name (single file or sharded)."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / WEIGHTS_INDEX_FILE
        if index.is_file():
            weight_map = _read_json(index).get("weight_map") or {}
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f.name for f in self.path.glob("*.safetensors"))
        if not files:
            raise UserInputError(f"checkpoint {self.path} has no .safetensors files")
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            try:
                handle = safe_open(str(self.path / name), framework="np")
            except Exception as exc:
                raise UserInputError(f"cannot read {self.path / name}: {exc}") from None
            self._handles[name] = handle
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                self._where[key] = name

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self._handles[self._where[name]].get_tensor(name)

    def linear(self, prefix: str, bits: int) -> QuantizedWeight:
        return unpack_linear({s: self.get(f"{prefix}.{s}") for s in LINEAR_SUFFIXES}, bits)

    def quantized_prefixes(self) -> list[str]:
        return sorted(k[: -len(".qweight")] for k in self._where if k.endswith(".qweight"))


# --- writing -----------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def remove_stale_staging(out_dir: str | Path) -> list[tuple[Path, int]]:
    """Delete `.NAME.partial-<pid>` directories (and `.NAME.old-<pid>` ones once NAME exists)
    left by runs whose process is gone, e.g. SIGKILLed; returns (path, bytes) of each removed.

    A live pid's directory is left alone: that run may still be writing it.
    """
    out = Path(out_dir).absolute()
    if not out.parent.is_dir():
        return []
    removed = []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-(\d+)$")
    for entry in out.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        # An old checkpoint moved aside by a run killed mid-commit is the only copy until NAME
        # exists again, so it is kept then.
        if match.group(1) == "old" and not out.exists():
            continue
        size = _dir_bytes(entry)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append((entry, size))
    return removed


class CheckpointWriter:
    """Writes a checkpoint into a hidden staging directory and renames it into place at the end.

    Until `commit()` nothing exists under the final name, so a crash or Ctrl-C leaves no partial
    checkpoint there; `abort()` (also on any exception inside `with`) deletes the staging files.
    A SIGKILL skips both, so the staging directory carries INCOMPLETE_MARKER, config.json and
    quantize_config.json are held back until `commit()`, and the next writer for the same name
    deletes the staging directories of dead processes.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        overwrite: bool = False,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> None:
        import native

        self.out_dir = Path(out_dir).absolute()
        if self.out_dir.exists() and not overwrite:
            raise UserInputError(
                f"output directory {str(out_dir)!r} already exists; pass --overwrite"
            )
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UserInputError(f"output path {str(out_dir)!r} exists and is not a directory")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.removed_stale = remove_stale_staging(self.out_dir)
        self.staging = self.out_dir.parent / f".{self.out_dir.name}.partial-{os.getpid()}"
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir()
        (self.staging / INCOMPLETE_MARKER).write_text(
            f"unfinished checkpoint of {self.out_dir.name}, written by pid {os.getpid()}\n",
            encoding="utf-8",
        )
        self._last_files: dict[str, dict[str, Any]] = {}
        self._writer = native.SafetensorsWriter(
            str(self.staging), max_shard_bytes=max_shard_bytes, metadata={"format": "pt"}
        )
        self._done = False
        self._weights_done = False
        self.bytes_written = 0

    def add(self, name: str, array: np.ndarray) -> None:
        self._writer.add(name, np.ascontiguousarray(array))
        self.bytes_written += array.nbytes

    def add_fp16(self, name: str, tensor: torch.Tensor) -> None:
        self.add(name, tensor.detach().to("cpu", torch.float16).numpy())

    def add_linear(self, prefix: str, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
        for suffix, array in pack_linear(qw).items():
            self.add(f"{prefix}.{suffix}", array)
        if bias is not None:
            self.add_fp16(f"{prefix}.bias", bias)

    def write_json(self, filename: str, data: dict[str, Any]) -> None:
        """Write a JSON file into staging; the configs (LAST_FILES) wait for `commit()`."""
        if filename in LAST_FILES:
            self._last_files[filename] = data
            return
        self._write_json_now(filename, data)

    def _write_json_now(self, filename: str, data: dict[str, Any]) -> None:
        (self.staging / filename).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    def finish_weights(self) -> int:
        """Close the safetensors files (still in staging); returns their total size in bytes."""
        if not self._weights_done:
            self._writer.finish()
            self._weights_done = True
        return sum(f.stat().st_size for f in self.staging.glob("*.safetensors*") if f.is_file())

    def commit(self) -> Path:
        """Finish the weights and move the directory into place (replacing an old one)."""
        self.finish_weights()
        for filename, data in self._last_files.items():
            self._write_json_now(filename, data)
        (self.staging / INCOMPLETE_MARKER).unlink()
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
            os.replace(self.out_dir, old)
        os.replace(self.staging, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._done = True
        return self.out_dir

    def abort(self) -> None:
        if self._done:
            return
        try:
            if not self._weights_done:
                self._writer.abort()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
            self._done = True

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


# --- layouts -----------------------------------------------------------------------------------


def convert_layout(
    src: str | Path, out_dir: str | Path, layout: str, *, overwrite: bool = False
) -> Path:
    """Rewrite checkpoint `src` into `out_dir` with its Linears named as `layout` has them.

    "gptqmodel": the fused HF Linears that GPTQModel saves unfused (the family's
    `gptqmodel_unfused`: Phi-3's mlp.gate_up_proj) become their parts (gate_proj, up_proj),
    which is what GPTQModel loads. "hf": Linears stored as their parts are joined back into the
    HF module (transformers' GPTQ loading needs Phi3MLP's gate_up_proj). The integers, scales,
    zeros and g_idx are kept exactly (rows cut or joined), so every layout computes the same.
    Families without fused HF Linears come out unchanged.
    """
    from quantize.archspec import CHECKPOINT_LAYOUTS, Dims, resolve_family

    if layout not in CHECKPOINT_LAYOUTS:
        raise UserInputError(f"layout must be one of {', '.join(CHECKPOINT_LAYOUTS)}: {layout!r}")
    src = Path(src)
    info = read_checkpoint_info(src)
    family = resolve_family(info.config)
    dims = Dims.from_config(info.config)
    tensors = CheckpointTensors(src)
    keys = tensors.keys()
    split = {lin.name for lin in family.layout_splits(layout)}
    plans: dict[str, tuple[list[str], str]] = {}  # fused prefix -> (part prefixes, "split"/"join")
    for i in range(int(info.config["num_hidden_layers"])):
        layer = family.layer_prefix(i)
        for lin in family.linears:
            if not lin.parts:
                continue
            parts = [layer + part.name for part in lin.parts]
            stored_fused = any(k.startswith(layer + lin.name + ".") for k in keys)
            if lin.name in split and stored_fused:
                plans[layer + lin.name] = (parts, "split")
            elif (
                lin.name not in split
                and not stored_fused
                and all(any(k.startswith(p + ".") for k in keys) for p in parts)
            ):
                plans[layer + lin.name] = (parts, "join")
    sizes = {
        family.layer_prefix(i) + lin.name: lin.split_sizes(dims)
        for i in range(int(info.config["num_hidden_layers"]))
        for lin in family.linears
        if lin.parts
    }
    handled: set[str] = set()
    with CheckpointWriter(out_dir, overwrite=overwrite) as writer:
        for fused, (parts, how) in plans.items():
            members = [fused] if how == "split" else parts
            names = [f"{m}.{s}" for m in members for s in (*LINEAR_SUFFIXES, "weight", "bias")]
            names = [n for n in names if n in tensors]
            handled.update(names)
            bias = [tensors.get(f"{m}.bias") for m in members if f"{m}.bias" in tensors]
            quantized = f"{members[0]}.qweight" in tensors
            if how == "split":
                if quantized:
                    weights = tensors.linear(fused, info.bits).split_rows(sizes[fused])
                else:
                    weights = np.split(tensors.get(f"{fused}.weight"), np.cumsum(sizes[fused])[:-1])
                biases = np.split(bias[0], np.cumsum(sizes[fused])[:-1]) if bias else None
                targets = parts
            else:
                if quantized:
                    try:
                        joined = QuantizedWeight.cat_rows(
                            [tensors.linear(p, info.bits) for p in parts]
                        )
                    except ValueError as exc:  # act-order parts permuted differently
                        raise UserInputError(
                            f"{src}: cannot join {', '.join(parts)}: {exc}"
                        ) from None
                    weights = [joined]
                else:
                    weights = [np.concatenate([tensors.get(f"{p}.weight") for p in parts])]
                biases = [np.concatenate(bias)] if bias else None
                targets = [fused]
            for k, (target, weight) in enumerate(zip(targets, weights, strict=True)):
                if quantized:
                    for suffix, array in pack_linear(weight).items():
                        writer.add(f"{target}.{suffix}", array)
                else:
                    writer.add(f"{target}.weight", weight)
                if biases is not None:
                    writer.add(f"{target}.bias", biases[k])
        for name in keys:
            if name not in handled:
                writer.add(name, tensors.get(name))
        skip = {CONFIG_FILE, QUANTIZE_CONFIG_FILE, WEIGHTS_INDEX_FILE, INCOMPLETE_MARKER}
        for entry in src.iterdir():
            if entry.is_file() and entry.suffix != ".safetensors" and entry.name not in skip:
                shutil.copy2(entry, writer.staging / entry.name)
        writer.write_json(CONFIG_FILE, info.config)
        if (src / QUANTIZE_CONFIG_FILE).is_file():
            writer.write_json(QUANTIZE_CONFIG_FILE, _read_json(src / QUANTIZE_CONFIG_FILE))
        return writer.commit()
