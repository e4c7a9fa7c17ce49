//! Python classes over the safetensors writer and reader: argument checks, numpy buffers in
//! and out, error mapping (format problems -> ValueError, file system -> OSError with errno).

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use numpy::npyffi::{self, npy_intp, NpyTypes, NPY_ARRAY_WRITEABLE, PY_ARRAY_API};
use numpy::{PyArrayDescr, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyKeyError, PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple, PyType};

use crate::checksum::{self, Job, Mismatch};
use crate::pack_py::{dtype_name, numpy_array};
use crate::st_format::{Dtype, TensorInfo};
use crate::st_reader::{self, Mapping, OpenError};
use crate::st_writer::{Phase, WriteError, WriterCore};

const DEFAULT_MAX_SHARD_BYTES: i64 = 4_000_000_000;

fn os_error(context: &str, path: &Path, source: &io::Error) -> PyErr {
    let message = format!("{context}: {source}");
    match source.raw_os_error() {
        // OSError(errno, strerror, filename) picks the matching subclass (FileNotFoundError...).
        Some(errno) => PyOSError::new_err((errno, message, path.display().to_string())),
        None => PyOSError::new_err(format!("{message}: {}", path.display())),
    }
}

impl From<WriteError> for PyErr {
    fn from(e: WriteError) -> PyErr {
        match e {
            WriteError::Invalid(message) => PyValueError::new_err(message),
            WriteError::Io {
                context,
                path,
                source,
            } => os_error(&context, &path, &source),
        }
    }
}

impl From<OpenError> for PyErr {
    fn from(e: OpenError) -> PyErr {
        match e {
            OpenError::Format(message) => PyValueError::new_err(message),
            OpenError::Io { path, source } => os_error("cannot read", &path, &source),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writer

/// Streaming, sharded, atomic safetensors writer. See native/__init__.py for the full contract.
#[pyclass(name = "SafetensorsWriter", module = "native")]
pub struct PySafetensorsWriter {
    // Locked only with the GIL released, so a thread waiting here never blocks the interpreter.
    core: Mutex<WriterCore>,
    out_dir: PathBuf,
}

impl PySafetensorsWriter {
    fn with_core<R: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut WriterCore) -> R + Send) -> R {
        py.detach(|| {
            let mut core = self
                .core
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut core)
        })
    }
}

fn natural_dtype(arr: &Bound<'_, PyUntypedArray>) -> Option<Dtype> {
    let dtype = arr.dtype();
    Some(match (dtype.kind(), dtype.itemsize()) {
        (b'f', 8) => Dtype::F64,
        (b'f', 4) => Dtype::F32,
        (b'f', 2) => Dtype::F16,
        (b'i', 8) => Dtype::I64,
        (b'i', 4) => Dtype::I32,
        (b'i', 2) => Dtype::I16,
        (b'i', 1) => Dtype::I8,
        (b'u', 8) => Dtype::U64,
        (b'u', 4) => Dtype::U32,
        (b'u', 2) => Dtype::U16,
        (b'u', 1) => Dtype::U8,
        (b'b', 1) => Dtype::Bool,
        _ => return None,
    })
}

/// The stored dtype: the array's own, or `requested` when the array holds that type's raw bits
/// in an integer of the same width (uint16 as BF16, uint8 as F8_E4M3...).
fn stored_dtype(
    arr: &Bound<'_, PyUntypedArray>,
    name: &str,
    requested: Option<&str>,
) -> PyResult<Dtype> {
    let natural = natural_dtype(arr);
    let Some(requested) = requested else {
        return natural.ok_or_else(|| {
            PyValueError::new_err(format!(
                "tensor '{name}': numpy dtype {} cannot be stored in safetensors (supported: \
                 float64/32/16, int64/32/16/8, uint64/32/16/8, bool; bf16 as uint16 with \
                 dtype=\"BF16\")",
                dtype_name(arr)
            ))
        });
    };
    let want = Dtype::from_name(requested).ok_or_else(|| {
        PyValueError::new_err(format!(
            "tensor '{name}': unknown dtype '{requested}' (known: {})",
            Dtype::known_names()
        ))
    })?;
    let raw_bits =
        matches!(arr.dtype().kind(), b'u' | b'i') && arr.dtype().itemsize() == want.size();
    if natural == Some(want) || raw_bits {
        Ok(want)
    } else {
        Err(PyValueError::new_err(format!(
            "tensor '{name}': dtype='{requested}' does not fit a numpy {} array (pass that \
             type's bits as an integer array of the same width, e.g. uint16 for BF16)",
            dtype_name(arr)
        )))
    }
}

