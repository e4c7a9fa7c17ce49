"""Reference models for evaluation: float models, and GPTQ checkpoints dequantized to float.

`load_dequantized_model` reads a checkpoint the way every GPTQ loader must (packed integers,
zero points, fp16 scales, g_idx) and puts W = scale * (q - zero) into an ordinary transformers
model. It is slow and memory-hungry, and exact: it is the yardstick the 4-bit kernels are held to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quantize.arch import LM_HEAD_NAME, resolve_architecture
from quantize.archspec import Dims, FamilySpec
from quantize.errors import UserInputError
from quantize.format import (
    LINEAR_SUFFIXES,
    CheckpointInfo,
    CheckpointTensors,
    is_checkpoint,
    read_checkpoint_info,
)


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def _model_config(info: CheckpointInfo) -> Any:
    """The transformers config of a checkpoint, without its quantization_config."""
    from transformers import AutoConfig

    config_dict = {k: v for k, v in info.config.items() if k != "quantization_config"}
    model_type = config_dict.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **config_dict)
    except Exception as exc:
        raise UserInputError(
            f"cannot build a model config from {info.path}/config.json: {exc}"
        ) from None


def load_dequantized_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """A transformers causal LM holding the checkpoint's weights, dequantized."""
    from accelerate import init_empty_weights

    device = torch.device(device)
    dtype = dtype or _default_dtype(device)
    info = read_checkpoint_info(path)
    config = _model_config(info)
    arch = resolve_architecture(config)
    with init_empty_weights():
        model = arch.causal_lm_cls(config)

    tensors = CheckpointTensors(info.path)
    state: dict[str, torch.Tensor] = {}
    packed = set()
    for prefix in tensors.quantized_prefixes():
        weight = tensors.linear(prefix, info.bits).dequantize(torch.float32)
        state[f"{prefix}.weight"] = weight.to(device=device, dtype=dtype)
        packed.update(f"{prefix}.{suffix}" for suffix in LINEAR_SUFFIXES)
    for name in tensors.keys():  # noqa: SIM118 - not a dict
        if name not in packed:
            array = tensors.get(name)
            state[name] = torch.from_numpy(array.copy()).to(device=device, dtype=dtype)

    _join_stored_parts(state, arch.spec, info)
    expected = set(model.state_dict())
    missing = expected - state.keys()
    if config.tie_word_embeddings:
        missing.discard(LM_HEAD_NAME)
    if missing:
        raise UserInputError(f"checkpoint {info.path} lacks tensors: {', '.join(sorted(missing))}")
    unexpected = state.keys() - expected
    if unexpected:
        raise UserInputError(
            f"checkpoint {info.path} has tensors the model lacks: {', '.join(sorted(unexpected))}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    # Buffers (rotary frequencies) were created for real but on the CPU.
    return model.to(device).eval()


def _join_stored_parts(
    state: dict[str, torch.Tensor], family: FamilySpec, info: CheckpointInfo
) -> None:
    """Linears the checkpoint stores as the parts its family's spec declares (LinearSpec.parts:
    GPTQModel's Phi-3 mlp.gate_proj + mlp.up_proj for mlp.gate_up_proj) become the one Linear
    the transformers model has, their rows concatenated in the spec's order."""
    dims = Dims.from_config(info.config)
    for i in range(int(info.config["num_hidden_layers"])):
        layer = family.layer_prefix(i)
        for lin in family.linears:
            fused = layer + lin.name
            parts = [layer + part.name for part in lin.parts]
            present = [p for p in parts if f"{p}.weight" in state]
            if not present or f"{fused}.weight" in state:
                continue
            if len(present) != len(parts):
                missing = ", ".join(p for p in parts if p not in present)
                raise UserInputError(
                    f"checkpoint {info.path} stores {fused} as its parts but lacks {missing}"
                )
            for part, rows in zip(parts, lin.split_sizes(dims), strict=True):
                if state[f"{part}.weight"].shape[0] != rows:
                    raise UserInputError(
                        f"checkpoint {info.path}: {part} has "
                        f"{state[f'{part}.weight'].shape[0]} rows, {lin.name} needs {rows} there"
                    )
            for suffix in ("weight", "bias"):
                pieces = [state.pop(f"{p}.{suffix}") for p in parts if f"{p}.{suffix}" in state]
                if pieces:
                    state[f"{fused}.{suffix}"] = torch.cat(pieces)


def load_float_model(model: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """An unquantized model (HF directory, hub id or GGUF file) as a transformers causal LM."""
    from transformers import AutoModelForCausalLM, GgufConfig

    device = torch.device(device)
    dtype = _default_dtype(device)
    path = Path(model).expanduser()
    try:
        if path.is_file() and path.suffix.lower() == ".gguf":
            loaded = AutoModelForCausalLM.from_pretrained(
                str(path.parent),
                gguf_file=path.name,
                quantization_config=GgufConfig(dequantize=True),
                dtype=dtype,
            )
        else:
            resolve_architecture_of(model)
            loaded = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"cannot load model {model!r}: {exc}") from None
    return loaded.to(device).eval()


def resolve_architecture_of(model: str) -> None:
    """Fail early, with the architecture's name, for models the project does not support.

    Reads only config files (a GGUF file's architecture is checked when it is loaded).
    """
    from transformers import AutoConfig

    path = Path(model).expanduser()
    if path.is_file():
        return
    if is_checkpoint(path):
        resolve_architecture(_model_config(read_checkpoint_info(path)))
        return
    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as exc:
        raise UserInputError(f"cannot read the config of {model!r}: {exc}") from None
    resolve_architecture(config)


def load_tokenizer(model: str) -> Any:
    """The tokenizer of a checkpoint, HF directory, hub id or GGUF file."""
    from transformers import AutoTokenizer

    path = Path(model).expanduser()
    try:
        if path.is_file() and path.suffix.lower() == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(model)
    except Exception as exc:
        raise UserInputError(f"cannot load the tokenizer of {model!r}: {exc}") from None


def logits_function(model: torch.nn.Module):
    """ids [batch, seq] -> logits [batch, seq, vocab] for a transformers causal LM."""
    device = next(model.parameters()).device

    @torch.inference_mode()
    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(device), use_cache=False).logits

    return logits_fn
