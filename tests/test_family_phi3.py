"""Phi-3 end to end: HF weights that are already fused (qkv_proj, gate_up_proj), sliding window.

A tiny random Phi-3 (GQA, a 16-token sliding window on every layer) is quantized by the real
`gptq-gateway quantize` (GPTQ over each fused Linear as one matrix), then served: the runner's
logits, greedy ids and top-1 logprobs over 32 positions (past the window) match transformers' own
Phi3ForCausalLM running the checkpoint's weights dequantized, and so do the engine's greedy tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_family import (
    assert_layer_matches_transformers,
    check_engine_matches,
    check_runner_matches,
    dequantized_reference,
    quantize,
    write_config,
)
from fixtures_model import load_reference, write_tiny_model
from test_quantize_cli import write_tiny_model as write_tiny_tokenized_model

from gateway.model.config import load_model_config
from gateway.model.slots import SlotRunner
from quantize.archspec import Dims, family_for_architecture, resolve_family
from quantize.errors import UserInputError

PHI3 = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}
WINDOW = 16


def test_phi3_spec_declares_the_fused_hf_linears() -> None:
    family = family_for_architecture("Phi3ForCausalLM")
    assert family is resolve_family({"model_type": "phi3"})
    config = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "vocab_size": 100,
    }
    assert family.linear_shapes(config) == {
        "self_attn.qkv_proj": (64 + 2 * 32, 64),
        "self_attn.o_proj": (64, 64),
        "mlp.gate_up_proj": (2 * 96, 64),
        "mlp.down_proj": (64, 96),
    }
    assert [g.names for g in family.groups] == [
        ("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",),
    ]  # fmt: skip
    assert family.sliding_window.windows({"sliding_window": 8}, 2, "c") == (8, 8)
    with pytest.raises(ValueError, match="unknown size 'kv'"):
        Dims.from_config(config).size("q_size+2*kv")


# ---- bad input: features Phi-3 checkpoints may carry that the runner does not implement ---------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
            r"rope_scaling\.rope_type 'longrope' is not supported; supported: default",
        ),
        ({"rope_scaling": {"type": "su"}}, r"rope_scaling\.rope_type 'su' is not supported"),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
            r"rope_parameters\.rope_type 'yarn' is not supported",
        ),
        ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor 0\.5 is not supported"),
        ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported for Phi-3"),
    ],
)
def test_unsupported_phi3_features_name_the_field_and_value(
    tmp_path: Path, fields: dict, message: str
) -> None:
    write_config(tmp_path, **PHI3, **fields)
    with pytest.raises(UserInputError, match=message):
        load_model_config(tmp_path)


# ---- the quantizer's sub-blocks ----------------------------------------------------------------


def test_quantizer_sub_blocks_compose_to_the_transformers_phi3_layer() -> None:
    from transformers import AutoConfig

    from quantize.arch import resolve_architecture

    config = AutoConfig.for_model(
        "phi3", hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, num_hidden_layers=1, vocab_size=128, max_position_embeddings=128,
    )  # fmt: skip
    config._attn_implementation = "eager"
    arch = resolve_architecture(config)
    torch.manual_seed(0)
    reference = arch.decoder_layer_cls(config, 0).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.2)
    assert_layer_matches_transformers(arch, config, reference)


# ---- the runner on unquantized weights ---------------------------------------------------------


def test_runner_matches_transformers_on_fp32_phi3(tmp_path: Path) -> None:
    # Phi-3 defaults its special ids to 32000+: keep them inside the tiny vocabulary.
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    model_dir = write_tiny_model(tmp_path, **PHI3, **ids, sliding_window=WINDOW)
    reference = load_reference(model_dir)
    runner = SlotRunner.load(model_dir, num_slots=2, max_model_len=64)
    assert runner.config.sliding_windows == (WINDOW, WINDOW)
    ids = torch.randint(
        0, runner.spec.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(runner.forward_logits(ids), expected, rtol=1e-4, atol=1e-4)
    got = runner.prefill(1, ids[0, :20].tolist())  # prefill past the window, then decode
    torch.testing.assert_close(got, expected[0, 19], rtol=1e-4, atol=1e-4)
    for pos in range(20, 30):
        got = runner.decode(torch.tensor([1]), ids[0, pos : pos + 1], torch.tensor([pos]))
        torch.testing.assert_close(got[0], expected[0, pos], rtol=1e-4, atol=1e-4)


# ---- quantize, then serve ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def phi3_checkpoint(tmp_path_factory, smollm2_hf_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("phi3")
    model = write_tiny_tokenized_model(
        root / "model", smollm2_hf_dir, model_type="phi3", layers=2, sliding_window=WINDOW
    )
    out = root / "ckpt"
    quantize(model, out, seqlen=WINDOW, nsamples=8)  # calibration windows fit the window
    return out


@pytest.fixture(scope="module")
def phi3_reference(phi3_checkpoint: Path):
    return dequantized_reference(phi3_checkpoint)


def test_quantized_phi3_keeps_the_fused_linears(phi3_checkpoint: Path) -> None:
    from quantize.format import CheckpointTensors

    tensors = CheckpointTensors(phi3_checkpoint)
    prefixes = set(tensors.quantized_prefixes())
    for i in range(2):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            assert f"model.layers.{i}.{name}" in prefixes
    assert len(prefixes) == 2 * 4
    # [in * 4 / 32, out]: q|k|v rows 64 + 2 * 32, gate|up rows 2 * 128.
    assert tensors.get("model.layers.0.self_attn.qkv_proj.qweight").shape == (8, 128)
    assert tensors.get("model.layers.0.mlp.gate_up_proj.qweight").shape == (8, 256)
    config = json.loads((phi3_checkpoint / "config.json").read_text())
    assert config["model_type"] == "phi3" and config["architectures"] == ["Phi3ForCausalLM"]


def test_quantized_phi3_matches_transformers_on_dequantized_weights(
    phi3_checkpoint: Path, phi3_reference
) -> None:
    check_runner_matches(phi3_checkpoint, phi3_reference)


def test_engine_serves_quantized_phi3_greedy_like_transformers(
    phi3_checkpoint: Path, phi3_reference
) -> None:
    check_engine_matches(phi3_checkpoint, phi3_reference)


# ---- GPTQModel's layout: gate_up_proj unfused, qkv_proj kept ----------------------------------


def test_gptqmodel_layout_unfuses_gate_up_and_converts_back(
    phi3_checkpoint: Path, phi3_reference, tmp_path: Path
) -> None:
    import numpy as np

    from quantize.format import CheckpointTensors, convert_layout

    split_dir = convert_layout(phi3_checkpoint, tmp_path / "gptqmodel", "gptqmodel")
    split, fused = CheckpointTensors(split_dir), CheckpointTensors(phi3_checkpoint)
    names = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")
    expected = {f"model.layers.{i}.{n}" for i in range(2) for n in (*names, "mlp.down_proj")}
    assert set(split.quantized_prefixes()) == expected
    # gate_proj is gate_up_proj's first 128 rows, up_proj the rest: qweight and scales [*, out],
    # qzeros [groups, out * 4 / 32] cut along out; g_idx shared.
    for part, cols in (("gate_proj", slice(0, 128)), ("up_proj", slice(128, 256))):
        for suffix, cut in (("qweight", cols), ("scales", cols)):
            np.testing.assert_array_equal(
                split.get(f"model.layers.1.mlp.{part}.{suffix}"),
                fused.get(f"model.layers.1.mlp.gate_up_proj.{suffix}")[:, cut],
            )
        np.testing.assert_array_equal(
            split.get(f"model.layers.1.mlp.{part}.qzeros"),
            fused.get("model.layers.1.mlp.gate_up_proj.qzeros")[
                :, cols.start // 8 : cols.stop // 8
            ],
        )
        np.testing.assert_array_equal(
            split.get(f"model.layers.1.mlp.{part}.g_idx"),
            fused.get("model.layers.1.mlp.gate_up_proj.g_idx"),
        )
    assert split.get("model.layers.0.mlp.gate_proj.qweight").shape == (8, 128)
    for name in ("config.json", "quantize_config.json", "tokenizer.json"):
        assert (split_dir / name).read_bytes() == (phi3_checkpoint / name).read_bytes()
    check_runner_matches(split_dir, phi3_reference)

    back = CheckpointTensors(convert_layout(split_dir, tmp_path / "hf", "hf"))
    assert sorted(back.keys()) == sorted(fused.keys())
    for name in fused.keys():  # noqa: SIM118 - not a mapping
        np.testing.assert_array_equal(back.get(name), fused.get(name))


def test_spec_declares_the_gptqmodel_layout() -> None:
    family = resolve_family({"model_type": "phi3"})
    assert [lin.name for lin in family.layout_splits("gptqmodel")] == ["mlp.gate_up_proj"]
    assert family.layout_splits("hf") == ()
    assert family.linear("mlp.gate_up_proj").split_sizes(Dims(64, 4, 2, 16, 96, 100)) == (96, 96)
    qkv = family.linear("self_attn.qkv_proj")
    assert [p.name for p in qkv.parts] == [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
    ]
    assert qkv.split_sizes(Dims(64, 4, 2, 16, 96, 100)) == (64, 32, 32)
    assert resolve_family({"model_type": "llama"}).layout_splits("gptqmodel") == ()


# ---- `gptq-gateway quantize --layout gptqmodel`: GPTQModel's layout written directly ----------


@pytest.fixture(scope="module")
def phi3_gptqmodel_checkpoint(phi3_checkpoint: Path) -> Path:
    """The CLI's run of `phi3_checkpoint` again, with --layout gptqmodel."""
    from gateway.cli import main as cli_main

    out = phi3_checkpoint.parent / "ckpt-gptqmodel"
    args = ["quantize", str(phi3_checkpoint.parent / "model"), "--out", str(out), "--quiet"]
    args += ["--group-size", "32", "--nsamples", "8", "--seqlen", str(WINDOW), "--device", "cpu"]
    assert cli_main([*args, "--layout", "gptqmodel"]) == 0
    return out


