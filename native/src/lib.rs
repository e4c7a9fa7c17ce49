//! gptq-gateway's native extension: AutoGPTQ bit packing and streaming safetensors I/O.
//!
//! Python-free cores (`bitpack`, `checksum`, `st_format`, `st_writer`, `st_reader`) carry the
//! logic and their unit tests; `pack_py` and `st_py` are the Python faces.

mod bitpack;
mod checksum;
mod pack_py;
mod st_format;
mod st_py;
mod st_reader;
mod st_writer;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(pack_py::pack_qweight, m)?)?;
    m.add_function(wrap_pyfunction!(pack_py::unpack_qweight, m)?)?;
    m.add_function(wrap_pyfunction!(pack_py::pack_qzeros, m)?)?;
    m.add_function(wrap_pyfunction!(pack_py::unpack_qzeros, m)?)?;
    m.add_function(wrap_pyfunction!(pack_py::repack, m)?)?;
    m.add_class::<st_py::PySafetensorsWriter>()?;
    m.add_class::<st_py::PySafetensorsReader>()?;
    m.add_class::<st_py::MappedFile>()?;
    Ok(())
}
