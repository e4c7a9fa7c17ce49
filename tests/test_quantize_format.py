"""The checkpoint format against AutoGPTQ's documented conventions (written here, independently).

AutoGPTQ's bit layout ("gptq" format, a.k.a. v1): the values of one column form a little-endian
bit stream, value k in bits [k*bits, (k+1)*bits), cut into int32 words, so 3-bit values straddle
words. qweight packs intweight [in, out] along `in`; qzeros packs (zero - 1) [groups, out] along
`out`; weight = scale[g_idx[i]] * (q[i] - zero[g_idx[i]]). GPTQModel exports true zeros (0 allowed)
to this format by subtracting one per field from whole int32 words, modulo 2**32 (3 bits: from each
field, modulo 8).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gateway.cli import main as cli_main
from quantize.errors import UserInputError
from quantize.format import (
    CheckpointTensors,
    CheckpointWriter,
    pack_linear,
    pack_zeros,
    unpack_linear,
    unpack_zeros,
)
from quantize.qtensor import QuantizedWeight

# --- the convention, from first principles -----------------------------------------------------


def pack_bitstream(values: np.ndarray, bits: int) -> np.ndarray:
    """values [n, cols] (0..2**bits-1) -> int32 [n*bits/32, cols], packed down each column."""
    n, cols = values.shape
    assert n * bits % 32 == 0
    words = np.zeros((n * bits // 32, cols), dtype=np.uint64)
    v = values.astype(np.uint64)
    for k in range(n):
        for b in range(bits):
            pos = k * bits + b
            words[pos // 32] |= ((v[k] >> np.uint64(b)) & np.uint64(1)) << np.uint64(pos % 32)
    return words.astype(np.uint32).view(np.int32)


def autogptq_qzeros(zeros: np.ndarray, bits: int) -> np.ndarray:
    """zeros [groups, out] in 1..2**bits -> qzeros storing zero - 1, packed along `out`."""
    assert zeros.min() >= 1
    return np.ascontiguousarray(pack_bitstream((zeros - 1).T, bits).T)


def gptqmodel_v2_to_v1(zeros: np.ndarray, bits: int) -> np.ndarray:
    """GPTQModel's export of true zeros to format gptq: v2 words minus one per field, mod 2**32;
    for 3 bits (fields straddle words) one is taken from each field, modulo 8."""
    if bits == 3:
        return np.ascontiguousarray(pack_bitstream(((zeros.astype(np.int64) - 1) % 8).T, 3).T)
    v2 = pack_bitstream(zeros.T, bits).T.view(np.uint32).astype(np.uint64)
    ones = pack_bitstream(np.ones_like(zeros).T, bits).T.view(np.uint32).astype(np.uint64)
    return np.ascontiguousarray(((v2 - ones) % (1 << 32)).astype(np.uint32).view(np.int32))


def autogptq_quantize_config(bits: int, group_size: int, desc_act: bool, sym: bool) -> dict:
    """quantize_config.json as AutoGPTQ 0.7's BaseQuantizeConfig.save_pretrained writes it."""
    return {
        "bits": bits,
        "group_size": group_size,
        "damp_percent": 0.01,
        "desc_act": desc_act,
        "static_groups": False,
        "sym": sym,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
    }


