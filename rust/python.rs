//! The Python face of the core (`kvindex_service._native`), the only file that knows pyo3.
//! Each method extracts plain data, detaches from the interpreter for the O(n) work, and
//! converts the result back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple, PyType};

use crate::config::{self, defaults, IndexerConfig};
use crate::error::{Error, SnapshotKind};
use crate::hashing::{Algorithm, Extras, TokenProcessor};
use crate::indexer::Indexer;
use crate::pods::PodState;
use crate::scoring::{PodScore, ScoreResult};
use crate::snapshot::SnapshotWriter;

pyo3::create_exception!(
    kvindex_service._native,
    KvIndexError,
    PyException,
    "Base class of every error raised by the core."
);

static INVALID: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static CLOSED: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static THREAD_START: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static SNAPSHOT: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static SNAPSHOT_MISMATCH: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// A subclass of both `KvIndexError` and a builtin, so callers catching the builtin work.
fn subclass(py: Python<'_>, name: &str, builtin: &Bound<'_, PyType>, doc: &str) -> PyResult<Py<PyType>> {
    derive(py, name, &[py.get_type::<KvIndexError>(), builtin.clone()], doc)
}

fn derive(py: Python<'_>, name: &str, bases: &[Bound<'_, PyType>], doc: &str) -> PyResult<Py<PyType>> {
    let bases = PyTuple::new(py, bases)?;
    let ns = PyDict::new(py);
    ns.set_item("__doc__", doc)?;
    ns.set_item("__module__", "kvindex_service._native")?;
    let t = py.import("builtins")?.getattr("type")?.call1((name, bases, ns))?;
    Ok(t.cast_into::<PyType>()?.unbind())
}

