"""`--lora`: a PEFT adapter merged into the base weights layer by layer, as peft would merge it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantize.errors import UserInputError
from quantize.lora import LoraAdapter
from quantize.source import open_model


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory, smollm2_hf_dir: Path):
    from peft import LoraConfig, get_peft_model
    from test_quantize_cli import write_tiny_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    base = write_tiny_model(root / "base", smollm2_hf_dir)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        alpha_pattern={"down_proj": 2},
    )
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)  # peft starts B at zero, which would merge to nothing
    peft_model.save_pretrained(root / "adapter")
    merged = peft_model.merge_and_unload()
    return base, root / "adapter", merged.state_dict()


def test_merge_matches_peft(base_and_adapter) -> None:
    base, adapter, merged = base_and_adapter
    source = open_model(str(base), lora=str(adapter))
    for index in range(2):
        tensors = source.layer_tensors(index)
        for name, tensor in tensors.items():
            expected = merged[f"model.layers.{index}.{name}"]
            torch.testing.assert_close(tensor.float(), expected, rtol=1e-5, atol=1e-6)
    plain = open_model(str(base)).layer_tensors(0)
    assert not torch.equal(plain["self_attn.q_proj.weight"], tensors["self_attn.q_proj.weight"])


def test_adapters_it_cannot_merge_are_refused(base_and_adapter, tmp_path: Path) -> None:
    _, adapter, _ = base_and_adapter
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (bad / "adapter_model.safetensors").write_bytes(
        (adapter / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(UserInputError, match="use_dora"):
        LoraAdapter(bad)
    with pytest.raises(UserInputError, match=r"no adapter_config\.json"):
        LoraAdapter(tmp_path)