#[pymethods]
impl PySafetensorsWriter {
    #[new]
    #[pyo3(signature = (out_dir, *, max_shard_bytes = DEFAULT_MAX_SHARD_BYTES, metadata = None,
                        filename_prefix = "model", fsync = true))]
    fn new(
        out_dir: PathBuf,
        max_shard_bytes: i64,
        metadata: Option<&Bound<'_, PyAny>>,
        filename_prefix: &str,
        fsync: bool,
    ) -> PyResult<Self> {
        if max_shard_bytes < 1 {
            return Err(PyValueError::new_err(format!(
                "max_shard_bytes must be positive, got {max_shard_bytes}"
            )));
        }
        let mut meta: Vec<(String, String)> = match metadata {
            None => Vec::new(),
            Some(m) => {
                let dict = m.cast::<PyDict>().map_err(|_| {
                    PyTypeError::new_err("metadata must be a dict[str, str] or None")
                })?;
                dict.iter()
                    .map(
                        |(k, v)| match (k.extract::<String>(), v.extract::<String>()) {
                            (Ok(k), Ok(v)) => Ok((k, v)),
                            _ => Err(PyTypeError::new_err(format!(
                                "metadata must map str to str; entry {} -> {} is not",
                                k.repr().map(|r| r.to_string()).unwrap_or_default(),
                                v.repr().map(|r| r.to_string()).unwrap_or_default()
                            ))),
                        },
                    )
                    .collect::<PyResult<_>>()?
            }
        };
        // transformers refuses safetensors metadata without a known "format".
        if !meta.iter().any(|(k, _)| k == "format") {
            meta.insert(0, ("format".into(), "pt".into()));
        }
        let core = WriterCore::create(
            &out_dir,
            filename_prefix,
            max_shard_bytes as u64,
            meta,
            fsync,
        )?;
        Ok(PySafetensorsWriter {
            core: Mutex::new(core),
            out_dir,
        })
    }

    /// Appends one tensor; its bytes are on their way to disk when this returns.
    #[pyo3(signature = (name, array, dtype = None))]
    fn add(
        &self,
        py: Python<'_>,
        name: &str,
        array: &Bound<'_, PyAny>,
        dtype: Option<&str>,
    ) -> PyResult<()> {
        let mut arr = numpy_array(array, "array")?;
        let stored = stored_dtype(&arr, name, dtype)?;
        let shape = arr.shape().to_vec();
        if !arr.is_c_contiguous() {
            // Transposes, Fortran order, strided slices: written in logical C order, via a copy.
            let kwargs = PyDict::new(py);
            kwargs.set_item("order", "C")?;
            arr = arr
                .call_method("copy", (), Some(&kwargs))?
                .cast_into::<PyUntypedArray>()?;
        }
        let nbytes = shape.iter().product::<usize>() * arr.dtype().itemsize();
        let data: &[u8] = if nbytes == 0 {
            &[]
        } else {
            // SAFETY: a C-contiguous array of `nbytes` bytes; `arr` keeps it alive until we
            // return (another thread mutating it meanwhile would only change the bytes written).
            unsafe {
                let fields = npyffi::_PyArray_GET_ITEM_DATA(arr.as_array_ptr());
                std::slice::from_raw_parts((*fields).data as *const u8, nbytes)
            }
        };
        self.with_core(py, |core| core.add(name, stored, &shape, data))?;
        Ok(())
    }

    /// Closes the last shard and renames every file into place. Returns the final file names
    /// (shards in order, then model.safetensors.index.json when there is more than one).
    fn finish(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        Ok(self.with_core(py, |core| core.finish())?)
    }

    /// Deletes every temporary file written so far; the writer cannot be used afterwards.
    fn abort(&self, py: Python<'_>) {
        self.with_core(py, |core| core.abort())
    }

    /// Tensor bytes added so far.
    #[getter]
    fn total_size(&self, py: Python<'_>) -> u64 {
        self.with_core(py, |core| core.total_size())
    }

    #[getter]
    fn out_dir(&self) -> String {
        self.out_dir.display().to_string()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// A clean exit finishes (unless already done); an exception aborts and propagates.
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<&Bound<'_, PyType>>,
        _exc_value: Option<&Bound<'_, PyAny>>,
        _traceback: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        if exc_type.is_some() {
            self.abort(py);
        } else if self.with_core(py, |core| core.phase()) == Phase::Open {
            self.finish(py)?;
        }
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "SafetensorsWriter({:?})",
            self.out_dir.display().to_string()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Reader

/// Owner of one file mapping: every array handed out has it as its numpy `base`, so the
/// mapping lives exactly as long as the reader or any view does.
#[pyclass(frozen, module = "native._native")]
pub struct MappedFile {
    mapping: Mapping,
    /// Start of the mapping, taken while it was exclusively ours (copy-on-write views write
    /// through it).
    base: usize,
}

impl MappedFile {
    fn open(path: &Path, copy_on_write: bool) -> Result<MappedFile, OpenError> {
        let mut mapping = st_reader::map_file(path, copy_on_write)?;
        let base = match &mut mapping {
            Mapping::ReadOnly(m) => m.as_ptr() as usize,
            Mapping::CopyOnWrite(m) => m.as_mut_ptr() as usize,
        };
        Ok(MappedFile { mapping, base })
    }
}

struct ReaderFile {
    path: PathBuf,
    data_start: u64,
    metadata: Vec<(String, String)>,
    read_only: Py<MappedFile>,
    copy_on_write: OnceLock<Py<MappedFile>>,
}

/// Memory-mapped reader of a .safetensors file or checkpoint directory.
#[pyclass(name = "SafetensorsReader", module = "native")]
pub struct PySafetensorsReader {
    path: PathBuf,
    files: Vec<ReaderFile>,
    tensors: BTreeMap<String, (usize, TensorInfo)>,
    closed: bool,
}

impl PySafetensorsReader {
    fn check_open(&self) -> PyResult<()> {
        if self.closed {
            Err(PyValueError::new_err(format!(
                "the reader for {} is closed",
                self.path.display()
            )))
        } else {
            Ok(())
        }
    }

    fn lookup(&self, name: &str) -> PyResult<&(usize, TensorInfo)> {
        self.check_open()?;
        self.tensors.get(name).ok_or_else(|| {
            PyKeyError::new_err(format!(
                "no tensor named '{name}' in {}",
                self.path.display()
            ))
        })
    }

    /// A numpy array over the tensor's bytes in the mapping; a copy only when the bytes are not
    /// aligned for the dtype (a file whose earlier tensors have odd byte counts).
    fn view<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        copy_on_write: bool,
        numpy_dtype: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (file_index, info) = self.lookup(name)?;
        let file = &self.files[*file_index];
        let owner = if copy_on_write {
            if file.copy_on_write.get().is_none() {
                let mapped = MappedFile::open(&file.path, true)?;
                let _ = file.copy_on_write.set(Py::new(py, mapped)?);
            }
            file.copy_on_write.get().expect("set above")
        } else {
            &file.read_only
        };
        let offset = file.data_start + info.start;
        let mapped = owner.get();
        if offset + (info.end - info.start) > mapped.mapping.bytes().len() as u64 {
            return Err(PyValueError::new_err(format!(
                "{}: tensor '{name}' lies beyond the mapped file (it changed on disk?)",
                file.path.display()
            )));
        }
        let data = (mapped.base + offset as usize) as *mut c_void;
        let descr = PyArrayDescr::new(py, numpy_dtype.unwrap_or(info.dtype.numpy_str()))?;
        let mut dims: Vec<npy_intp> = info.shape.iter().map(|&d| d as npy_intp).collect();
        let flags = if copy_on_write {
            NPY_ARRAY_WRITEABLE
        } else {
            0
        };
        // SAFETY: `data` points at `info.end - info.start` bytes inside the mapping (checked
        // above); the array takes `owner` as its base, which keeps the mapping alive.
        let array = unsafe {
            let raw = PY_ARRAY_API.PyArray_NewFromDescr(
                py,
                npyffi::get_type_object(py, NpyTypes::PyArray_Type),
                descr.into_dtype_ptr(),
                dims.len() as i32,
                dims.as_mut_ptr(),
                std::ptr::null_mut(),
                data,
                flags,
                std::ptr::null_mut(),
            );
            let array = Bound::from_owned_ptr_or_err(py, raw)?;
            let base = owner.clone_ref(py).into_ptr();
            if PY_ARRAY_API.PyArray_SetBaseObject(py, raw.cast(), base) < 0 {
                return Err(PyErr::fetch(py));
            }
            array
        };
        if !(data as usize).is_multiple_of(info.dtype.size()) {
            return array.call_method0("copy");
        }
        Ok(array)
    }
}

