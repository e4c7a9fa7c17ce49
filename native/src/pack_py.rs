//! Python face of the packing kernels: argument checks, dtype dispatch, GIL release.

use numpy::ndarray::Array2;
use numpy::{
    Element, IntoPyArray, PyArray2, PyArrayDescrMethods, PyReadonlyArray2, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::bitpack::{self, BadValue, Code, SUPPORTED_BITS};

const KNOWN_LAYOUTS: [&str; 2] = ["gptq", "transposed"];

/// The argument as a numpy array in native byte order, or a TypeError naming the argument.
pub fn numpy_array<'py>(
    obj: &Bound<'py, PyAny>,
    arg: &str,
) -> PyResult<Bound<'py, PyUntypedArray>> {
    let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
        let type_name = obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!(
            "{arg} must be a numpy.ndarray, got {type_name} (for a torch tensor pass tensor.numpy())"
        ))
    })?;
    if arr.dtype().is_native_byteorder() == Some(false) {
        // Byte-swapped input: convert once so the kernels only ever see native integers.
        let native = arr.dtype().call_method1("newbyteorder", ("=",))?;
        let converted = arr.call_method1("astype", (native,))?;
        return Ok(converted.cast_into::<PyUntypedArray>()?);
    }
    Ok(arr.clone())
}

pub fn dtype_name(arr: &Bound<'_, PyUntypedArray>) -> String {
    arr.dtype()
        .str()
        .map(|s| s.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn check_bits(bits: u32) -> PyResult<()> {
    if SUPPORTED_BITS.contains(&bits) {
        Ok(())
    } else {
        Err(PyValueError::new_err(format!(
            "bits must be one of 2, 3, 4, 8, got {bits}"
        )))
    }
}

fn check_2d(arr: &Bound<'_, PyUntypedArray>, arg: &str, what: &str) -> PyResult<(usize, usize)> {
    match arr.shape() {
        [rows, cols] => Ok((*rows, *cols)),
        shape => Err(PyValueError::new_err(format!(
            "{arg} must be 2-D {what}, got shape {}",
            python_shape(shape)
        ))),
    }
}

/// A shape as Python prints it: (8,), (2, 3).
fn python_shape(shape: &[usize]) -> String {
    match shape {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Integer dtypes the packers take; anything else is refused with its name.
#[derive(Clone, Copy)]
enum IntKind {
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
}

fn int_kind(arr: &Bound<'_, PyUntypedArray>, arg: &str, expected: &str) -> PyResult<IntKind> {
    let dtype = arr.dtype();
    let kind = match (dtype.kind(), dtype.itemsize()) {
        (b'u', 1) => Some(IntKind::U8),
        (b'u', 2) => Some(IntKind::U16),
        (b'u', 4) => Some(IntKind::U32),
        (b'u', 8) => Some(IntKind::U64),
        (b'i', 1) => Some(IntKind::I8),
        (b'i', 2) => Some(IntKind::I16),
        (b'i', 4) => Some(IntKind::I32),
        (b'i', 8) => Some(IntKind::I64),
        _ => None,
    };
    kind.ok_or_else(|| {
        PyValueError::new_err(format!(
            "{arg} must be {expected}, got dtype {}",
            dtype_name(arr)
        ))
    })
}

/// Runs `f` on a C-ordered slice of the array's elements (a copy only when the input is not
/// C-contiguous), with the GIL released.
fn with_c_slice<T, R>(
    py: Python<'_>,
    arr: &Bound<'_, PyUntypedArray>,
    f: impl FnOnce(&[T]) -> R + Send,
) -> PyResult<R>
where
    T: Element + Clone + Sync,
    R: Send,
{
    let ro: PyReadonlyArray2<T> = arr.extract()?;
    let view = ro.as_array();
    let standard = view.as_standard_layout();
    let slice = standard.as_slice().expect("standard layout is contiguous");
    Ok(py.detach(|| f(slice)))
}

fn bad_value_error(arg: &str, bad: BadValue, cols: usize, rule: &str) -> PyErr {
    // A bad value implies at least one column.
    let (r, c) = (bad.index / cols.max(1), bad.index % cols.max(1));
    PyValueError::new_err(format!(
        "{arg} value {} at index ({r}, {c}) {rule}",
        bad.value
    ))
}

fn u32_view_mut(v: &mut [i32]) -> &mut [u32] {
    // SAFETY: i32 and u32 have identical size and alignment and every bit pattern is valid.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u32>(), v.len()) }
}

fn into_i32(v: Vec<u32>) -> Vec<i32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same size and alignment; the allocation moves over unchanged.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<i32>(), v.len(), v.capacity()) }
}

fn words_of<'py>(
    py: Python<'py>,
    rows: usize,
    cols: usize,
    data: Vec<i32>,
) -> Bound<'py, PyArray2<i32>> {
    Array2::from_shape_vec((rows, cols), data)
        .expect("shape matches length")
        .into_pyarray(py)
}