def random_quantized(out_f: int, in_f: int, bits: int, groups: int, seed: int) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    g_idx = (torch.arange(in_f) * groups // in_f)[torch.randperm(in_f, generator=g)]
    return QuantizedWeight(
        qint=torch.randint(0, maxq + 1, (out_f, in_f), generator=g, dtype=torch.uint8),
        scales=(torch.rand(groups, out_f, generator=g) + 0.01).half().float(),
        zeros=torch.randint(0, maxq + 1, (groups, out_f), generator=g, dtype=torch.uint8),
        g_idx=g_idx.to(torch.int32),
        bits=bits,
    )


# --- packing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_linear_matches_the_convention_and_round_trips(bits: int) -> None:
    qw = random_quantized(out_f=64, in_f=96, bits=bits, groups=3, seed=bits)
    qw.zeros[0, :3] = 0  # the case v1 cannot store field by field
    packed = pack_linear(qw)
    np.testing.assert_array_equal(packed["qweight"], pack_bitstream(qw.qint.t().numpy(), bits))
    # Zeros include 0 here: the stored words are GPTQModel's v2 -> v1 export, bit for bit.
    np.testing.assert_array_equal(packed["qzeros"], gptqmodel_v2_to_v1(qw.zeros.numpy(), bits))
    assert packed["scales"].dtype == np.float16 and packed["g_idx"].dtype == np.int32
    back = unpack_linear(packed, bits)
    assert torch.equal(back.qint, qw.qint)
    assert torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.scales, qw.scales)
    assert torch.equal(back.g_idx, qw.g_idx)
    assert torch.equal(back.dequantize(), qw.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zeros_of_one_or_more_are_plain_autogptq_v1(bits: int) -> None:
    rng = np.random.default_rng(bits)
    zeros = rng.integers(1, 2**bits, size=(5, 64), dtype=np.uint8)
    stored = pack_zeros(zeros, bits)
    np.testing.assert_array_equal(stored, autogptq_qzeros(zeros, bits))
    np.testing.assert_array_equal(unpack_zeros(stored, bits, 64), zeros)


def test_a_zero_of_zero_borrows_only_from_its_neighbour_for_per_field_readers() -> None:
    # 4 bits: word arithmetic, as GPTQModel.
    """What a per-field `stored + 1` reader (AutoGPTQ kernels, native.unpack_qzeros) sees."""
    import native

    zeros = np.full((1, 8), 5, dtype=np.uint8)
    zeros[0, 2] = 0
    stored = pack_zeros(zeros, 4)
    per_field = native.unpack_qzeros(stored, 4, 8)
    expected = zeros.astype(np.int32).copy()
    expected[0, 2] = 16  # 0 - 1 wraps to 15 in its field
    expected[0, 3] = 4  # and borrows one from the field above
    np.testing.assert_array_equal(per_field, expected)
    np.testing.assert_array_equal(unpack_zeros(stored, 4, 8), zeros)


def test_a_three_bit_zero_of_zero_wraps_within_its_field() -> None:
    import native

    zeros = np.full((1, 32), 3, dtype=np.uint8)
    zeros[0, [10, 21]] = 0  # the two fields that straddle int32 words
    stored = pack_zeros(zeros, 3)
    expected = zeros.astype(np.int32).copy()
    expected[0, [10, 21]] = 8  # per-field readers: (0 - 1) mod 8 + 1; neighbours untouched
    np.testing.assert_array_equal(native.unpack_qzeros(stored, 3, 32), expected)
    np.testing.assert_array_equal(unpack_zeros(stored, 3, 32), zeros)


# --- writer ------------------------------------------------------------------------------------


def test_writer_refuses_existing_dir_and_replaces_it_with_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UserInputError, match="already exists; pass --overwrite"):
        CheckpointWriter(out)
    with CheckpointWriter(out, overwrite=True) as writer:
        writer.add_fp16("model.norm.weight", torch.ones(8))
        writer.write_json("config.json", {"x": 1})
        writer.commit()
    assert not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert CheckpointTensors(out).get("model.norm.weight").dtype == np.float16


def test_writer_leaves_nothing_when_interrupted(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt), CheckpointWriter(out) as writer:
        writer.add_linear("model.layers.0.mlp.down_proj", random_quantized(64, 64, 4, 2, 0), None)
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


# --- a checkpoint laid out by AutoGPTQ's conventions loads and evaluates -----------------------

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}
LINEARS = {
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (32, 64),
    "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (128, 64),
    "mlp.up_proj": (128, 64),
    "mlp.down_proj": (64, 128),
}


def _autogptq_linear(weight: np.ndarray, bits: int, group: int, rng) -> tuple[dict, np.ndarray]:
    """Asymmetric RTN with act-order style g_idx, as AutoGPTQ would store it (zeros >= 1)."""
    out_f, in_f = weight.shape
    maxq = 2**bits - 1
    perm = rng.permutation(in_f)
    g_idx = np.empty(in_f, dtype=np.int32)
    g_idx[perm] = np.arange(in_f) // group
    groups = in_f // group
    scales = np.empty((groups, out_f), dtype=np.float16)
    zeros = np.empty((groups, out_f), dtype=np.int64)
    for g in range(groups):
        cols = weight[:, g_idx == g]
        low, high = np.minimum(cols.min(1), 0), np.maximum(cols.max(1), 0)
        scales[g] = ((high - low) / maxq).astype(np.float16)
        zeros[g] = np.clip(np.round(-low / scales[g].astype(np.float32)), 1, maxq)
    s = scales.astype(np.float32)[g_idx].T
    z = zeros[g_idx].T
    q = np.clip(np.round(weight / s) + z, 0, maxq).astype(np.int64)
    deq = (s * (q - z).astype(np.float32)).astype(np.float32)
    tensors = {
        "qweight": pack_bitstream(q.T, bits),
        "qzeros": autogptq_qzeros(zeros, bits),
        "scales": scales,
        "g_idx": g_idx,
    }
    return tensors, deq