impl PySafetensorsReader {
    /// One job per tensor whose file records checksums; a file that records them must cover
    /// every one of its tensors.
    fn checksum_jobs(&self) -> PyResult<Vec<Job<'_>>> {
        let in_file = |file: &ReaderFile, message: String| {
            PyValueError::new_err(format!("{}: {message}", file.path.display()))
        };
        let mut recorded = Vec::with_capacity(self.files.len());
        for file in &self.files {
            recorded.push(checksum::parse(&file.metadata).map_err(|m| in_file(file, m))?);
        }
        let mut jobs = Vec::new();
        for (name, (index, info)) in &self.tensors {
            let Some(sums) = &recorded[*index] else {
                continue;
            };
            let file = &self.files[*index];
            let Some(&expected) = sums.get(name) else {
                return Err(in_file(
                    file,
                    format!(
                        "no checksum recorded for tensor '{name}' (its other tensors have one)"
                    ),
                ));
            };
            let bytes = file.read_only.get().mapping.bytes();
            let range =
                (file.data_start + info.start) as usize..(file.data_start + info.end) as usize;
            let data = bytes.get(range).ok_or_else(|| {
                in_file(file, format!("tensor '{name}' lies beyond the mapped file"))
            })?;
            jobs.push(Job {
                name,
                file: *index,
                data,
                expected,
            });
        }
        Ok(jobs)
    }

    fn mismatch_message(&self, bad: &[Mismatch]) -> String {
        let first = &bad[0];
        let mut message = format!(
            "{}: tensor '{}' is damaged: its bytes no longer match the checksum recorded when \
             it was written ({} {:016x}, now {:016x})",
            self.files[first.file].path.display(),
            first.name,
            checksum::ALGORITHM,
            first.expected,
            first.actual
        );
        if bad.len() > 1 {
            let more: Vec<&str> = bad[1..].iter().take(5).map(|m| m.name.as_str()).collect();
            let ellipsis = if bad.len() > 6 { ", ..." } else { "" };
            message.push_str(&format!(
                "; {} more damaged: {}{ellipsis}",
                bad.len() - 1,
                more.join(", ")
            ));
        }
        message
    }
}