fn pack_qweight_typed<'py, T: Element + Code>(
    py: Python<'py>,
    arr: &Bound<'py, PyUntypedArray>,
    bits: u32,
    (rows, cols): (usize, usize),
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    let out_rows = rows * bits as usize / 32;
    let mut out = vec![0i32; out_rows * cols];
    let result = with_c_slice::<T, _>(py, arr, |input| {
        bitpack::pack_columns(input, cols, bits, u32_view_mut(&mut out))
    })?;
    let max = (1u32 << bits) - 1;
    result.map_err(|bad| {
        bad_value_error(
            "intweight",
            bad,
            cols,
            &format!("is out of range for {bits}-bit codes (0..={max})"),
        )
    })?;
    Ok(words_of(py, out_rows, cols, out))
}

/// `pack_qweight(intweight, bits) -> int32 [in*bits/32, out]`: AutoGPTQ's qweight.
#[pyfunction]
pub fn pack_qweight<'py>(
    py: Python<'py>,
    intweight: &Bound<'py, PyAny>,
    bits: u32,
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    check_bits(bits)?;
    let arr = numpy_array(intweight, "intweight")?;
    let kind = int_kind(
        &arr,
        "intweight",
        "an unsigned integer array (uint8, or int32/int64 holding small values)",
    )?;
    let (rows, cols) = check_2d(&arr, "intweight", "[in_features, out_features]")?;
    if !(rows * bits as usize).is_multiple_of(32) {
        return Err(PyValueError::new_err(format!(
            "intweight has in_features={rows}; in_features * bits ({}) must be a multiple of 32",
            rows * bits as usize
        )));
    }
    let shape = (rows, cols);
    match kind {
        IntKind::U8 => pack_qweight_typed::<u8>(py, &arr, bits, shape),
        IntKind::U16 => pack_qweight_typed::<u16>(py, &arr, bits, shape),
        IntKind::U32 => pack_qweight_typed::<u32>(py, &arr, bits, shape),
        IntKind::U64 => pack_qweight_typed::<u64>(py, &arr, bits, shape),
        IntKind::I8 => pack_qweight_typed::<i8>(py, &arr, bits, shape),
        IntKind::I16 => pack_qweight_typed::<i16>(py, &arr, bits, shape),
        IntKind::I32 => pack_qweight_typed::<i32>(py, &arr, bits, shape),
        IntKind::I64 => pack_qweight_typed::<i64>(py, &arr, bits, shape),
    }
}

/// Packed words as u32 (int32 and uint32 both accepted: the bits are what matter).
fn packed_words(
    py: Python<'_>,
    arr: &Bound<'_, PyUntypedArray>,
    arg: &str,
) -> PyResult<(usize, usize, Vec<u32>)> {
    let kind = int_kind(arr, arg, "int32 (packed words)")?;
    let (rows, cols) = check_2d(arr, arg, "[rows, columns] of packed words")?;
    let words = match kind {
        IntKind::I32 => with_c_slice::<i32, _>(py, arr, |s| s.iter().map(|&w| w as u32).collect())?,
        IntKind::U32 => with_c_slice::<u32, _>(py, arr, |s| s.to_vec())?,
        _ => {
            return Err(PyValueError::new_err(format!(
                "{arg} must be int32 (packed words), got dtype {}",
                dtype_name(arr)
            )))
        }
    };
    Ok((rows, cols, words))
}

/// `unpack_qweight(qweight, bits) -> uint8 [rows*32/bits, out]`, the inverse of pack_qweight.
#[pyfunction]
pub fn unpack_qweight<'py>(
    py: Python<'py>,
    qweight: &Bound<'py, PyAny>,
    bits: u32,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    check_bits(bits)?;
    let arr = numpy_array(qweight, "qweight")?;
    let kind = int_kind(&arr, "qweight", "int32 (packed words)")?;
    let (rows, cols) = check_2d(&arr, "qweight", "[in_features*bits/32, out_features]")?;
    let u = bitpack::unit(bits);
    if rows % u.words != 0 {
        return Err(PyValueError::new_err(format!(
            "qweight has {rows} rows; for {bits} bits it must be a multiple of {}",
            u.words
        )));
    }
    let out_rows = rows / u.words * u.codes;
    let mut out = vec![0u8; out_rows * cols];
    match kind {
        IntKind::I32 => with_c_slice::<i32, _>(py, &arr, |s| {
            // SAFETY: same size and alignment, every bit pattern valid.
            let words = unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u32>(), s.len()) };
            bitpack::unpack_columns(words, cols, bits, &mut out)
        })?,
        IntKind::U32 => with_c_slice::<u32, _>(py, &arr, |s| {
            bitpack::unpack_columns(s, cols, bits, &mut out)
        })?,
        _ => {
            return Err(PyValueError::new_err(format!(
                "qweight must be int32 (packed words), got dtype {}",
                dtype_name(&arr)
            )))
        }
    }
    Ok(Array2::from_shape_vec((out_rows, cols), out)
        .expect("shape matches length")
        .into_pyarray(py))
}

