//! Core errors as Python exceptions: one exhaustive mapping, classes that also subclass the
//! builtins callers already catch.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use super::KvIndexError;
use crate::error::{Error, SnapshotKind};

static INVALID: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static CLOSED: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static THREAD_START: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static SNAPSHOT: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static SNAPSHOT_MISMATCH: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// A subclass of both `KvIndexError` and a builtin, so callers catching the builtin work.
pub(super) fn subclass(py: Python<'_>, name: &str, builtin: &Bound<'_, PyType>, doc: &str) -> PyResult<Py<PyType>> {
    derive(py, name, &[py.get_type::<KvIndexError>(), builtin.clone()], doc)
}

pub(super) fn derive(py: Python<'_>, name: &str, bases: &[Bound<'_, PyType>], doc: &str) -> PyResult<Py<PyType>> {
    let bases = PyTuple::new(py, bases)?;
    let ns = PyDict::new(py);
    ns.set_item("__doc__", doc)?;
    ns.set_item("__module__", "kvindex_service._native")?;
    let t = py.import("builtins")?.getattr("type")?.call1((name, bases, ns))?;
    Ok(t.cast_into::<PyType>()?.unbind())
}

pub(super) fn invalid_type(py: Python<'_>) -> &Bound<'_, PyType> {
    INVALID
        .get_or_init(py, || {
            subclass(py, "InvalidInputError", &py.get_type::<pyo3::exceptions::PyValueError>(), "Bad argument.")
                .expect("create InvalidInputError")
        })
        .bind(py)
}

pub(super) fn closed_type(py: Python<'_>) -> &Bound<'_, PyType> {
    CLOSED
        .get_or_init(py, || {
            subclass(py, "ClosedError", &py.get_type::<pyo3::exceptions::PyRuntimeError>(), "The indexer is closed.")
                .expect("create ClosedError")
        })
        .bind(py)
}

pub(super) fn thread_start_type(py: Python<'_>) -> &Bound<'_, PyType> {
    THREAD_START
        .get_or_init(py, || {
            let doc = "The OS refused a worker thread.";
            subclass(py, "ThreadStartError", &py.get_type::<pyo3::exceptions::PyRuntimeError>(), doc)
                .expect("create ThreadStartError")
        })
        .bind(py)
}

pub(super) fn snapshot_type(py: Python<'_>) -> &Bound<'_, PyType> {
    SNAPSHOT
        .get_or_init(py, || {
            let doc = "A snapshot that cannot be loaded (corrupt, truncated, not a snapshot, or a used index).";
            subclass(py, "SnapshotError", &py.get_type::<pyo3::exceptions::PyValueError>(), doc)
                .expect("create SnapshotError")
        })
        .bind(py)
}

pub(super) fn snapshot_mismatch_type(py: Python<'_>) -> &Bound<'_, PyType> {
    SNAPSHOT_MISMATCH
        .get_or_init(py, || {
            let doc = "A snapshot written with another block size, hash algorithm or seed.";
            derive(py, "SnapshotMismatchError", &[snapshot_type(py).clone()], doc)
                .expect("create SnapshotMismatchError")
        })
        .bind(py)
}

/// The one mapping from core errors to Python exceptions.
impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        Python::attach(|py| {
            let class = match &e {
                Error::InvalidInput { .. } | Error::TooManyPods { .. } | Error::TooManyTiers { .. } => invalid_type(py),
                Error::Decode(_) => invalid_type(py),
                Error::Spawn { .. } => thread_start_type(py),
                Error::Closed => closed_type(py),
                Error::Snapshot { kind: SnapshotKind::Mismatch, .. } => snapshot_mismatch_type(py),
                Error::Snapshot { .. } => snapshot_type(py),
            };
            PyErr::from_type(class.clone(), e.to_string())
        })
    }
}

pub(super) fn invalid(msg: String) -> PyErr {
    Error::invalid(msg).into()
}