#[pymethods]
impl PySafetensorsReader {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let opened = py.detach(|| -> Result<_, OpenError> {
            let layout = st_reader::resolve(&path)?;
            let mut mappings = Vec::new();
            let mut headers = Vec::new();
            for file in &layout.files {
                let mapped = MappedFile::open(file, false)?;
                headers.push(st_reader::read_header(file, &mapped.mapping)?);
                mappings.push(mapped);
            }
            let tensors =
                st_reader::tensor_table(&layout.files, &headers, layout.weight_map.as_ref())?;
            Ok((layout.files, mappings, headers, tensors))
        })?;
        let (paths, mappings, headers, tensors) = opened;
        let mut files = Vec::with_capacity(paths.len());
        for ((path, mapped), header) in paths.into_iter().zip(mappings).zip(headers) {
            files.push(ReaderFile {
                path,
                data_start: header.data_start,
                metadata: header.metadata,
                read_only: Py::new(py, mapped)?,
                copy_on_write: OnceLock::new(),
            });
        }
        Ok(PySafetensorsReader {
            path,
            files,
            tensors,
            closed: false,
        })
    }

    /// Tensor names, sorted.
    fn keys(&self) -> PyResult<Vec<String>> {
        self.check_open()?;
        Ok(self.tensors.keys().cloned().collect())
    }

    /// `(dtype, shape)`, dtype as safetensors names it ("F16", "BF16", "I32"...).
    fn info<'py>(&self, py: Python<'py>, name: &str) -> PyResult<(String, Bound<'py, PyTuple>)> {
        let (_, info) = self.lookup(name)?;
        Ok((
            info.dtype.name().to_string(),
            PyTuple::new(py, &info.shape)?,
        ))
    }

    /// A zero-copy numpy view over the file (read-only; bf16 as uint16, fp8 as uint8). With
    /// `copy_on_write=True` the view is writable and private: writes never reach the file.
    #[pyo3(signature = (name, *, copy_on_write = false))]
    fn get<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        copy_on_write: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.view(py, name, copy_on_write, None)
    }

    /// The tensor as a torch.Tensor sharing the (copy-on-write) mapping: writable without a
    /// warning, no copy; bf16 and fp8 come back as their torch dtypes.
    fn get_torch<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let (_, info) = self.lookup(name)?;
        let dtype = info.dtype;
        let torch = py.import("torch")?;
        // int16 rather than uint16 for bf16: every torch version can take it from numpy.
        let numpy_dtype = if dtype == Dtype::BF16 {
            Some("<i2")
        } else {
            None
        };
        let array = self.view(py, name, true, numpy_dtype)?;
        let tensor = torch.getattr("from_numpy")?.call1((array,))?;
        match dtype.torch_view() {
            Some(view) => tensor.call_method1("view", (torch.getattr(view)?,)),
            None => Ok(tensor),
        }
    }

    /// Checks every tensor against the checksum its file recorded when it was written, in
    /// parallel with the GIL released. Returns how many tensors were checked: 0 for a checkpoint
    /// from another tool, which records none. A damaged tensor -> ValueError naming it and its
    /// file.
    fn verify_checksums(&self, py: Python<'_>) -> PyResult<usize> {
        self.check_open()?;
        let jobs = self.checksum_jobs()?;
        let count = jobs.len();
        let bad = py.detach(|| checksum::verify(jobs));
        if bad.is_empty() {
            return Ok(count);
        }
        Err(PyValueError::new_err(self.mismatch_message(&bad)))
    }

    /// The `__metadata__` of the (first) file, as a dict of strings.
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.check_open()?;
        let dict = PyDict::new(py);
        if let Some(first) = self.files.first() {
            for (k, v) in &first.metadata {
                dict.set_item(k, v)?;
            }
        }
        Ok(dict)
    }

    /// The files this reader mapped.
    #[getter]
    fn files(&self) -> Vec<String> {
        self.files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect()
    }

    /// Drops the reader's mappings; arrays already handed out keep theirs alive.
    fn close(&mut self) {
        self.files.clear();
        self.tensors.clear();
        self.closed = true;
    }

    fn __contains__(&self, name: &str) -> PyResult<bool> {
        self.check_open()?;
        Ok(self.tensors.contains_key(name))
    }

    fn __len__(&self) -> PyResult<usize> {
        self.check_open()?;
        Ok(self.tensors.len())
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        PyList::new(py, self.keys()?)?
            .try_iter()
            .map(Bound::into_any)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &mut self,
        _exc_type: Option<&Bound<'_, PyAny>>,
        _exc_value: Option<&Bound<'_, PyAny>>,
        _traceback: Option<&Bound<'_, PyAny>>,
    ) -> bool {
        self.close();
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "SafetensorsReader({:?}, {} tensors{})",
            self.path.display().to_string(),
            self.tensors.len(),
            if self.closed { ", closed" } else { "" }
        )
    }
}
