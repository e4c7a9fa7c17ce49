"""native.SafetensorsWriter / SafetensorsReader against the `safetensors` package itself."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from safetensors import safe_open

import native

NUMPY_DTYPES = [
    np.float64,
    np.float32,
    np.float16,
    np.int64,
    np.int32,
    np.int16,
    np.int8,
    np.uint8,
    np.bool_,
]


def sample(dtype: type, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype is np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16)


def listing(directory: Path) -> list[str]:
    """Every entry, hidden temporary files included."""
    return sorted(os.listdir(directory))


def user_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The metadata minus the checksums the writer records (tests/test_hardening_checksums.py)."""
    return {k: v for k, v in metadata.items() if not k.startswith("gptqgw.checksum")}


# --- our writer, their loader ----------------------------------------------------------------


def test_all_dtypes_load_with_safetensors(tmp_path: Path) -> None:
    arrays = {f"t_{np.dtype(d).name}": sample(d, (3, 5), i) for i, d in enumerate(NUMPY_DTYPES)}
    arrays["scalar"] = np.array(2.5, dtype=np.float32)
    arrays["empty"] = np.zeros((0, 4), dtype=np.int32)
    bf16 = torch.randn(4, 6).to(torch.bfloat16)
    with native.SafetensorsWriter(tmp_path, metadata={"source": "test"}) as writer:
        for name, array in arrays.items():
            writer.add(name, array)
        writer.add("bf16", bf16_bits(bf16), dtype="BF16")
    assert listing(tmp_path) == ["model.safetensors"]
    path = tmp_path / "model.safetensors"
    # safe_open rather than safetensors.numpy.load_file: numpy has no bf16 to load "bf16" into.
    with safe_open(path, framework="np") as f:
        assert user_metadata(f.metadata()) == {"format": "pt", "source": "test"}
        for name, array in arrays.items():
            got = f.get_tensor(name)
            assert got.dtype == array.dtype and got.shape == array.shape, name
            np.testing.assert_array_equal(got, array)
    loaded = safetensors.torch.load_file(path)
    assert loaded["bf16"].dtype == torch.bfloat16
    assert torch.equal(loaded["bf16"], bf16)
    np.testing.assert_array_equal(loaded["t_float16"].numpy(), arrays["t_float16"])


def test_plain_dict_round_trip_with_numpy_loader(tmp_path: Path) -> None:
    arrays = {f"layer.{i}.w": sample(np.float32, (7, i + 1), i) for i in range(5)}
    with native.SafetensorsWriter(tmp_path) as writer:
        for name, array in arrays.items():
            writer.add(name, array)
    loaded = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == arrays.keys()
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name], array)


def test_non_contiguous_arrays_are_written_in_logical_order(tmp_path: Path) -> None:
    base = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
    variants = {
        "fortran": np.asfortranarray(base),
        "transpose": base.T,
        "strided": base[::2, 1::3],
        "reversed": base[::-1],
        "broadcast": np.broadcast_to(base[0], (3, 8)),
    }
    assert not any(v.flags.c_contiguous for v in variants.values())
    with native.SafetensorsWriter(tmp_path) as writer:
        for name, array in variants.items():
            writer.add(name, array)
    loaded = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    for name, array in variants.items():
        np.testing.assert_array_equal(loaded[name], array, err_msg=name)


def test_big_endian_arrays_are_stored_little_endian(tmp_path: Path) -> None:
    array = np.arange(10, dtype=">f4")
    with native.SafetensorsWriter(tmp_path) as writer:
        writer.add("be", array)
    np.testing.assert_array_equal(
        safetensors.numpy.load_file(tmp_path / "model.safetensors")["be"], array
    )


def test_sharding_and_index(tmp_path: Path) -> None:
    arrays = {f"t{i}": sample(np.float32, (25,), i) for i in range(7)}  # 100 bytes each
    arrays["big"] = sample(np.float32, (100,), 99)  # over the limit: a shard of its own
    writer = native.SafetensorsWriter(tmp_path, max_shard_bytes=250, metadata={"k": "v"})
    for name, array in arrays.items():
        writer.add(name, array)
    assert writer.total_size == 7 * 100 + 400
    names = writer.finish()
    shards = [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    assert names == [*shards, "model.safetensors.index.json"]
    assert listing(tmp_path) == sorted(names)

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 1100}
    assert index["weight_map"]["t0"] == shards[0] and index["weight_map"]["t2"] == shards[1]
    assert index["weight_map"]["big"] == shards[4]
    for shard in shards:
        with safe_open(tmp_path / shard, framework="np") as f:
            assert user_metadata(f.metadata()) == {"format": "pt", "k": "v"}
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert index["weight_map"][name] == shard
                np.testing.assert_array_equal(f.get_tensor(name), arrays[name])

    with native.SafetensorsReader(tmp_path) as reader:
        assert reader.keys() == sorted(arrays)
        for name, array in arrays.items():
            np.testing.assert_array_equal(reader.get(name), array)


