//! Python arguments to plain data: token ids, keys, sizes.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use super::errors::invalid;
use crate::config::defaults;
use crate::hashing::{Algorithm, Extras, TokenProcessor};

/// The common case, a list of exact ints, read straight from the list's item array
/// (~10x faster than the generic sequence protocol). `None` sends the caller to the generic
/// path, which also produces the precise error.
pub(super) fn list_fast_path<T>(obj: &Bound<'_, PyAny>, conv: impl Fn(i128) -> Option<T>) -> Option<Vec<T>> {
    let list = obj.cast::<PyList>().ok()?;
    // On free-threaded builds the list's critical section keeps other threads from mutating
    // it (every list mutator takes it) while we read its item array; on GIL builds it is a
    // no-op and the GIL, held throughout, does the same.
    pyo3::sync::with_critical_section(list.as_any(), || {
        let ptr = list.as_ptr();
        // SAFETY: `ptr` is a live list (we hold a reference). No other thread can resize it or
        // replace an item while we hold the GIL (GIL builds) or its critical section
        // (free-threaded builds), and nothing below can release either: no Python code runs
        // (only exact ints are read, so no `__index__`), and we never block or detach.
        // So `n` stays the length and every item stays alive for the whole loop.
        let n = unsafe { pyo3::ffi::PyList_GET_SIZE(ptr) };
        let mut out = Vec::with_capacity(n.max(0) as usize);
        for i in 0..n {
            // SAFETY: `0 <= i < n` (see above); the item is borrowed from the list.
            let item = unsafe { pyo3::ffi::PyList_GET_ITEM(ptr, i) };
            if unsafe { pyo3::ffi::PyLong_CheckExact(item) } == 0 {
                return None;
            }
            let mut overflow: std::os::raw::c_int = 0;
            // SAFETY: `item` is an exact int; this reads its value and cannot fail otherwise.
            let v = unsafe { pyo3::ffi::PyLong_AsLongLongAndOverflow(item, &mut overflow) };
            if overflow != 0 {
                return None;
            }
            out.push(conv(v as i128)?);
        }
        Some(out)
    })
}

/// Ints from any Python sequence, each converted by `conv` (`range` names its bounds).
/// The list fast path does the common case; the generic path names the offending element.
pub(super) fn extract_ints<T>(
    obj: &Bound<'_, PyAny>,
    what: &str,
    range: &str,
    reject_bools: bool,
    conv: impl Fn(i128) -> Option<T> + Copy,
) -> PyResult<Vec<T>> {
    if let Some(v) = list_fast_path(obj, conv) {
        return Ok(v);
    }
    let it = obj.try_iter().map_err(|_| invalid(format!("{what} must be a sequence of ints")))?;
    let mut out = Vec::new();
    for (i, item) in it.enumerate() {
        let item = item?;
        if reject_bools && item.is_instance_of::<pyo3::types::PyBool>() {
            return Err(invalid(format!("{what}[{i}] is a bool, not an int")));
        }
        let v: i128 = item.extract().map_err(|_| invalid(format!("{what}[{i}] is not an int")))?;
        out.push(conv(v).ok_or_else(|| invalid(format!("{what}[{i}] = {v} is outside {range}")))?);
    }
    Ok(out)
}

/// Token ids, each in 0..2^32-1 (a bool is a caller bug, not token 1).
pub(super) fn extract_tokens(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    if obj.is_instance_of::<pyo3::types::PyString>() || obj.is_instance_of::<PyBytes>() {
        return Err(invalid("token_ids must be a sequence of ints, not a string".into()));
    }
    extract_ints(obj, "token_ids", "0..4294967295", true, |x| u32::try_from(x).ok())
}

pub(super) fn extract_keys(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    extract_ints(obj, "keys", "0..2^64-1", false, |x| u64::try_from(x).ok())
}

pub(super) fn non_negative(name: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| invalid(format!("{name} must be >= 0")))
}

// The literal defaults in the `TokenProcessor` and `Indexer` signatures below (literals, so
// Python's `inspect.signature` shows them) must be the core's: checked at compile time.
const _: () = assert!(
    defaults::BLOCK_SIZE == 16
        && matches!(defaults::ALGORITHM, Algorithm::Sha256Cbor)
        && defaults::MAX_KEYS == 10_000_000
        && defaults::MAX_PODS_PER_KEY == 64
        && defaults::SHARDS == 0
        && defaults::QUEUE_CAPACITY == 1024
        && defaults::KEY_MEMO_BLOCKS == 262_144
        && defaults::MAX_TIERS_PER_POD == 4,
    "a signature default in the binding differs from config::defaults"
);

/// One request's block keys: extract, detach, hash.
pub(super) fn block_keys_of(
    py: Python<'_>,
    tp: &TokenProcessor,
    token_ids: &Bound<'_, PyAny>,
    lora_name: Option<&str>,
    cache_salt: Option<&str>,
) -> PyResult<Vec<u64>> {
    let toks = extract_tokens(token_ids)?;
    let extras = Extras::for_request(lora_name, cache_salt);
    Ok(py.detach(|| tp.block_keys(&toks, &extras)))
}
