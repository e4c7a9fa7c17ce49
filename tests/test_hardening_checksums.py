"""Issue 15 items 12 and 13: per-tensor checksums, and the right name for a missing tensor.

The writer (native/src/checksum.rs, st_writer.rs) records an xxh3 checksum per tensor in each
shard's metadata; loading verifies them (gateway/model/tensor_source.py) unless `--no-verify`.
The damaged checkpoint comes from the real quantize pipeline (conftest's smollm2_w4_checkpoint),
served by a real `gptq-gateway serve` process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from fixtures_grpc import start_gateway
from fixtures_model import write_gptq_checkpoint, write_tiny_model
from safetensors.torch import load_file, save_file

import native
from gateway.cli import build_parser
from gateway.cli_serve import engine_argv
from gateway.model import LlamaRunner
from gateway.model.slots import SlotRunner
from gateway.model.tensor_source import open_tensors
from quantize.errors import UserInputError

ALGORITHM_KEY = "gptqgw.checksum_algorithm"
SUMS_KEY = "gptqgw.checksums"
ZEROED = 4 << 20  # the 4 MB


def tensor_range(path: Path, name: str) -> tuple[int, int]:
    """Absolute [start, end) of a tensor's bytes in a safetensors file."""
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    start, end = header[name]["data_offsets"]
    return 8 + header_len + start, 8 + header_len + end


def zero_bytes(path: Path, start: int, count: int) -> None:
    with path.open("r+b") as f:
        f.seek(start)
        f.write(bytes(count))


def largest_tensor(path: Path) -> str:
    with native.SafetensorsReader(path) as reader:
        return max(reader.keys(), key=lambda k: np.prod(reader.info(k)[1]))


# --- the native writer and reader ---------------------------------------------------------------


def test_every_shard_records_its_tensors_checksums(tmp_path: Path) -> None:
    arrays = {f"t{i}": np.full((64,), i, dtype=np.float32) for i in range(6)}
    with native.SafetensorsWriter(tmp_path, max_shard_bytes=600, fsync=False) as writer:
        for name, array in arrays.items():
            writer.add(name, array)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) == 3
    covered = {}
    for shard in shards:
        with native.SafetensorsReader(shard) as reader:
            meta = reader.metadata()
            assert meta[ALGORITHM_KEY] == "xxh3_64"
            sums = json.loads(meta[SUMS_KEY])
            assert sorted(sums) == reader.keys()
            covered.update(sums)
    assert sorted(covered) == sorted(arrays)
    with native.SafetensorsReader(tmp_path) as reader:
        assert reader.verify_checksums() == 6


def test_damage_in_a_later_shard_names_tensor_and_file(tmp_path: Path) -> None:
    with native.SafetensorsWriter(tmp_path, max_shard_bytes=600, fsync=False) as writer:
        for i in range(6):
            writer.add(f"t{i}", np.full((64,), i + 1, dtype=np.float32))
    shard = tmp_path / "model-00003-of-00003.safetensors"
    start, _ = tensor_range(shard, "t5")
    zero_bytes(shard, start + 16, 4)
    with (
        native.SafetensorsReader(tmp_path) as reader,
        pytest.raises(ValueError, match=r"model-00003-of-00003\.safetensors: tensor 't5' is dama"),
    ):
        reader.verify_checksums()


def test_reserved_metadata_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"metadata key 'gptqgw\.checksums' is reserved"):
        native.SafetensorsWriter(tmp_path, metadata={SUMS_KEY: "{}"})


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({SUMS_KEY: "{}"}, "only one of"),
        ({ALGORITHM_KEY: "md5", SUMS_KEY: "{}"}, "'md5'"),
        ({ALGORITHM_KEY: "xxh3_64", SUMS_KEY: "not json"}, "not a JSON object"),
        ({ALGORITHM_KEY: "xxh3_64", SUMS_KEY: '{"w": 5}'}, "tensor 'w', not 16 hex"),
        ({ALGORITHM_KEY: "xxh3_64", SUMS_KEY: '{"x": "0000000000000000"}'}, "for tensor 'w'"),
    ],
)
def test_malformed_checksum_metadata_is_a_clear_error(
    tmp_path: Path, metadata: dict[str, str], message: str
) -> None:
    save_file({"w": torch.ones(4)}, str(tmp_path / "model.safetensors"), metadata=metadata)
    with native.SafetensorsReader(tmp_path) as reader, pytest.raises(ValueError, match=message):
        reader.verify_checksums()
    with pytest.raises(UserInputError, match="checksum verification failed"):
        open_tensors(tmp_path).verified()
    assert open_tensors(tmp_path, verify=False).get("w").sum() == 4


