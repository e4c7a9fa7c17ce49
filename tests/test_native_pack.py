"""native.pack_* / unpack_* / repack against a plain numpy reference and hand-computed words."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import native

BITS = (2, 3, 4, 8)


def codes_per_unit(bits: int) -> int:
    """Smallest number of codes that fill whole int32 words (32 for 3 bits, 32/bits else)."""
    return 32 if bits == 3 else 32 // bits


def reference_pack_columns(values: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's order, stated plainly: down each column, code k sits at bit bits*k of a
    little-endian stream of 32-bit words (3-bit codes straddle word boundaries)."""
    rows, cols = values.shape
    words = np.zeros((rows * bits // 32, cols), dtype=np.uint64)
    for k in range(rows):
        bit = bits * k
        word, shift = divmod(bit, 32)
        v = values[k].astype(np.uint64)
        words[word] |= (v << np.uint64(shift)) & np.uint64(0xFFFFFFFF)
        if shift + bits > 32:
            words[word + 1] |= v >> np.uint64(32 - shift)
    return words.astype(np.uint32).view(np.int32)


def reference_pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    return np.ascontiguousarray(reference_pack_columns(np.ascontiguousarray(values.T), bits).T)


def random_codes(rng: np.random.Generator, shape: tuple[int, int], bits: int) -> np.ndarray:
    return rng.integers(0, 2**bits, size=shape, dtype=np.uint8)


# --- bit-exactness against words computed by hand -------------------------------------------


def test_pack_qweight_4bit_hand_example() -> None:
    column = np.arange(1, 9, dtype=np.uint8).reshape(8, 1)  # codes 1..8 down one column
    assert native.pack_qweight(column, 4)[0, 0] == np.int32(np.uint32(0x87654321).view(np.int32))


def test_pack_qweight_2bit_hand_example() -> None:
    column = np.zeros((16, 1), dtype=np.uint8)
    column[0], column[2], column[3], column[15] = 3, 1, 2, 2
    # 3 at bits 0-1, 1 at bits 4-5, 2 at bits 6-7, 2 at bits 30-31.
    expected = np.uint32(0x80000093).view(np.int32)
    assert native.pack_qweight(column, 2)[0, 0] == expected


def test_pack_qweight_8bit_hand_example() -> None:
    column = np.array([[0x01], [0x23], [0x45], [0xFF]], dtype=np.uint8)
    assert native.pack_qweight(column, 8)[0, 0] == np.uint32(0xFF452301).view(np.int32)


def test_pack_qweight_3bit_straddles_like_autogptq() -> None:
    column = np.zeros((32, 1), dtype=np.uint8)
    column[0] = 1  # bits 0-2 of word 0
    column[10] = 7  # bits 30-31 of word 0, bit 0 of word 1 (AutoGPTQ: << 30, then >> 2 & 1)
    column[21] = 5  # bit 31 of word 1, bits 0-1 of word 2 (AutoGPTQ: << 31, then >> 1 & 3)
    column[31] = 6  # bits 29-31 of word 2
    words = native.pack_qweight(column, 3)[:, 0].view(np.uint32)
    assert [hex(w) for w in words] == ["0xc0000001", "0x80000001", "0xc0000002"]


def test_pack_qzeros_stores_zero_minus_one_along_output() -> None:
    zeros = np.arange(1, 9, dtype=np.int32).reshape(1, 8)  # true zero points 1..8
    packed = native.pack_qzeros(zeros, 4)
    assert packed.shape == (1, 1)
    assert packed[0, 0] == np.int32(0x76543210)


# --- round trips against the reference -------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("units,cols", [(1, 1), (2, 3), (3, 31), (2, 4099), (4, 2048)])
def test_pack_qweight_matches_reference_and_round_trips(bits: int, units: int, cols: int) -> None:
    rng = np.random.default_rng(bits * 1000 + units * 10 + cols)
    values = random_codes(rng, (units * codes_per_unit(bits), cols), bits)
    packed = native.pack_qweight(values, bits)
    assert packed.dtype == np.int32
    assert packed.shape == (values.shape[0] * bits // 32, cols)
    np.testing.assert_array_equal(packed, reference_pack_columns(values, bits))
    unpacked = native.unpack_qweight(packed, bits)
    assert unpacked.dtype == np.uint8
    np.testing.assert_array_equal(unpacked, values)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("fill", ["zero", "max"])
def test_edge_values(bits: int, fill: str) -> None:
    value = 0 if fill == "zero" else 2**bits - 1
    values = np.full((codes_per_unit(bits) * 2, 37), value, dtype=np.uint8)
    packed = native.pack_qweight(values, bits)
    expected_word = 0 if fill == "zero" else -1  # every bit set when every code is the max
    assert (packed == expected_word).all()
    np.testing.assert_array_equal(native.unpack_qweight(packed, bits), values)


@settings(max_examples=80, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    units=st.integers(1, 5),
    cols=st.integers(1, 67),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([np.uint8, np.int32, np.int64, np.uint16, np.int8]),
)
def test_pack_qweight_property(bits: int, units: int, cols: int, seed: int, dtype: type) -> None:
    assume(not (dtype is np.int8 and bits == 8))  # int8 cannot hold codes above 127
    rng = np.random.default_rng(seed)
    values = random_codes(rng, (units * codes_per_unit(bits), cols), bits)
    packed = native.pack_qweight(values.astype(dtype), bits)
    np.testing.assert_array_equal(packed, reference_pack_columns(values, bits))
    np.testing.assert_array_equal(native.unpack_qweight(packed, bits), values)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    groups=st.integers(1, 6),
    units=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_qzeros_property(bits: int, groups: int, units: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    out_features = units * codes_per_unit(bits)
    zeros = rng.integers(1, 2**bits + 1, size=(groups, out_features), dtype=np.int64)
    packed = native.pack_qzeros(zeros, bits)
    assert packed.shape == (groups, out_features * bits // 32)
    np.testing.assert_array_equal(packed, reference_pack_rows(zeros - 1, bits))
    np.testing.assert_array_equal(native.unpack_qzeros(packed, bits, out_features), zeros)


def test_qzeros_extremes_8bit_need_wide_ints() -> None:
    zeros = np.array([[1, 256, 128, 2]], dtype=np.int32)  # 256 does not fit uint8
    np.testing.assert_array_equal(native.unpack_qzeros(native.pack_qzeros(zeros, 8), 8, 4), zeros)


def test_non_contiguous_inputs_pack_in_logical_order() -> None:
    rng = np.random.default_rng(7)
    values = random_codes(rng, (64, 48), 4)
    expected = reference_pack_columns(values, 4)
    fortran = np.asfortranarray(values)
    transposed_back = np.ascontiguousarray(values.T).T  # a transpose view
    strided = np.repeat(values, 2, axis=1)[:, ::2]  # a strided slice
    for variant in (fortran, transposed_back, strided):
        assert not variant.flags.c_contiguous
        np.testing.assert_array_equal(native.pack_qweight(variant, 4), expected)
    packed = native.pack_qweight(values, 4)
    np.testing.assert_array_equal(native.unpack_qweight(np.asfortranarray(packed), 4), values)


def test_big_endian_input_is_read_by_value() -> None:
    values = random_codes(np.random.default_rng(3), (8, 5), 4)
    swapped = values.astype(">i4")
    np.testing.assert_array_equal(native.pack_qweight(swapped, 4), native.pack_qweight(values, 4))


def test_unpack_accepts_uint32_words() -> None:
    values = random_codes(np.random.default_rng(5), (32, 9), 3)
    packed = native.pack_qweight(values, 3)
    np.testing.assert_array_equal(native.unpack_qweight(packed.view(np.uint32), 3), values)


@pytest.mark.parametrize("shape", [(0, 5), (8, 0), (0, 0)])
def test_empty_shapes(shape: tuple[int, int]) -> None:
    codes = np.zeros(shape, np.uint8)
    packed = native.pack_qweight(codes, 4)
    assert packed.shape == (shape[0] // 8, shape[1])
    assert native.unpack_qweight(packed, 4).shape == shape
    zeros = np.ones((shape[1], shape[0]), np.int32)  # [groups, out_features]
    assert native.unpack_qzeros(native.pack_qzeros(zeros, 4), 4, shape[0]).shape == zeros.shape
    assert native.repack(packed, 4, "transposed").shape == packed.shape[::-1]


# --- repack ----------------------------------------------------------------------------------


def test_repack_layouts() -> None:
    values = random_codes(np.random.default_rng(11), (128, 70), 4)
    qweight = native.pack_qweight(values, 4)
    same = native.repack(qweight, 4, "gptq")
    np.testing.assert_array_equal(same, qweight)
    assert same.flags.c_contiguous and not np.shares_memory(same, qweight)
    transposed = native.repack(qweight, 4, "transposed")
    assert transposed.shape == (70, 16) and transposed.dtype == np.int32
    assert transposed.flags.c_contiguous
    np.testing.assert_array_equal(transposed, qweight.T)


def test_repack_unknown_layout_lists_known() -> None:
    qweight = native.pack_qweight(np.zeros((8, 4), np.uint8), 4)
    with pytest.raises(ValueError, match=r"unknown layout 'marlin'.*gptq, transposed"):
        native.repack(qweight, 4, "marlin")


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.bool_, np.complex64])
def test_pack_qweight_refuses_non_integer_dtypes(dtype: type) -> None:
    name = np.dtype(dtype).name
    with pytest.raises(ValueError, match=rf"intweight must be .*got dtype {name}"):
        native.pack_qweight(np.zeros((8, 4), dtype=dtype), 4)


def test_pack_qweight_names_first_out_of_range_value() -> None:
    values = np.zeros((16, 10), dtype=np.uint8)
    values[5, 7] = 16
    values[9, 2] = 200
    with pytest.raises(ValueError, match=r"value 16 at index \(5, 7\).*4-bit.*0\.\.=15"):
        native.pack_qweight(values, 4)


def test_pack_qweight_refuses_negative_and_huge_values() -> None:
    with pytest.raises(ValueError, match=r"value -1 at index \(0, 1\)"):
        native.pack_qweight(np.array([[0, -1]] * 8, dtype=np.int32), 4)
    with pytest.raises(ValueError, match=r"value 4294967297 at index \(2, 0\)"):
        native.pack_qweight(np.array([[0], [0], [2**32 + 1], [0]], dtype=np.int64), 8)


@pytest.mark.parametrize("bits,rows", [(4, 12), (3, 16), (2, 8), (8, 6)])
def test_pack_qweight_in_features_must_fill_words(bits: int, rows: int) -> None:
    with pytest.raises(ValueError, match=r"in_features.*must be a multiple of 32"):
        native.pack_qweight(np.zeros((rows, 4), np.uint8), bits)


@pytest.mark.parametrize("bad_bits", [0, 1, 5, 16])
def test_bits_must_be_supported(bad_bits: int) -> None:
    with pytest.raises(ValueError, match=rf"bits must be one of 2, 3, 4, 8, got {bad_bits}"):
        native.pack_qweight(np.zeros((32, 4), np.uint8), bad_bits)
    with pytest.raises(ValueError, match="bits must be one of"):
        native.unpack_qweight(np.zeros((4, 4), np.int32), bad_bits)


def test_shape_and_type_errors() -> None:
    with pytest.raises(ValueError, match=r"intweight must be 2-D.*\(8,\)"):
        native.pack_qweight(np.zeros(8, np.uint8), 4)
    with pytest.raises(TypeError, match=r"intweight must be a numpy.ndarray, got list"):
        native.pack_qweight([[1] * 4] * 8, 4)
    with pytest.raises(ValueError, match=r"qweight must be int32.*got dtype float32"):
        native.unpack_qweight(np.zeros((4, 4), np.float32), 4)
    with pytest.raises(
        ValueError, match="qweight has 4 rows; for 3 bits it must be a multiple of 3"
    ):
        native.unpack_qweight(np.zeros((4, 4), np.int32), 3)


def test_pack_qzeros_refuses_zero_point_zero() -> None:
    zeros = np.ones((2, 8), dtype=np.int32)
    zeros[1, 3] = 0
    with pytest.raises(ValueError, match=r"index \(1, 3\).*cannot store a zero point of 0"):
        native.pack_qzeros(zeros, 4)


def test_pack_qzeros_range_and_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"value 17 at index \(0, 0\).*1\.\.=16"):
        native.pack_qzeros(np.full((1, 8), 17, np.int32), 4)
    with pytest.raises(ValueError, match=r"out_features.*must be a multiple of 32"):
        native.pack_qzeros(np.ones((1, 12), np.int32), 4)
    with pytest.raises(ValueError, match=r"zeros must be an integer array.*float32"):
        native.pack_qzeros(np.ones((1, 8), np.float32), 4)
    packed = native.pack_qzeros(np.ones((2, 16), np.int32), 4)
    with pytest.raises(ValueError, match="qzeros has 2 columns; out_features=8"):
        native.unpack_qzeros(packed, 4, 8)
