"""Where a model's weights come from: a Hugging Face directory, a hub id or a GGUF file.

A source hands out one decoder layer's tensors at a time (read lazily from safetensors or a
memory-mapped .bin), plus the few tensors outside the layers, so the quantizer never holds the
whole model. A GGUF file is the exception: it is dequantized into RAM by transformers on load.
"""

from __future__ import annotations

import json
import re
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from quantize.arch import EMBED_NAME, LM_HEAD_NAME, layer_prefix, resolve_architecture
from quantize.errors import UserInputError
from quantize.lora import LoraAdapter

# Files copied verbatim from a model directory into a checkpoint when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelSource(ABC):
    """One model's config, tokenizer and weights, read layer by layer."""

    name: str
    config: Any

    def __init__(self) -> None:
        self.lora: LoraAdapter | None = None

    @abstractmethod
    def _read(self, name: str) -> torch.Tensor: ...

    @abstractmethod
    def has_tensor(self, name: str) -> bool: ...

    @abstractmethod
    def load_tokenizer(self) -> Any: ...

    @abstractmethod
    def write_tokenizer_files(self, out_dir: Path) -> None:
        """Tokenizer, chat template and generation config, as the model ships them."""

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._read(name).shape)

    def tensor(self, name: str) -> torch.Tensor:
        if not self.has_tensor(name):
            raise UserInputError(f"{self.name}: the weights have no tensor {name!r}")
        return self._read(name)

    def layer_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Tensors of decoder layer `index`, named relative to it, with any LoRA merged in."""
        prefix = layer_prefix(index)
        tensors = {
            name[len(prefix) :]: self._read(name)
            for name in self.names()
            if name.startswith(prefix)
        }
        if not tensors:
            raise UserInputError(f"{self.name}: the weights have no tensors for layer {index}")
        if self.lora is not None:
            tensors = self.lora.merge_layer(index, tensors)
        return tensors

    @abstractmethod
    def names(self) -> list[str]: ...

    def attach_lora(self, adapter: LoraAdapter) -> None:
        n_layers = int(self.config.num_hidden_layers)
        beyond = sorted(i for i in adapter.layers if i >= n_layers)
        if beyond:
            raise UserInputError(
                f"--lora: the adapter targets layer {beyond[0]}, the model has {n_layers}"
            )
        self.lora = adapter

    def tied_embeddings(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False)) or not self.has_tensor(
            LM_HEAD_NAME
        )

    def close(self) -> None:  # noqa: B027 - an optional hook: most sources hold no handles
        """Release file handles; the default holds none."""


def _load_config(path: Path) -> Any:
    from transformers import AutoConfig

    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserInputError(f"model directory {str(path)!r} has no config.json")
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise UserInputError(f"cannot parse {config_file}: {exc}") from None


class HFDirectorySource(ModelSource):
    """A local directory in the Hugging Face layout (safetensors, or .bin read through mmap)."""

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.name = name or str(self.path)
        self.config = _load_config(self.path)
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._bin: dict[Path, dict[str, torch.Tensor]] = {}
        self._index_weights()

    def _index_weights(self) -> None:
        files = sorted(self.path.glob("*.safetensors"))
        kind = "safetensors"
        if not files:
            files = sorted(p for p in self.path.glob("*.bin") if p.name != "training_args.bin")
            kind = "bin"
        if not files:
            raise UserInputError(
                f"model directory {str(self.path)!r} has no .safetensors or .bin weights"
            )
        for file in files:
            for key in self._keys_of(file, kind):
                self._where[key] = file

    def _keys_of(self, file: Path, kind: str) -> list[str]:
        try:
            if kind == "safetensors":
                from safetensors import safe_open

                handle = safe_open(str(file), framework="pt")
                self._handles[file] = handle
                return list(handle.keys())
            state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:
            raise UserInputError(f"cannot read weights file {file}: {exc}") from None
        if not isinstance(state, dict):
            raise UserInputError(f"weights file {file} does not hold a state dict")
        self._bin[file] = state
        return list(state)

    def names(self) -> list[str]:
        return list(self._where)

    def has_tensor(self, name: str) -> bool:
        return name in self._where

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        file = self._where[name]
        if file in self._handles:
            return tuple(self._handles[file].get_slice(name).get_shape())
        return tuple(self._bin[file][name].shape)

    def _read(self, name: str) -> torch.Tensor:
        file = self._where[name]
        if file in self._handles:
            return self._handles[file].get_tensor(name)
        return self._bin[file][name]

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.path))
        except Exception as exc:
            raise UserInputError(f"cannot load the tokenizer from {self.path}: {exc}") from None

    def write_tokenizer_files(self, out_dir: Path) -> None:
        for file in TOKENIZER_FILES:
            if (self.path / file).is_file():
                shutil.copyfile(self.path / file, out_dir / file)

    def close(self) -> None:
        self._handles.clear()
        self._bin.clear()


class GGUFSource(ModelSource):
    """A GGUF file, dequantized to float32 in RAM by transformers (GGUF models are small)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.name = str(self.path)
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(self.path.parent),
                gguf_file=self.path.name,
                quantization_config=GgufConfig(dequantize=True),
                dtype=torch.float32,
            )
            self._tokenizer = AutoTokenizer.from_pretrained(
                str(self.path.parent), gguf_file=self.path.name
            )
        except Exception as exc:
            raise UserInputError(f"cannot parse GGUF file {self.path}: {exc}") from None
        self.config = model.config
        self.generation_config = model.generation_config
        self._state = {k: v.detach() for k, v in model.state_dict().items()}
        if self.tied_embeddings():
            self._state.pop(LM_HEAD_NAME, None)
        del model

    def names(self) -> list[str]:
        return list(self._state)

    def has_tensor(self, name: str) -> bool:
        return name in self._state

    def _read(self, name: str) -> torch.Tensor:
        return self._state[name]

    def tied_embeddings(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def load_tokenizer(self) -> Any:
        return self._tokenizer

    def write_tokenizer_files(self, out_dir: Path) -> None:
        self._tokenizer.save_pretrained(str(out_dir))
        self.generation_config.save_pretrained(str(out_dir))

    def save_as_hf_directory(self, out_dir: Path, dtype: torch.dtype = torch.float32) -> None:
        """Write config, tokenizer files and model.safetensors: a plain HF directory."""
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("quantization_config", None)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        self.write_tokenizer_files(out_dir)
        state = {k: v.to(dtype).contiguous() for k, v in self._state.items()}
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as exc:
        raise UserInputError(
            f"{repo_id!r} is not a local path, and fetching it from the Hugging Face hub failed: "
            f"{exc}"
        ) from None


def is_gptq_checkpoint(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        quant = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return str(quant.get("quant_method", "")).lower() == "gptq"


def open_model(model: str, lora: str | None = None) -> ModelSource:
    """A source for MODEL: a .gguf file, a model directory, or a hub id (online only)."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserInputError(f"{model!r} is a file but not a .gguf; pass a model directory")
        source: ModelSource = GGUFSource(path)
    elif path.is_dir():
        if is_gptq_checkpoint(path):
            raise UserInputError(f"{model!r} is already a GPTQ checkpoint; pass the original model")
        source = HFDirectorySource(path)
    elif _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
        source = HFDirectorySource(_download_from_hub(model), name=model)
    else:
        raise UserInputError(f"model {model!r}: no such file or directory (nor a hub id)")
    resolve_architecture(source.config)  # an unsupported model fails here, by name
    if not source.has_tensor(EMBED_NAME):
        raise UserInputError(f"{source.name}: the weights have no {EMBED_NAME}")
    if lora is not None:
        source.attach_lora(LoraAdapter(lora))
    return source