@pytest.fixture(scope="module")
def autogptq_checkpoint(tmp_path_factory, smollm2_hf_dir: Path):
    """A tiny Llama (SmolLM2's tokenizer) stored as AutoGPTQ writes 4-bit g32 desc_act asym."""
    from safetensors.numpy import save_file

    out = tmp_path_factory.mktemp("autogptq")
    rng = np.random.default_rng(0)
    vocab = json.loads((smollm2_hf_dir / "config.json").read_text())["vocab_size"]
    config = {**TINY, "vocab_size": vocab}
    tensors: dict[str, np.ndarray] = {}
    float_state: dict[str, np.ndarray] = {}

    def fp16(name: str, array: np.ndarray) -> None:
        tensors[name] = array.astype(np.float16)
        float_state[name] = tensors[name].astype(np.float32)

    fp16("model.embed_tokens.weight", rng.normal(0, 1.0, (vocab, 64)))
    fp16("lm_head.weight", rng.normal(0, 0.2, (vocab, 64)))
    fp16("model.norm.weight", rng.uniform(0.5, 1.5, 64))
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        fp16(prefix + "input_layernorm.weight", rng.uniform(0.5, 1.5, 64))
        fp16(prefix + "post_attention_layernorm.weight", rng.uniform(0.5, 1.5, 64))
        for name, shape in LINEARS.items():
            weight = rng.normal(0, 0.15, shape).astype(np.float32)
            packed, deq = _autogptq_linear(weight, 4, 32, rng)
            for suffix, array in packed.items():
                tensors[f"{prefix}{name}.{suffix}"] = array
            float_state[f"{prefix}{name}.weight"] = deq
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    quant = autogptq_quantize_config(bits=4, group_size=32, desc_act=True, sym=False)
    (out / "quantize_config.json").write_text(json.dumps(quant))
    (out / "config.json").write_text(
        json.dumps({**config, "torch_dtype": "float16", "quantization_config": quant})
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((smollm2_hf_dir / name).read_bytes())
    return out, config, float_state


def _float_model(config: dict, state: dict[str, np.ndarray]):
    from transformers import AutoConfig, LlamaForCausalLM

    fields = {k: v for k, v in config.items() if k != "model_type"}
    model = LlamaForCausalLM(AutoConfig.for_model("llama", **fields)).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return model


def test_autogptq_checkpoint_loads_to_the_exact_weights(autogptq_checkpoint) -> None:
    from quantize.reference import load_dequantized_model

    path, _, float_state = autogptq_checkpoint
    model = load_dequantized_model(path, dtype=torch.float32)
    state = model.state_dict()
    for name, expected in float_state.items():
        assert torch.equal(state[name], torch.from_numpy(expected)), name


def test_autogptq_checkpoint_evaluates_with_the_cli(
    autogptq_checkpoint, tmp_path: Path, capsys
) -> None:
    from quantize.calib import heldout_text, tokenize_text
    from quantize.perplexity import perplexity
    from quantize.reference import load_tokenizer, logits_function

    path, config, float_state = autogptq_checkpoint
    text = tmp_path / "text.txt"
    text.write_text(heldout_text()[:4000])
    args = ["--seqlen", "64", "--windows", "3", "--json", "--device", "cpu"]
    code = cli_main(["eval", str(path), "--text", str(text), *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    got = json.loads(out)
    assert got["tokens"] == 3 * 63
    # The same perplexity, computed from a float model holding the convention's weights.
    ids = tokenize_text(load_tokenizer(str(path)), text.read_text())
    expected = perplexity(logits_function(_float_model(config, float_state)), ids, 64, 3)
    assert got["ppl"] == pytest.approx(expected.ppl, rel=1e-4)


# --- layouts: the quantizer's writer splits a fused Linear into the parts a layout stores ------


def test_layer_writer_splits_a_fused_linear_and_its_bias_into_its_parts() -> None:
    from quantize.driver import LayerResult
    from quantize.pipeline import _write_layer

    class Recorder:
        def __init__(self) -> None:
            self.linears: dict[str, tuple[QuantizedWeight, torch.Tensor | None]] = {}
            self.fp16: dict[str, torch.Tensor] = {}

        def add_linear(self, prefix, qw, bias) -> None:
            self.linears[prefix] = (qw, bias)

        def add_fp16(self, name, tensor) -> None:
            self.fp16[name] = tensor

    fused = random_quantized(12, 64, 4, 2, seed=3)
    bias = torch.arange(12, dtype=torch.float16)
    result = LayerResult(
        index=1,
        quantized={"mlp.gate_up_proj": fused, "mlp.down_proj": fused},
        other={"mlp.gate_up_proj.bias": bias, "post_attention_layernorm.weight": bias},
        report=None,  # not read by the writer
    )
    writer = Recorder()
    splits = {"mlp.gate_up_proj": (("mlp.gate_proj", "mlp.up_proj"), (5, 7))}
    _write_layer(writer, result, splits)
    assert sorted(writer.linears) == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    ]
    assert list(writer.fp16) == ["model.layers.1.post_attention_layernorm.weight"]
    for name, rows in (("gate_proj", slice(0, 5)), ("up_proj", slice(5, 12))):
        qw, part_bias = writer.linears[f"model.layers.1.mlp.{name}"]
        assert torch.equal(qw.qint, fused.qint[rows])
        assert torch.equal(qw.scales, fused.scales[:, rows])
        assert torch.equal(qw.zeros, fused.zeros[:, rows])
        assert torch.equal(qw.g_idx, fused.g_idx)
        assert torch.equal(part_bias, bias[rows])
    assert writer.linears["model.layers.1.mlp.down_proj"] == (fused, None)
