"""native.SafetensorsReader on damaged files: a ValueError naming file and tensor, never a crash."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import native


def raw_file(header: dict | str, data: bytes) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    encoded = text.encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def entry(dtype: str, shape: list[int], start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def open_bytes(tmp_path: Path, content: bytes, name: str = "bad.safetensors") -> None:
    path = tmp_path / name
    path.write_bytes(content)
    native.SafetensorsReader(path)


CORRUPT_CASES = [
    ("empty", b"", r"truncated: 0 bytes"),
    ("short", b"\x01\x00\x00", r"truncated: 3 bytes"),
    ("huge header", struct.pack("<Q", 2**62) + b"{}", r"exceeds the 100000000-byte limit"),
    ("header past end", struct.pack("<Q", 100) + b"{}", r"header length 100 runs past the end"),
    ("bad json", raw_file('{"w": {"dtype": ', b""), r"not valid JSON"),
    ("not an object", raw_file("[1, 2]", b""), r"does not start with"),
    ("not utf8", struct.pack("<Q", 3) + b"{\xff}", r"not valid UTF-8"),
    (
        "unknown dtype",
        raw_file({"w": entry("F4", [2], 0, 1)}, b"\0"),
        r"tensor 'w': unknown dtype 'F4'",
    ),
    (
        "byte count mismatch",
        raw_file({"w": entry("F32", [2, 3], 0, 20)}, bytes(24)),
        r"tensor 'w': data_offsets \[0, 20\] hold 20 bytes, "
        r"but dtype F32 and shape \[2, 3\] need 24",
    ),
    (
        "offsets past data",
        raw_file({"w": entry("F32", [4], 0, 16)}, bytes(8)),
        r"tensor 'w': data_offsets \[0, 16\] run past the data section",
    ),
    (
        "offsets reversed",
        raw_file({"w": entry("U8", [0], 4, 2)}, bytes(8)),
        r"tensor 'w': data_offsets \[4, 2\] end before they start",
    ),
    (
        "overlap",
        raw_file({"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 2, 6)}, bytes(6)),
        r"tensors 'a' \[0, 4\] and 'b' \[2, 6\] overlap",
    ),
    (
        "negative dim",
        raw_file({"w": entry("U8", [-1], 0, 1)}, bytes(1)),
        r"tensor 'w': shape must be a list of non-negative integers",
    ),
    (
        "shape overflow",
        raw_file({"w": entry("F64", [2**62, 2**62], 0, 8)}, bytes(8)),
        r"tensor 'w': shape .* overflows",
    ),
    (
        "missing field",
        raw_file({"w": {"dtype": "U8", "shape": [1]}}, bytes(1)),
        r"tensor 'w': missing 'data_offsets'",
    ),
    (
        "bad metadata",
        raw_file({"__metadata__": {"k": 1}}, b""),
        r"__metadata__\['k'\] must be a string",
    ),
]


@pytest.mark.parametrize(
    "content,message", [c[1:] for c in CORRUPT_CASES], ids=[c[0] for c in CORRUPT_CASES]
)
def test_corrupt_headers_raise_value_error_naming_file(
    tmp_path: Path, content: bytes, message: str
) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        open_bytes(tmp_path, content)
    assert "bad.safetensors" in str(raised.value)


@pytest.fixture(scope="module")
def good_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    directory = tmp_path_factory.mktemp("good")
    with native.SafetensorsWriter(directory) as writer:
        writer.add("a.weight", np.arange(24, dtype=np.float32).reshape(4, 6))
        writer.add("b.bias", np.arange(6, dtype=np.float16))
        writer.add("c.bits", np.arange(10, dtype=np.uint16), dtype="BF16")
    return (directory / "model.safetensors").read_bytes()


def test_every_truncation_of_a_good_file_is_refused(tmp_path: Path, good_file: bytes) -> None:
    header_end = 8 + struct.unpack("<Q", good_file[:8])[0]
    cut_points = sorted(
        {0, 4, 8, 9, header_end // 2, header_end, header_end + 1, len(good_file) - 1}
    )
    for cut in cut_points:
        with pytest.raises(ValueError, match=r"bad\.safetensors: (truncated|.*run)"):
            open_bytes(tmp_path, good_file[:cut])


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_random_damage_never_crashes(tmp_path: Path, good_file: bytes, data: st.DataObject) -> None:
    """Flip bytes in the header region or truncate anywhere: the reader either refuses with a
    ValueError or serves tensors that lie inside the file."""
    damaged = bytearray(good_file)
    header_end = min(len(damaged), 8 + 512)
    for _ in range(data.draw(st.integers(1, 6))):
        position = data.draw(st.integers(0, header_end - 1))
        damaged[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del damaged[data.draw(st.integers(0, len(damaged))) :]
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(damaged))
    try:
        reader = native.SafetensorsReader(path)
    except ValueError as e:
        assert "fuzz.safetensors" in str(e)
        return
    with reader:
        for name in reader.keys():  # noqa: SIM118 (keys() is the API under test)
            reader.get(name)


# --- directories and indexes -----------------------------------------------------------------


def write_index(directory: Path, weight_map: dict[str, str]) -> None:
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def test_index_problems(tmp_path: Path) -> None:
    safetensors.numpy.save_file({"a": np.zeros(2)}, tmp_path / "s1.safetensors")
    write_index(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors"})
    with pytest.raises(ValueError, match=r"s1\.safetensors: the index maps tensor 'b'"):
        native.SafetensorsReader(tmp_path)
    write_index(tmp_path, {"a": "s1.safetensors", "b": "missing.safetensors"})
    with pytest.raises(FileNotFoundError, match=r"missing.safetensors"):
        native.SafetensorsReader(tmp_path)
    write_index(tmp_path, {"a": "../s1.safetensors"})
    with pytest.raises(ValueError, match="not a file beside the index"):
        native.SafetensorsReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{nope")
    with pytest.raises(ValueError, match=r"index\.json: index is not valid JSON"):
        native.SafetensorsReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match='index has no "weight_map"'):
        native.SafetensorsReader(tmp_path)


def test_duplicate_tensor_across_shards_is_refused(tmp_path: Path) -> None:
    safetensors.numpy.save_file({"a": np.zeros(2)}, tmp_path / "s1.safetensors")
    safetensors.numpy.save_file({"a": np.ones(2), "b": np.ones(2)}, tmp_path / "s2.safetensors")
    write_index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})
    with pytest.raises(ValueError, match="tensor 'a' is also in"):
        native.SafetensorsReader(tmp_path)


def test_directory_without_checkpoint_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no model.safetensors or model.safetensors.index.json"):
        native.SafetensorsReader(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        native.SafetensorsReader(tmp_path / "nothing-here")


def test_directory_with_one_other_file(tmp_path: Path) -> None:
    safetensors.numpy.save_file({"x": np.arange(3)}, tmp_path / "adapter.safetensors")
    with native.SafetensorsReader(tmp_path) as reader:
        np.testing.assert_array_equal(reader.get("x"), np.arange(3))