# --- loading ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def damaged_w4(smollm2_w4_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The real quantized SmolLM2 with 4 MB of its largest tensor zeroed."""
    path = tmp_path_factory.mktemp("damaged") / "w4"
    shutil.copytree(smollm2_w4_checkpoint, path)
    weights = path / "model.safetensors"
    name = largest_tensor(weights)
    start, end = tensor_range(weights, name)
    assert end - start > 2 * ZEROED
    zero_bytes(weights, (start + end) // 2 - ZEROED // 2, ZEROED)
    return path, name


def test_quantized_checkpoint_records_and_passes_checksums(smollm2_w4_checkpoint: Path) -> None:
    with native.SafetensorsReader(smollm2_w4_checkpoint) as reader:
        assert reader.verify_checksums() == len(reader.keys())


def test_damaged_checkpoint_fails_to_load_naming_the_tensor(damaged_w4: tuple) -> None:
    path, name = damaged_w4
    with pytest.raises(UserInputError, match=rf"tensor '{name}' is damaged"):
        LlamaRunner.load(path, max_model_len=64, num_blocks=4)


def test_serve_refuses_damaged_checkpoint_and_no_verify_loads_it(
    damaged_w4: tuple, tmp_path: Path
) -> None:
    path, name = damaged_w4
    failed = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", str(path), "--device", "cpu",
         "--grpc-port", "0", "--metrics-port", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert failed.returncode != 0
    assert f"tensor '{name}' is damaged" in failed.stdout + failed.stderr
    assert "--no-verify" in failed.stdout + failed.stderr
    served = start_gateway(path, tmp_path, ["--no-verify"])
    try:
        assert served.health_states[-1] == "SERVING"
    finally:
        assert served.stop() == 0


def test_foreign_checkpoint_without_checksums_loads(tmp_path: Path) -> None:
    hf = write_tiny_model(tmp_path / "hf", num_hidden_layers=1)
    gptq = write_gptq_checkpoint(hf, tmp_path / "gptq", bits=4, group_size=32)
    with safetensors.safe_open(gptq / "model.safetensors", framework="pt") as f:
        assert SUMS_KEY not in (f.metadata() or {})
    with native.SafetensorsReader(gptq) as reader:
        assert reader.verify_checksums() == 0
    runner = SlotRunner.load(gptq, num_slots=1, max_model_len=16)
    assert runner.prefill(0, [1, 2, 3]).isfinite().all()


def test_no_verify_flag_parses_and_is_passed_on_by_up() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "ckpt", "--no-verify"])
    assert args.verify_checksums is False
    assert "--no-verify" in engine_argv(args)
    default = parser.parse_args(["serve", "ckpt"])
    assert default.verify_checksums is True
    assert "--no-verify" not in engine_argv(default)


# --- item 13: the missing tensor's real name ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gptq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hf = write_tiny_model(tmp_path_factory.mktemp("hf"), num_hidden_layers=1)
    return write_gptq_checkpoint(hf, tmp_path_factory.mktemp("gptq"), bits=4, group_size=32)


def without(source: Path, target: Path, name: str) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("reference"))
    state = load_file(str(target / "model.safetensors"))
    del state[name]
    save_file(state, str(target / "model.safetensors"))
    return target


def test_missing_qweight_is_named_as_qweight(tiny_gptq: Path, tmp_path: Path) -> None:
    path = without(tiny_gptq, tmp_path / "c", "model.layers.0.mlp.down_proj.qweight")
    with pytest.raises(UserInputError) as caught:
        SlotRunner.load(path, num_slots=1, max_model_len=16)
    message = str(caught.value)
    assert "missing tensor 'model.layers.0.mlp.down_proj.qweight'" in message
    assert "down_proj.weight" not in message


def test_missing_dense_weight_is_still_named_as_weight(tmp_path: Path) -> None:
    hf = write_tiny_model(tmp_path / "hf", num_hidden_layers=1)
    path = without(hf, tmp_path / "c", "model.layers.0.mlp.down_proj.weight")
    with pytest.raises(
        UserInputError,
        match=r"missing tensor 'model\.layers\.0\.mlp\.down_proj\.weight' \(expected shape",
    ):
        SlotRunner.load(path, num_slots=1, max_model_len=16)