def test_many_tensors_in_a_large_shard_keep_a_valid_padded_header(tmp_path: Path) -> None:
    # 17 MiB of data keeps the shard's reserved header region; 3000 names overflow it, which
    # exercises the grown-header rewrite too.
    big = np.ones(17 << 18, dtype=np.float32)
    with native.SafetensorsWriter(tmp_path, max_shard_bytes=1 << 30) as writer:
        writer.add("big", big)
        for i in range(3000):
            writer.add(f"model.layers.{i}.self_attn.q_proj.scales", np.full(2, i, np.int32))
    path = tmp_path / "model.safetensors"
    with safe_open(path, framework="np") as f:
        assert len(f.keys()) == 3001
        np.testing.assert_array_equal(
            f.get_tensor("model.layers.2999.self_attn.q_proj.scales"), [2999, 2999]
        )
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    assert 8 + header_len > (1 << 30) // 4096  # outgrew the reserve sized for 1 GiB shards
    assert (8 + header_len) % 8 == 0


def test_writers_output_replaces_a_stale_layout(tmp_path: Path) -> None:
    with native.SafetensorsWriter(tmp_path) as writer:
        writer.add("old", np.zeros(3, np.float32))
    with native.SafetensorsWriter(tmp_path, max_shard_bytes=8) as writer:
        writer.add("a", np.zeros(2, np.float32))
        writer.add("b", np.ones(2, np.float32))
    # The old single file would shadow the new index for every loader.
    assert "model.safetensors" not in listing(tmp_path)
    with native.SafetensorsReader(tmp_path) as reader:
        assert reader.keys() == ["a", "b"]


