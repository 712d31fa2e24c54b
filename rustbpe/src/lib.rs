use pyo3::prelude::*;

#[pyfunction]
fn _version() -> &'static str { "0.1.0" }

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_version, m)?)?;
    Ok(())
}