fn invalid_type(py: Python<'_>) -> &Bound<'_, PyType> {
    INVALID
        .get_or_init(py, || {
            subclass(py, "InvalidInputError", &py.get_type::<pyo3::exceptions::PyValueError>(), "Bad argument.")
                .expect("create InvalidInputError")
        })
        .bind(py)
}

fn closed_type(py: Python<'_>) -> &Bound<'_, PyType> {
    CLOSED
        .get_or_init(py, || {
            subclass(py, "ClosedError", &py.get_type::<pyo3::exceptions::PyRuntimeError>(), "The indexer is closed.")
                .expect("create ClosedError")
        })
        .bind(py)
}

fn thread_start_type(py: Python<'_>) -> &Bound<'_, PyType> {
    THREAD_START
        .get_or_init(py, || {
            let doc = "The OS refused a worker thread.";
            subclass(py, "ThreadStartError", &py.get_type::<pyo3::exceptions::PyRuntimeError>(), doc)
                .expect("create ThreadStartError")
        })
        .bind(py)
}

fn snapshot_type(py: Python<'_>) -> &Bound<'_, PyType> {
    SNAPSHOT
        .get_or_init(py, || {
            let doc = "A snapshot that cannot be loaded (corrupt, truncated, not a snapshot, or a used index).";
            subclass(py, "SnapshotError", &py.get_type::<pyo3::exceptions::PyValueError>(), doc)
                .expect("create SnapshotError")
        })
        .bind(py)
}

fn snapshot_mismatch_type(py: Python<'_>) -> &Bound<'_, PyType> {
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

fn invalid(msg: String) -> PyErr {
    Error::invalid(msg).into()
}

/// The common case, a list of exact ints, read straight from the list's item array
/// (~10x faster than the generic sequence protocol). `None` sends the caller to the generic
/// path, which also produces the precise error.
fn list_fast_path<T>(obj: &Bound<'_, PyAny>, conv: impl Fn(i128) -> Option<T>) -> Option<Vec<T>> {
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
fn extract_ints<T>(
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
fn extract_tokens(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    if obj.is_instance_of::<pyo3::types::PyString>() || obj.is_instance_of::<PyBytes>() {
        return Err(invalid("token_ids must be a sequence of ints, not a string".into()));
    }
    extract_ints(obj, "token_ids", "0..4294967295", true, |x| u32::try_from(x).ok())
}

fn extract_keys(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    extract_ints(obj, "keys", "0..2^64-1", false, |x| u64::try_from(x).ok())
}

fn non_negative(name: &str, v: i64) -> PyResult<usize> {
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
    "a signature default in python.rs differs from config::defaults"
);

/// One request's block keys: extract, detach, hash.
fn block_keys_of(
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

#[pyclass(name = "TokenProcessor", module = "kvindex_service._native", frozen)]
struct PyTokenProcessor {
    tp: TokenProcessor,
}

#[pymethods]
impl PyTokenProcessor {
    #[new]
    #[pyo3(signature = (block_size = 16, hash_seed = None, algorithm = "sha256_cbor"))]
    fn new(block_size: i64, hash_seed: Option<&str>, algorithm: &str) -> PyResult<Self> {
        let tp = TokenProcessor::new(positive("block_size", block_size)?, hash_seed, Algorithm::parse(algorithm)?)?;
        Ok(PyTokenProcessor { tp })
    }
    #[getter]
    fn block_size(&self) -> usize {
        self.tp.block_size()
    }
    #[getter]
    fn algorithm(&self) -> &'static str {
        self.tp.algorithm().name()
    }
    #[getter]
    fn hash_seed(&self) -> Option<String> {
        self.tp.seed().map(str::to_owned)
    }
    fn none_hash<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.tp.none_hash_bytes())
    }
    #[pyo3(signature = (token_ids, *, lora_name = None, cache_salt = None))]
    fn block_keys(
        &self,
        py: Python<'_>,
        token_ids: &Bound<'_, PyAny>,
        lora_name: Option<&str>,
        cache_salt: Option<&str>,
    ) -> PyResult<Vec<u64>> {
        block_keys_of(py, &self.tp, token_ids, lora_name, cache_salt)
    }
    fn __repr__(&self) -> String {
        format!(
            "TokenProcessor(block_size={}, hash_seed={:?}, algorithm={:?})",
            self.tp.block_size(),
            self.tp.seed(),
            self.tp.algorithm().name()
        )
    }
}

#[pyclass(name = "PodScore", module = "kvindex_service._native", frozen, get_all)]
struct PyPodScore {
    pod: String,
    matched_blocks: u32,
    matched_tokens: u64,
    score: f64,
    tier_blocks: HashMap<String, u32>,
}

#[pymethods]
impl PyPodScore {
    fn __repr__(&self) -> String {
        format!(
            "PodScore(pod={:?}, matched_blocks={}, matched_tokens={}, score={})",
            self.pod, self.matched_blocks, self.matched_tokens, self.score
        )
    }
}

#[pyclass(name = "ScoreResult", module = "kvindex_service._native", frozen, get_all)]
struct PyScoreResult {
    scores: Vec<Py<PyPodScore>>,
    total_blocks: usize,
    total_tokens: usize,
    keys_computed: usize,
}

#[pymethods]
impl PyScoreResult {
    fn best(&self, py: Python<'_>) -> Option<Py<PyPodScore>> {
        self.scores.first().map(|s| s.clone_ref(py))
    }
    fn __repr__(&self) -> String {
        format!(
            "ScoreResult(pods={}, total_blocks={}, total_tokens={})",
            self.scores.len(),
            self.total_blocks,
            self.total_tokens
        )
    }
}

#[pyclass(name = "ApplyResult", module = "kvindex_service._native", frozen, get_all)]
struct PyApplyResult {
    events: u64,
    stored_blocks: u64,
    removed_blocks: u64,
    cleared: u64,
    decode_errors: u64,
    unknown_event_types: u64,
    unknown_parents: u64,
    dp_rank: Option<i64>,
}

#[pymethods]
impl PyApplyResult {
    fn __repr__(&self) -> String {
        format!(
            "ApplyResult(events={}, stored_blocks={}, removed_blocks={}, decode_errors={}, unknown_parents={})",
            self.events, self.stored_blocks, self.removed_blocks, self.decode_errors, self.unknown_parents
        )
    }
}

#[pyclass(name = "PodState", module = "kvindex_service._native", frozen, get_all)]
struct PyPodState {
    pod: String,
    models: Vec<String>,
    blocks_by_tier: HashMap<String, i64>,
    last_seq: Option<u64>,
    last_event_ts: Option<f64>,
    dp_rank: Option<i64>,
    batches_applied: u64,
    events_applied: u64,
    decode_errors: u64,
    unknown_event_types: u64,
    unknown_parents: u64,
    hash_matches: u64,
    hash_mismatches: u64,
    hashes_match: Option<bool>,
    tiers_refused: u64,
    bridge_entries: u64,
}

#[pymethods]
impl PyPodState {
    fn __repr__(&self) -> String {
        format!("PodState(pod={:?}, blocks_by_tier={:?}, last_seq={:?})", self.pod, self.blocks_by_tier, self.last_seq)
    }
}

impl From<PodState> for PyPodState {
    fn from(s: PodState) -> Self {
        PyPodState {
            hashes_match: s.hashes_match(),
            pod: s.pod.to_string(),
            models: s.models.iter().map(|m| m.to_string()).collect(),
            blocks_by_tier: s.blocks_by_tier.into_iter().collect(),
            last_seq: s.last_seq,
            last_event_ts: s.last_event_ts,
            dp_rank: s.dp_rank,
            batches_applied: s.batches_applied,
            events_applied: s.events_applied,
            decode_errors: s.decode_errors,
            unknown_event_types: s.unknown_event_types,
            unknown_parents: s.unknown_parents,
            hash_matches: s.hash_matches,
            hash_mismatches: s.hash_mismatches,
            tiers_refused: s.tiers_refused,
            bridge_entries: s.bridge_entries,
        }
    }
}

#[pyclass(name = "IndexStats", module = "kvindex_service._native", frozen, get_all)]
struct PyIndexStats {
    keys: u64,
    entries: u64,
    key_evictions: u64,
    entry_evictions: u64,
    bytes_used: u64,
    pods: u64,
    models: u64,
    max_keys: u64,
    max_pods_per_key: u64,
}

#[pymethods]
impl PyIndexStats {
    fn __repr__(&self) -> String {
        format!(
            "IndexStats(keys={}, entries={}, bytes_used={}, pods={})",
            self.keys, self.entries, self.bytes_used, self.pods
        )
    }
}

#[pyclass(name = "Indexer", module = "kvindex_service._native", frozen)]
struct PyIndexer {
    ix: Arc<Indexer>,
}

/// A core result as Python objects: conversion only (naming, zeros and order are the core's).
fn score_result(py: Python<'_>, r: ScoreResult) -> PyResult<PyScoreResult> {
    let scores = r.scores.into_iter().map(|s| Py::new(py, PyPodScore::from(s))).collect::<PyResult<Vec<_>>>()?;
    Ok(PyScoreResult {
        scores,
        total_blocks: r.total_blocks,
        total_tokens: r.total_tokens,
        keys_computed: r.keys_computed,
    })
}

impl From<PodScore> for PyPodScore {
    fn from(s: PodScore) -> Self {
        PyPodScore {
            pod: s.pod.to_string(),
            matched_blocks: s.matched_blocks,
            matched_tokens: s.matched_tokens,
            score: s.score,
            tier_blocks: s.tier_blocks.into_iter().collect(),
        }
    }
}

fn weights_from(obj: Option<&Bound<'_, PyAny>>) -> PyResult<(Vec<(String, f64)>, f64)> {
    let overrides: Vec<(String, f64)> = match obj {
        None => Vec::new(),
        Some(o) => o
            .extract::<HashMap<String, f64>>()
            .map_err(|_| invalid("tier_weights must map tier names to numbers".into()))?
            .into_iter()
            .collect(),
    };
    Ok(config::tier_weights(overrides)?)
}

fn positive(name: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v).ok().filter(|x| *x > 0).ok_or_else(|| invalid(format!("{name} must be a positive int, got {v}")))
}

#[pymethods]
impl PyIndexer {
    #[new]
    #[pyo3(signature = (*, block_size = 16, hash_seed = None, algorithm = "sha256_cbor", max_keys = 10_000_000,
                        max_pods_per_key = 64, shards = 0, queue_capacity = 1024, tier_weights = None,
                        key_memo = 262_144, max_tiers_per_pod = 4))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        block_size: i64,
        hash_seed: Option<String>,
        algorithm: &str,
        max_keys: i64,
        max_pods_per_key: i64,
        shards: i64,
        queue_capacity: i64,
        tier_weights: Option<&Bound<'_, PyAny>>,
        key_memo: i64,
        max_tiers_per_pod: i64,
    ) -> PyResult<Self> {
        let (tier_weights, default_weight) = weights_from(tier_weights)?;
        let cfg = IndexerConfig {
            block_size: positive("block_size", block_size)?,
            hash_seed,
            algorithm: Algorithm::parse(algorithm)?,
            max_keys: positive("max_keys", max_keys)?,
            max_pods_per_key: positive("max_pods_per_key", max_pods_per_key)?,
            shards: non_negative("shards", shards)?,
            queue_capacity: positive("queue_capacity", queue_capacity)?,
            tier_weights,
            default_weight,
            key_memo_blocks: non_negative("key_memo", key_memo)?,
            max_tiers_per_pod: positive("max_tiers_per_pod", max_tiers_per_pod)?,
            ..Default::default()
        };
        Ok(PyIndexer { ix: Arc::new(Indexer::new(cfg)?) })
    }

    #[getter]
    fn block_size(&self) -> usize {
        self.ix.token_processor().block_size()
    }
    #[getter]
    fn algorithm(&self) -> &'static str {
        self.ix.token_processor().algorithm().name()
    }
    #[getter]
    fn hash_seed(&self) -> Option<String> {
        self.ix.token_processor().seed().map(str::to_owned)
    }
    #[getter]
    fn shards(&self) -> usize {
        self.ix.num_shards()
    }

    fn token_processor(&self) -> PyTokenProcessor {
        PyTokenProcessor { tp: self.ix.token_processor().clone() }
    }

    #[pyo3(signature = (token_ids, *, lora_name = None, cache_salt = None))]
    fn block_keys(
        &self,
        py: Python<'_>,
        token_ids: &Bound<'_, PyAny>,
        lora_name: Option<&str>,
        cache_salt: Option<&str>,
    ) -> PyResult<Vec<u64>> {
        block_keys_of(py, self.ix.token_processor(), token_ids, lora_name, cache_salt)
    }

    fn submit(&self, py: Python<'_>, pod: &str, model: &str, seq: u64, payload: &[u8]) -> PyResult<bool> {
        let data = payload.to_vec();
        let ix = &self.ix;
        Ok(py.detach(|| ix.submit(pod, model, Some(seq), data))?)
    }

    fn clear_pod(&self, py: Python<'_>, pod: &str) -> PyResult<()> {
        let ix = &self.ix;
        Ok(py.detach(|| ix.clear_pod(pod))?)
    }

    fn remove_pod(&self, py: Python<'_>, pod: &str) -> PyResult<()> {
        let ix = &self.ix;
        Ok(py.detach(|| ix.remove_pod(pod))?)
    }

    #[pyo3(signature = (timeout = None))]
    fn flush(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let t = match timeout {
            Some(s) if s.is_finite() && s >= 0.0 => Some(Duration::from_secs_f64(s)),
            Some(s) => return Err(invalid(format!("timeout must be a finite number >= 0, got {s}"))),
            None => None,
        };
        let ix = &self.ix;
        Ok(py.detach(|| ix.flush(t)))
    }

    #[pyo3(signature = (pod, model, payload, seq = None))]
    fn apply(
        &self,
        py: Python<'_>,
        pod: &str,
        model: &str,
        payload: &[u8],
        seq: Option<u64>,
    ) -> PyResult<PyApplyResult> {
        let ix = &self.ix;
        let r = py.detach(|| ix.apply(pod, model, seq, payload))?;
        Ok(PyApplyResult {
            events: r.events,
            stored_blocks: r.stored_blocks,
            removed_blocks: r.removed_blocks,
            cleared: r.cleared,
            decode_errors: r.decode_errors,
            unknown_event_types: r.unknown_event_types,
            unknown_parents: r.unknown_parents,
            dp_rank: r.dp_rank,
        })
    }

    #[pyo3(signature = (pod, model, keys, tier = "GPU"))]
    fn add_blocks(&self, py: Python<'_>, pod: &str, model: &str, keys: &Bound<'_, PyAny>, tier: &str) -> PyResult<()> {
        let keys = extract_keys(keys)?;
        let ix = &self.ix;
        Ok(py.detach(|| ix.add_blocks(pod, model, &keys, tier))?)
    }

    #[pyo3(signature = (pod, model, keys, tier = "GPU"))]
    fn remove_blocks(
        &self,
        py: Python<'_>,
        pod: &str,
        model: &str,
        keys: &Bound<'_, PyAny>,
        tier: &str,
    ) -> PyResult<()> {
        let keys = extract_keys(keys)?;
        let ix = &self.ix;
        Ok(py.detach(|| ix.remove_blocks(pod, model, &keys, tier))?)
    }

    #[pyo3(signature = (model, token_ids, *, lora_name = None, cache_salt = None, pods = None))]
    fn score(
        &self,
        py: Python<'_>,
        model: &str,
        token_ids: &Bound<'_, PyAny>,
        lora_name: Option<&str>,
        cache_salt: Option<&str>,
        pods: Option<Vec<String>>,
    ) -> PyResult<PyScoreResult> {
        let toks = extract_tokens(token_ids)?;
        let extras = Extras::for_request(lora_name, cache_salt);
        let ix = &self.ix;
        let r = py.detach(|| {
            let names: Option<Vec<&str>> = pods.as_ref().map(|v| v.iter().map(String::as_str).collect());
            ix.score_tokens(model, &toks, &extras, names.as_deref())
        });
        score_result(py, r)
    }

    #[pyo3(signature = (model, keys, *, pods = None))]
    fn score_keys(
        &self,
        py: Python<'_>,
        model: &str,
        keys: &Bound<'_, PyAny>,
        pods: Option<Vec<String>>,
    ) -> PyResult<PyScoreResult> {
        let keys = extract_keys(keys)?;
        let ix = &self.ix;
        let r = py.detach(|| {
            let names: Option<Vec<&str>> = pods.as_ref().map(|v| v.iter().map(String::as_str).collect());
            ix.score_keys(model, &keys, names.as_deref())
        });
        score_result(py, r)
    }

    #[pyo3(signature = (model, keys, *, pods = None))]
    fn lookup(
        &self,
        py: Python<'_>,
        model: &str,
        keys: &Bound<'_, PyAny>,
        pods: Option<Vec<String>>,
    ) -> PyResult<Vec<Vec<(String, String)>>> {
        let keys = extract_keys(keys)?;
        let ix = &self.ix;
        let r = py.detach(|| {
            let names: Option<Vec<&str>> = pods.as_ref().map(|v| v.iter().map(String::as_str).collect());
            ix.lookup(model, &keys, names.as_deref())
        });
        Ok(r.into_iter().map(|v| v.into_iter().map(|(p, t)| (p.to_string(), t)).collect()).collect())
    }

    fn pod_state(&self, py: Python<'_>, pod: &str) -> Option<PyPodState> {
        let ix = &self.ix;
        py.detach(|| ix.pod_state(pod)).map(Into::into)
    }

    fn pod_states(&self, py: Python<'_>) -> Vec<PyPodState> {
        let ix = &self.ix;
        py.detach(|| ix.pod_states()).into_iter().map(Into::into).collect()
    }

    fn stats(&self, py: Python<'_>) -> PyIndexStats {
        let ix = &self.ix;
        let s = py.detach(|| ix.stats());
        PyIndexStats {
            keys: s.index.keys,
            entries: s.index.entries,
            key_evictions: s.index.key_evictions,
            entry_evictions: s.index.entry_evictions,
            bytes_used: s.index.bytes_used,
            pods: s.pods,
            models: s.models,
            max_keys: s.index.max_keys,
            max_pods_per_key: s.index.max_pods_per_key,
        }
    }

    fn counters(&self) -> HashMap<&'static str, u64> {
        self.ix.counters().into_iter().collect()
    }

    fn close(&self, py: Python<'_>) {
        let ix = &self.ix;
        py.detach(|| ix.close())
    }

    fn snapshot(&self) -> PySnapshotStream {
        PySnapshotStream { writer: parking_lot::Mutex::new(self.ix.snapshot()) }
    }

    fn load_snapshot(&self, py: Python<'_>, data: &[u8]) -> PyResult<HashMap<&'static str, u64>> {
        let ix = &self.ix;
        Ok(loaded(py.detach(|| ix.load_snapshot(data))?))
    }

    fn load_snapshot_file(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<HashMap<&'static str, u64>> {
        let ix = &self.ix;
        let r = py.detach(|| std::fs::read(&path).map(|data| ix.load_snapshot(&data)));
        Ok(loaded(r.map_err(PyErr::from)??))
    }

    fn check_snapshot_header(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let ix = &self.ix;
        py.detach(|| ix.check_snapshot_header(data))?;
        Ok(())
    }

    fn __repr__(&self) -> String {
        let tp = self.ix.token_processor();
        format!(
            "Indexer(block_size={}, algorithm={:?}, shards={})",
            tp.block_size(),
            tp.algorithm().name(),
            self.ix.num_shards()
        )
    }
}

fn loaded(l: crate::snapshot::Loaded) -> HashMap<&'static str, u64> {
    let fields = [("keys", l.keys), ("entries", l.entries), ("pods", l.pods), ("models", l.models)];
    fields.into_iter().chain([("bridge_entries", l.bridge_entries), ("dropped_entries", l.dropped_entries)]).collect()
}

