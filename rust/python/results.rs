//! Frozen result classes: conversion only (naming, zeros and order are the core's).

use std::collections::HashMap;

use pyo3::prelude::*;

use crate::pods::PodState;
use crate::scoring::{PodScore, ScoreResult};

#[pyclass(name = "PodScore", module = "kvindex_service._native", frozen, get_all)]
pub(super) struct PyPodScore {
    pub(super) pod: String,
    pub(super) matched_blocks: u32,
    pub(super) matched_tokens: u64,
    pub(super) score: f64,
    pub(super) tier_blocks: HashMap<String, u32>,
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
pub(super) struct PyScoreResult {
    pub(super) scores: Vec<Py<PyPodScore>>,
    pub(super) total_blocks: usize,
    pub(super) total_tokens: usize,
    pub(super) keys_computed: usize,
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
pub(super) struct PyApplyResult {
    pub(super) events: u64,
    pub(super) stored_blocks: u64,
    pub(super) removed_blocks: u64,
    pub(super) cleared: u64,
    pub(super) decode_errors: u64,
    pub(super) unknown_event_types: u64,
    pub(super) unknown_parents: u64,
    pub(super) dp_rank: Option<i64>,
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
pub(super) struct PyPodState {
    pub(super) pod: String,
    pub(super) models: Vec<String>,
    pub(super) blocks_by_tier: HashMap<String, i64>,
    pub(super) last_seq: Option<u64>,
    pub(super) last_event_ts: Option<f64>,
    pub(super) dp_rank: Option<i64>,
    pub(super) batches_applied: u64,
    pub(super) events_applied: u64,
    pub(super) decode_errors: u64,
    pub(super) unknown_event_types: u64,
    pub(super) unknown_parents: u64,
    pub(super) hash_matches: u64,
    pub(super) hash_mismatches: u64,
    pub(super) hashes_match: Option<bool>,
    pub(super) tiers_refused: u64,
    pub(super) bridge_entries: u64,
    pub(super) kv_cache_groups: Vec<(u8, String, Option<u32>, u32)>,
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
            kv_cache_groups: s.kv_cache_groups.into_iter().map(|(g, k, w, b)| (g, k.to_string(), w, b)).collect(),
        }
    }
}

#[pyclass(name = "IndexStats", module = "kvindex_service._native", frozen, get_all)]
pub(super) struct PyIndexStats {
    pub(super) keys: u64,
    pub(super) entries: u64,
    pub(super) key_evictions: u64,
    pub(super) entry_evictions: u64,
    pub(super) bytes_used: u64,
    pub(super) pods: u64,
    pub(super) models: u64,
    pub(super) max_keys: u64,
    pub(super) max_pods_per_key: u64,
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

/// A core result as Python objects: conversion only (naming, zeros and order are the core's).
pub(super) fn score_result(py: Python<'_>, r: ScoreResult) -> PyResult<PyScoreResult> {
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
