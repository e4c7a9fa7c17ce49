"""A checkpoint the runner cannot serve fails at load with the tensor or field named."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fixtures_model import write_gptq_checkpoint, write_tiny_model
from safetensors.torch import load_file, save_file

from gateway.model import LlamaRunner
from gateway.model.slots import SlotRunner
from quantize.errors import UserInputError


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hf = write_tiny_model(tmp_path_factory.mktemp("hf"), num_hidden_layers=1)
    return write_gptq_checkpoint(hf, tmp_path_factory.mktemp("gptq"), bits=4, group_size=32)


def edited_copy(
    source: Path, target: Path, *, tensors: Callable | None = None, config: Callable | None = None
) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("reference"))
    if tensors is not None:
        state = load_file(str(target / "model.safetensors"))
        tensors(state)
        save_file(state, str(target / "model.safetensors"))
    if config is not None:
        data = json.loads((target / "config.json").read_text())
        config(data)
        (target / "config.json").write_text(json.dumps(data))
    return target


def load(path: Path) -> LlamaRunner:
    return SlotRunner.load(path, num_slots=1, max_model_len=16)


def test_missing_quantized_tensor(gptq_dir: Path, tmp_path: Path) -> None:
    path = edited_copy(
        gptq_dir, tmp_path / "c", tensors=lambda s: s.pop("model.layers.0.mlp.down_proj.qzeros")
    )
    with pytest.raises(
        UserInputError, match=r"missing tensor 'model\.layers\.0\.mlp\.down_proj\.qzeros'"
    ):
        load(path)


def test_missing_dense_tensor(gptq_dir: Path, tmp_path: Path) -> None:
    path = edited_copy(
        gptq_dir,
        tmp_path / "c",
        tensors=lambda s: s.pop("model.layers.0.post_attention_layernorm.weight"),
    )
    with pytest.raises(
        UserInputError, match=r"missing tensor 'model\.layers\.0\.post_attention_layernorm\.weight'"
    ):
        load(path)


def test_missing_linear_altogether(gptq_dir: Path, tmp_path: Path) -> None:
    def drop(state: dict) -> None:
        for key in [k for k in state if ".self_attn.o_proj." in k]:
            del state[key]

    with pytest.raises(
        UserInputError, match=r"missing tensor 'model\.layers\.0\.self_attn\.o_proj\.weight'"
    ):
        load(edited_copy(gptq_dir, tmp_path / "c", tensors=drop))


def test_misshapen_scales(gptq_dir: Path, tmp_path: Path) -> None:
    name = "model.layers.0.self_attn.k_proj.scales"
    path = edited_copy(
        gptq_dir,
        tmp_path / "c",
        tensors=lambda s: s.__setitem__(name, s[name][:, :32].contiguous()),
    )
    with pytest.raises(
        UserInputError,
        match=r"model\.layers\.0\.self_attn\.k_proj\.scales: expected a float tensor \[4, 64\]",
    ):
        load(path)


def test_qweight_of_the_wrong_linear_shape(gptq_dir: Path, tmp_path: Path) -> None:
    # A consistent GPTQ tensor set for a [128 -> 32] Linear where config.json implies [128 -> 64].
    def shrink(state: dict) -> None:
        prefix = "model.layers.0.self_attn.v_proj"
        state[f"{prefix}.qweight"] = state[f"{prefix}.qweight"][:, :32].contiguous()
        state[f"{prefix}.scales"] = state[f"{prefix}.scales"][:, :32].contiguous()
        state[f"{prefix}.qzeros"] = state[f"{prefix}.qzeros"][:, :4].contiguous()

    with pytest.raises(
        UserInputError,
        match=r"v_proj\.qweight' holds a \[128 -> 32\] Linear, expected \[128 -> 64\]",
    ):
        load(edited_copy(gptq_dir, tmp_path / "c", tensors=shrink))


def test_misshapen_embedding(gptq_dir: Path, tmp_path: Path) -> None:
    name = "model.embed_tokens.weight"
    path = edited_copy(
        gptq_dir,
        tmp_path / "c",
        tensors=lambda s: s.__setitem__(name, torch.zeros(10, 128, dtype=torch.float16)),
    )
    with pytest.raises(
        UserInputError,
        match=r"tensor 'model\.embed_tokens\.weight' has shape \[10, 128\], expected \[320, 128\]",
    ):
        load(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c.update(architectures=["GPT2LMHeadModel"]),
            r"architectures: GPT2LMHeadModel is not supported",
        ),
        (lambda c: c.update(hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
        (
            lambda c: c["quantization_config"].update(bits=5),
            r"quantization_config: bits 5 is not supported",
        ),
        (
            lambda c: c["quantization_config"].update(group_size=0),
            r"quantization_config: group_size must be",
        ),
        (
            lambda c: c["quantization_config"].update(checkpoint_format="marlin"),
            r"checkpoint_format 'marlin' is not supported",
        ),
        (
            lambda c: c["quantization_config"].update(quant_method="awq"),
            r"quant_method 'awq' is not supported",
        ),
        (
            lambda c: c.update(
                rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
            ),
            r"rope_parameters\.rope_type 'yarn' is not supported",
        ),
        (
            lambda c: c.update(
                rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
            ),
            r"rope_type 'dynamic' is not supported",
        ),
        (lambda c: c.pop("hidden_size"), r"missing field 'hidden_size'"),
        (
            lambda c: c.update(num_key_value_heads=3),
            r"num_key_value_heads \(3\) must divide num_attention_heads \(4\)",
        ),
    ],
)
def test_config_the_runner_cannot_serve(
    gptq_dir: Path, tmp_path: Path, edit: Callable, message: str
) -> None:
    with pytest.raises(UserInputError, match=message):
        load(edited_copy(gptq_dir, tmp_path / "c", config=edit))


def test_bad_paths_and_arguments(gptq_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="is not a directory"):
        LlamaRunner.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match=r"config\.json: file not found"):
        LlamaRunner.load(tmp_path / "empty")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(gptq_dir / "config.json", no_weights / "config.json")
    with pytest.raises(
        UserInputError, match=r"no model\.safetensors or model\.safetensors\.index\.json"
    ):
        load(no_weights)
    with pytest.raises(UserInputError, match=r"max_model_len must be an integer in \[1, 128\]"):
        LlamaRunner.load(gptq_dir, max_model_len=129)
    with pytest.raises(UserInputError, match="num_blocks must be a positive integer"):
        LlamaRunner.load(gptq_dir, num_blocks=0)
    with pytest.raises(UserInputError, match="kernel: unknown kernel 'cutlass'"):
        LlamaRunner.load(gptq_dir, kernel="cutlass")
    with pytest.raises(UserInputError, match="dtype: 'float8' is not one of"):
        LlamaRunner.load(gptq_dir, dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(
            UserInputError, match="device: 'cuda' was asked for but torch sees no CUDA GPU"
        ):
            LlamaRunner.load(gptq_dir, device="cuda")


def test_index_naming_a_missing_shard(gptq_dir: Path, tmp_path: Path) -> None:
    path = edited_copy(gptq_dir, tmp_path / "c")
    names = list(load_file(str(path / "model.safetensors")))
    (path / "model.safetensors").rename(path / "part-1.safetensors")
    weight_map = {name: "part-1.safetensors" for name in names[1:]} | {
        names[0]: "part-2.safetensors"
    }
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises((UserInputError, OSError), match=r"part-2\.safetensors"):
        load(path)