/// `Indexer.snapshot()`: the snapshot's byte chunks, each copied and encoded when asked for.
#[pyclass(name = "SnapshotStream", module = "kvindex_service._native", frozen)]
struct PySnapshotStream {
    writer: parking_lot::Mutex<SnapshotWriter>,
}

#[pymethods]
impl PySnapshotStream {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }
    fn __next__<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        let w = &self.writer;
        py.detach(|| w.lock().next()).map(|chunk| PyBytes::new(py, &chunk))
    }
    /// Longest time one index shard's lock was held so far (seconds).
    #[getter]
    fn max_lock_hold(&self) -> f64 {
        self.writer.lock().max_lock_hold.as_secs_f64()
    }
    #[getter]
    fn keys(&self) -> u64 {
        self.writer.lock().keys
    }
}

/// The core's index defaults, named as `Indexer`'s keyword arguments.
#[pyfunction]
fn index_defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let c = IndexerConfig::default();
    let d = PyDict::new(py);
    d.set_item("block_size", c.block_size)?;
    d.set_item("hash_seed", c.hash_seed)?;
    d.set_item("algorithm", c.algorithm.name())?;
    d.set_item("max_keys", c.max_keys)?;
    d.set_item("max_pods_per_key", c.max_pods_per_key)?;
    d.set_item("shards", c.shards)?;
    d.set_item("queue_capacity", c.queue_capacity)?;
    d.set_item("tier_weights", c.tier_weights.into_iter().collect::<HashMap<_, _>>())?;
    d.set_item("key_memo", c.key_memo_blocks)?;
    d.set_item("max_tiers_per_pod", c.max_tiers_per_pod)?;
    Ok(d)
}

#[pymodule(gil_used = false)]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("ALGORITHMS", PyTuple::new(py, Algorithm::ALL.iter().map(|a| a.name()))?)?;
    m.add("KvIndexError", py.get_type::<KvIndexError>())?;
    m.add("InvalidInputError", invalid_type(py))?;
    m.add("ClosedError", closed_type(py))?;
    m.add("ThreadStartError", thread_start_type(py))?;
    m.add("SnapshotError", snapshot_type(py))?;
    m.add("SnapshotMismatchError", snapshot_mismatch_type(py))?;
    m.add_function(wrap_pyfunction!(index_defaults, m)?)?;
    m.add_class::<PyTokenProcessor>()?;
    m.add_class::<PyIndexer>()?;
    m.add_class::<PyScoreResult>()?;
    m.add_class::<PyPodScore>()?;
    m.add_class::<PyApplyResult>()?;
    m.add_class::<PyPodState>()?;
    m.add_class::<PyIndexStats>()?;
    m.add_class::<PySnapshotStream>()?;
    Ok(())
}
