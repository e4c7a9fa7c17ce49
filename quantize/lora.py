"""Merging a PEFT LoRA adapter into the base weights, one decoder layer at a time.

Merge first, then quantize: the adapter's low-rank update B @ A (times alpha / r) is added to each
targeted Linear's float weight as its layer is loaded, so a model larger than RAM still streams.
Only plain LoRA on the decoder layers' Linears is supported; anything else is refused by name.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from quantize.arch import LAYERS_PREFIX, QUANTIZED_LINEARS
from quantize.errors import UserInputError

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$"
)
_LAYER_MODULE = re.compile(rf"^{re.escape(LAYERS_PREFIX)}\.(?P<index>\d+)\.(?P<linear>.+)$")


class LoraAdapter:
    """A LoRA adapter directory (adapter_config.json + adapter_model.safetensors or .bin)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        config_path = self.path / "adapter_config.json"
        if not config_path.is_file():
            raise UserInputError(f"--lora {str(self.path)!r}: no adapter_config.json in it")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserInputError(f"{config_path}: not valid JSON ({exc})") from None
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise UserInputError(f"{config_path}: peft_type {peft_type!r} is not LORA")
        for flag in ("use_dora", "fan_in_fan_out"):
            if config.get(flag):
                raise UserInputError(f"{config_path}: {flag}=true adapters are not supported")
        if config.get("bias", "none") != "none":
            raise UserInputError(f"{config_path}: bias={config['bias']!r} is not supported")
        self.lora_alpha = float(config.get("lora_alpha", config.get("r", 8)))
        self.alpha_pattern: dict[str, float] = {
            str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()
        }
        self.use_rslora = bool(config.get("use_rslora", False))
        self._factors = self._load_factors()

    def _load_tensors(self) -> dict[str, torch.Tensor]:
        st = self.path / "adapter_model.safetensors"
        binary = self.path / "adapter_model.bin"
        try:
            if st.is_file():
                from safetensors.torch import load_file

                return load_file(str(st))
            if binary.is_file():
                return torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserInputError(
                f"--lora: cannot read the adapter weights in {self.path}: {exc}"
            ) from None
        raise UserInputError(f"--lora {str(self.path)!r}: no adapter_model.safetensors or .bin")

    def _load_factors(self) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """{layer index: {linear name: (A [r, in], B [out, r])}}, checked for completeness."""
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in self._load_tensors().items():
            match = _KEY.match(key)
            if match is None:
                raise UserInputError(
                    f"--lora: adapter tensor {key!r} is not a LoRA A/B weight (only plain LoRA on "
                    "Linear layers can be merged)"
                )
            pairs.setdefault(match["module"], {})[match["which"]] = tensor
        by_layer: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise UserInputError(f"--lora: {module} lacks one of lora_A / lora_B")
            layer = _LAYER_MODULE.match(module)
            if layer is None or layer["linear"] not in QUANTIZED_LINEARS:
                raise UserInputError(
                    f"--lora: the adapter targets {module}; only the decoder layers' Linears "
                    f"({', '.join(n.split('.')[-1] for n in QUANTIZED_LINEARS)}) can be merged"
                )
            by_layer.setdefault(int(layer["index"]), {})[layer["linear"]] = (ab["A"], ab["B"])
        if not by_layer:
            raise UserInputError(f"--lora {str(self.path)!r}: the adapter has no LoRA weights")
        return by_layer

    @property
    def layers(self) -> set[int]:
        return set(self._factors)

    def scaling(self, module: str, rank: int) -> float:
        alpha = self.lora_alpha
        for pattern, value in self.alpha_pattern.items():
            if re.fullmatch(rf"(.*\.)?{pattern}", module):
                alpha = value
                break
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)

    def merge_layer(self, index: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The layer's tensors with W + scaling * B @ A (float32) for every targeted Linear."""
        merged = dict(tensors)
        for linear, (a, b) in self._factors.get(index, {}).items():
            name = f"{linear}.weight"
            weight = merged[name].float()
            if b.shape[0] != weight.shape[0] or a.shape[1] != weight.shape[1]:
                raise UserInputError(
                    f"--lora: {LAYERS_PREFIX}.{index}.{linear} has shape {tuple(weight.shape)} "
                    f"but the adapter's B @ A is {(b.shape[0], a.shape[1])}"
                )
            module = f"{LAYERS_PREFIX}.{index}.{linear}"
            scale = self.scaling(module, a.shape[0])
            merged[name] = weight + scale * (b.float() @ a.float())
        return merged
