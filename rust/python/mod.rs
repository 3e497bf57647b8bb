//! The Python face of the core (`kvindex_service._native`): the only module that knows pyo3.
//! Each method extracts plain data, detaches from the interpreter for the O(n) work, and
//! converts the result back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

mod convert;
mod errors;
mod records;
mod results;

use convert::*;
use errors::*;
use results::*;

use crate::config::{self, IndexerConfig};
use crate::hashing::{Algorithm, Extras, TokenProcessor};
use crate::indexer::Indexer;
use crate::snapshot::SnapshotWriter;

/// Scores of at most this many tokens keep the GIL: the work is tens of microseconds, while
/// releasing means waiting to take the GIL back behind whatever Python thread grabbed it
/// (under ingest: the event subscriber's loop, up to `sys.getswitchinterval()` each time).
/// The scoring thread then never waits for ingest. Longer prompts release it.
const HOLD_GIL_MAX_TOKENS: usize = 4096;

/// `f()` with the GIL held when `short`, else detached from the interpreter.
fn run_maybe_detached<T, F>(py: Python<'_>, short: bool, f: F) -> T
where
    F: pyo3::marker::Ungil + FnOnce() -> T,
    T: pyo3::marker::Ungil,
{
    if short {
        f()
    } else {
        py.detach(f)
    }
}

pyo3::create_exception!(
    kvindex_service._native,
    KvIndexError,
    PyException,
    "Base class of every error raised by the core."
);

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

#[pyclass(name = "Indexer", module = "kvindex_service._native", frozen)]
struct PyIndexer {
    ix: Arc<Indexer>,
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
        let r = run_maybe_detached(py, toks.len() <= HOLD_GIL_MAX_TOKENS, || {
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
    records::register(m)?;
    Ok(())
}