fn pack_qzeros_typed<'py, T: Element + Code>(
    py: Python<'py>,
    arr: &Bound<'py, PyUntypedArray>,
    bits: u32,
    (rows, cols): (usize, usize),
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    let words_per_row = cols * bits as usize / 32;
    let mut out = vec![0i32; rows * words_per_row];
    let top = 1u32 << bits;
    // Stored value is zero - 1 (AutoGPTQ v1), so true zero points run 1..=2**bits.
    let to_code = move |v: T| match v.code() {
        z if (1..=top).contains(&z) => Some(z - 1),
        _ => None,
    };
    let result = with_c_slice::<T, _>(py, arr, |input| {
        bitpack::pack_rows(input, cols, bits, to_code, u32_view_mut(&mut out))
    })?;
    result.map_err(|bad| {
        if bad.value == 0 {
            bad_value_error(
                "zeros",
                bad,
                cols,
                "is 0: the AutoGPTQ v1 format stores zero - 1 and cannot store a zero point of 0",
            )
        } else {
            bad_value_error(
                "zeros",
                bad,
                cols,
                &format!("is out of range for {bits} bits (1..={top})"),
            )
        }
    })?;
    Ok(words_of(py, rows, words_per_row, out))
}

/// `pack_qzeros(zeros, bits) -> int32 [groups, out*bits/32]`; stores zero - 1 (AutoGPTQ v1).
#[pyfunction]
pub fn pack_qzeros<'py>(
    py: Python<'py>,
    zeros: &Bound<'py, PyAny>,
    bits: u32,
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    check_bits(bits)?;
    let arr = numpy_array(zeros, "zeros")?;
    let kind = int_kind(&arr, "zeros", "an integer array of true zero points")?;
    let (rows, cols) = check_2d(&arr, "zeros", "[groups, out_features]")?;
    if !(cols * bits as usize).is_multiple_of(32) {
        return Err(PyValueError::new_err(format!(
            "zeros has out_features={cols}; out_features * bits ({}) must be a multiple of 32",
            cols * bits as usize
        )));
    }
    let shape = (rows, cols);
    match kind {
        IntKind::U8 => pack_qzeros_typed::<u8>(py, &arr, bits, shape),
        IntKind::U16 => pack_qzeros_typed::<u16>(py, &arr, bits, shape),
        IntKind::U32 => pack_qzeros_typed::<u32>(py, &arr, bits, shape),
        IntKind::U64 => pack_qzeros_typed::<u64>(py, &arr, bits, shape),
        IntKind::I8 => pack_qzeros_typed::<i8>(py, &arr, bits, shape),
        IntKind::I16 => pack_qzeros_typed::<i16>(py, &arr, bits, shape),
        IntKind::I32 => pack_qzeros_typed::<i32>(py, &arr, bits, shape),
        IntKind::I64 => pack_qzeros_typed::<i64>(py, &arr, bits, shape),
    }
}

/// `unpack_qzeros(qzeros, bits, out_features) -> int32 [groups, out]`: stored + 1.
#[pyfunction]
pub fn unpack_qzeros<'py>(
    py: Python<'py>,
    qzeros: &Bound<'py, PyAny>,
    bits: u32,
    out_features: usize,
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    check_bits(bits)?;
    let arr = numpy_array(qzeros, "qzeros")?;
    let (rows, cols, words) = packed_words(py, &arr, "qzeros")?;
    if !(out_features * bits as usize).is_multiple_of(32)
        || cols != out_features * bits as usize / 32
    {
        return Err(PyValueError::new_err(format!(
            "qzeros has {cols} columns; out_features={out_features} at {bits} bits needs \
             out_features * bits / 32 columns (and out_features * bits a multiple of 32)"
        )));
    }
    let mut out = vec![0i32; rows * out_features];
    let codes = u32_view_mut(&mut out);
    bitpack::unpack_rows(&words, out_features, bits, codes);
    for v in out.iter_mut() {
        *v += 1;
    }
    Ok(words_of(py, rows, out_features, out))
}

/// `repack(qweight, bits, layout)`: the hook where GPU kernels get their layout at load time.
#[pyfunction]
pub fn repack<'py>(
    py: Python<'py>,
    qweight: &Bound<'py, PyAny>,
    bits: u32,
    layout: &str,
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    check_bits(bits)?;
    if !KNOWN_LAYOUTS.contains(&layout) {
        return Err(PyValueError::new_err(format!(
            "unknown layout '{layout}'; known layouts: {}",
            KNOWN_LAYOUTS.join(", ")
        )));
    }
    let arr = numpy_array(qweight, "qweight")?;
    let (rows, cols, words) = packed_words(py, &arr, "qweight")?;
    let u = bitpack::unit(bits);
    if rows % u.words != 0 {
        return Err(PyValueError::new_err(format!(
            "qweight has {rows} rows; for {bits} bits it must be a multiple of {}",
            u.words
        )));
    }
    match layout {
        // AutoGPTQ's own layout: a C-ordered copy.
        "gptq" => Ok(words_of(py, rows, cols, into_i32(words))),
        // [out, in*bits/32]: each output channel's packed input words contiguous.
        _ => {
            let mut out = vec![0u32; rows * cols];
            py.detach(|| bitpack::transpose(&words, rows, cols, &mut out));
            Ok(words_of(py, cols, rows, into_i32(out)))
        }
    }
}