def test_concurrent_adds_from_threads(tmp_path: Path) -> None:
    writer = native.SafetensorsWriter(tmp_path, max_shard_bytes=10_000)

    def add_some(thread: int) -> None:
        for i in range(50):
            writer.add(f"t{thread}.{i}", np.full(100, thread * 1000 + i, np.int32))

    threads = [threading.Thread(target=add_some, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.finish()
    with native.SafetensorsReader(tmp_path) as reader:
        assert len(reader) == 200
        for thread in range(4):
            assert (reader.get(f"t{thread}.49") == thread * 1000 + 49).all()


# --- their writer, our reader ----------------------------------------------------------------


def test_reader_opens_files_written_by_safetensors(tmp_path: Path) -> None:
    tensors = {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(2, 3).to(torch.bfloat16),
        "f64": torch.randn(2).double(),
        "i64": torch.arange(6).reshape(2, 3),
        "i32": torch.arange(4, dtype=torch.int32),
        "i16": torch.arange(4, dtype=torch.int16),
        "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(4, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.0),
        "fp8": torch.randn(4).to(torch.float8_e4m3fn),
    }
    path = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt", "who": "them"})
    with native.SafetensorsReader(path) as reader:
        assert reader.keys() == sorted(tensors)
        assert reader.metadata() == {"format": "pt", "who": "them"}
        assert reader.info("bf16") == ("BF16", (2, 3))
        assert reader.info("scalar") == ("F32", ())
        assert reader.info("fp8") == ("F8_E4M3", (4,))
        for name, tensor in tensors.items():
            got = reader.get_torch(name)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
            assert torch.equal(
                got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
            )
            if tensor.dtype not in (torch.bfloat16, torch.float8_e4m3fn):
                np.testing.assert_array_equal(reader.get(name), tensor.numpy())
        np.testing.assert_array_equal(reader.get("bf16"), bf16_bits(tensors["bf16"]))
        assert "f32" in reader and "missing" not in reader


def test_get_is_a_zero_copy_read_only_view_that_outlives_the_reader(tmp_path: Path) -> None:
    array = sample(np.float32, (64, 64))
    safetensors.numpy.save_file({"w": array}, tmp_path / "m.safetensors")
    reader = native.SafetensorsReader(tmp_path / "m.safetensors")
    view = reader.get("w")
    assert not view.flags.owndata and not view.flags.writeable
    assert type(view.base).__name__ == "MappedFile"
    with pytest.raises(ValueError, match="read-only"):
        view[0, 0] = 1.0
    reader.close()
    del reader
    gc.collect()
    np.testing.assert_array_equal(view, array)  # the mapping lives while a view does


def test_copy_on_write_views_never_touch_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    safetensors.numpy.save_file({"w": np.zeros(8, np.float32)}, path)
    before = path.read_bytes()
    with native.SafetensorsReader(path) as reader:
        writable = reader.get("w", copy_on_write=True)
        writable[:] = 7.0
        tensor = reader.get_torch("w")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns on non-writable arrays: not here
            tensor.add_(1.0)
            torch.from_numpy(reader.get("w", copy_on_write=True))
        assert (reader.get("w") == 0).all()
    assert path.read_bytes() == before


def test_unaligned_tensor_comes_back_correct(tmp_path: Path) -> None:
    # An odd-sized uint8 tensor first puts the following int32 at an unaligned offset.
    arrays = {"a_odd": np.arange(3, dtype=np.uint8), "b_i32": np.arange(5, dtype=np.int32)}
    path = tmp_path / "m.safetensors"
    safetensors.numpy.save_file(arrays, path)
    with native.SafetensorsReader(path) as reader:
        np.testing.assert_array_equal(reader.get("b_i32"), arrays["b_i32"])
        assert reader.get_torch("b_i32").tolist() == [0, 1, 2, 3, 4]


def test_reader_after_close_and_unknown_names(tmp_path: Path) -> None:
    safetensors.numpy.save_file({"w": np.zeros(2)}, tmp_path / "m.safetensors")
    reader = native.SafetensorsReader(tmp_path / "m.safetensors")
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        reader.get("nope")
    reader.close()
    with pytest.raises(ValueError, match="is closed"):
        reader.get("w")


# --- atomicity -------------------------------------------------------------------------------


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    writer = native.SafetensorsWriter(tmp_path, max_shard_bytes=100)
    for i in range(5):
        writer.add(f"t{i}", np.zeros(30, np.float32))
    assert listing(tmp_path)  # temporary shards exist while writing
    writer.abort()
    assert listing(tmp_path) == []
    with pytest.raises(ValueError, match="aborted"):
        writer.add("late", np.zeros(1))


def test_exception_inside_with_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), native.SafetensorsWriter(tmp_path) as writer:
        writer.add("t", np.zeros(1000, np.float32))
        raise RuntimeError("boom")
    assert listing(tmp_path) == []


def test_dropped_writer_leaves_nothing(tmp_path: Path) -> None:
    writer = native.SafetensorsWriter(tmp_path)
    writer.add("t", np.zeros(10))
    del writer
    gc.collect()
    assert listing(tmp_path) == []


def test_failed_rename_during_finish_rolls_back(tmp_path: Path) -> None:
    # A directory squatting on the second shard's final name makes its rename fail after the
    # first shard was already renamed: the first must be removed again.
    (tmp_path / "model-00002-of-00002.safetensors").mkdir()
    writer = native.SafetensorsWriter(tmp_path, max_shard_bytes=8)
    writer.add("a", np.zeros(2, np.float32))
    writer.add("b", np.zeros(2, np.float32))
    with pytest.raises(OSError, match="renaming into model-00002-of-00002"):
        writer.finish()
    assert listing(tmp_path) == ["model-00002-of-00002.safetensors"]  # only the squatter


DISK_FULL_SCRIPT = """
import resource, signal, sys
import numpy as np
import native
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
writer = native.SafetensorsWriter(sys.argv[1], max_shard_bytes=1 << 22)
writer.add("fits", np.zeros(1000, np.float32))
try:
    writer.add("too_big", np.zeros(1 << 19, np.float32))
except OSError as e:
    print("OSError", e.errno, e)
else:
    print("no error")
"""


def test_write_error_raises_oserror_and_leaves_nothing(tmp_path: Path) -> None:
    """A full disk, simulated with a file-size limit in a child process."""
    result = subprocess.run(
        [sys.executable, "-c", DISK_FULL_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OSError 27"), result.stdout  # EFBIG
    assert "too_big" in result.stdout
    assert listing(tmp_path) == []


# --- bad input to the writer -----------------------------------------------------------------


def test_missing_or_invalid_output_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        native.SafetensorsWriter(missing)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        native.SafetensorsWriter(tmp_path / "file")
    with pytest.raises(ValueError, match="max_shard_bytes must be positive, got 0"):
        native.SafetensorsWriter(tmp_path, max_shard_bytes=0)
    with pytest.raises(ValueError, match="filename_prefix"):
        native.SafetensorsWriter(tmp_path, filename_prefix="a/b")
    with pytest.raises(TypeError, match="metadata must map str to str"):
        native.SafetensorsWriter(tmp_path, metadata={"n": 1})


def test_add_refuses_bad_tensors_and_stays_usable(tmp_path: Path) -> None:
    writer = native.SafetensorsWriter(tmp_path)
    writer.add("ok", np.zeros(2, np.float32))
    cases = [
        (("ok", np.zeros(2)), ValueError, "tensor name 'ok' was already added"),
        (("__metadata__", np.zeros(2)), ValueError, "invalid tensor name"),
        (("c", np.zeros(2, np.complex64)), ValueError, "numpy dtype complex64 cannot be stored"),
        (("o", np.array([None])), ValueError, "numpy dtype object cannot be stored"),
        (("b", np.zeros(2, np.float32), "BF16"), ValueError, "'BF16' does not fit a numpy float32"),
        (("u", np.zeros(2, np.uint16), "Q4"), ValueError, "unknown dtype 'Q4'"),
        (("l", [1.0, 2.0]), TypeError, "must be a numpy.ndarray, got list"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            writer.add(*args)
    writer.add("after", np.ones(1, np.int8))
    assert writer.finish() == ["model.safetensors"]
    with pytest.raises(ValueError, match="already finished"):
        writer.finish()
    assert safetensors.numpy.load_file(tmp_path / "model.safetensors").keys() == {"ok", "after"}