def test_cli_gptqmodel_layout_writes_gate_and_up_as_convert_layout_does(
    phi3_checkpoint: Path, phi3_gptqmodel_checkpoint: Path, tmp_path: Path
) -> None:
    import numpy as np

    from quantize.format import CheckpointTensors, convert_layout

    split = CheckpointTensors(phi3_gptqmodel_checkpoint)
    names = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")
    expected = {f"model.layers.{i}.{n}" for i in range(2) for n in (*names, "mlp.down_proj")}
    assert set(split.quantized_prefixes()) == expected
    assert not any("gate_up_proj" in key for key in split.keys())  # noqa: SIM118 - not a mapping
    assert split.get("model.layers.0.mlp.gate_proj.qweight").shape == (8, 128)
    assert split.get("model.layers.0.mlp.up_proj.qweight").shape == (8, 128)
    # The same run quantizes the same fused gate|up; its rows cut exactly as convert_layout cuts
    # the hf-layout checkpoint's.
    converted = CheckpointTensors(convert_layout(phi3_checkpoint, tmp_path / "conv", "gptqmodel"))
    assert sorted(split.keys()) == sorted(converted.keys())
    for name in split.keys():  # noqa: SIM118 - not a mapping
        np.testing.assert_array_equal(split.get(name), converted.get(name), err_msg=name)
    for name in ("config.json", "quantize_config.json", "tokenizer.json"):
        assert (phi3_gptqmodel_checkpoint / name).read_bytes() == (
            phi3_checkpoint / name
        ).read_bytes(), name
    report = json.loads((phi3_gptqmodel_checkpoint / "quantize_report.json").read_text())
    assert report["settings"]["layout"] == "gptqmodel"
    hf_report = json.loads((phi3_checkpoint / "quantize_report.json").read_text())
    assert hf_report["settings"]["layout"] == "hf"


def test_gateway_serves_the_gptqmodel_layout_with_the_hf_layouts_logits(
    phi3_checkpoint: Path, phi3_gptqmodel_checkpoint: Path, phi3_reference
) -> None:
    runners = [
        SlotRunner.load(ckpt, num_slots=1, max_model_len=40)
        for ckpt in (phi3_checkpoint, phi3_gptqmodel_checkpoint)
    ]
    ids = torch.randint(
        0, runners[0].spec.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1)
    )
    hf_logits, split_logits = (runner.forward_logits(ids) for runner in runners)
    torch.testing.assert_close(split_logits, hf_logits, rtol=0, atol=1e-6)
    layer = runners[1].weights.layers[0]
    assert layer.gate_up.is_fused  # gate_proj and up_proj fused again at load
    check_engine_matches(phi3_gptqmodel_checkpoint, phi3_reference)


def test_reference_reads_the_gptqmodel_layout_as_the_hf_one(
    phi3_gptqmodel_checkpoint: Path, phi3_reference
) -> None:
    split_reference = dequantized_reference(phi3_gptqmodel_checkpoint)
    want, got = phi3_reference.state_dict(), split_reference.state_dict()
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            split_reference(ids).logits, phi3_reference(ids).logits, rtol=0, atol=0
        )


def test_reference_names_a_missing_part(phi3_gptqmodel_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.numpy import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(phi3_gptqmodel_checkpoint, ckpt)
    state = load_file(str(ckpt / "model.safetensors"))
    for suffix in ("qweight", "qzeros", "scales", "g_idx"):
        del state[f"model.layers.1.mlp.up_proj.{suffix}"]
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(
        UserInputError,
        match=r"stores model\.layers\.1\.mlp\.gate_up_proj as its parts but lacks "
        r"model\.layers\.1\.mlp\.up_proj",
    ):
        dequantized_reference(ckpt)
