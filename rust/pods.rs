//! Interned names (pods, models) and the per-pod record the shards update.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::bridge::Bridge;
use crate::groups::{GroupInfo, PodGroups};
use crate::index::{ModelId, MAX_TIERS, TIER_CPU, TIER_GPU};

/// Interned names: ids are never reused, so a stale id can never name another thing.
#[derive(Default)]
pub struct Names {
    ids: HashMap<Arc<str>, u32>,
    names: Vec<Arc<str>>,
}

impl Names {
    pub fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }
    pub fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let name: Arc<str> = Arc::from(s);
        let id = self.names.len() as u32;
        self.names.push(name.clone());
        self.ids.insert(name, id);
        id
    }
    pub fn name(&self, id: u32) -> &Arc<str> {
        &self.names[id as usize]
    }
    pub fn len(&self) -> usize {
        self.names.len()
    }
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Marks "no value" in the atomic i64 fields.
const NONE_I64: i64 = i64::MIN;

/// One pod: its engine-hash bridge, the models it served, and its event statistics.
/// The statistics are relaxed atomics (written by the pod's shard, read by anyone).
pub struct PodInfo {
    pub name: Arc<str>,
    /// False once removed; `submit`/`apply` for the name make it true again.
    pub active: AtomicBool,
    pub models: Mutex<Vec<ModelId>>,
    pub bridge: Mutex<Bridge>,
    pub batches: AtomicU64,
    pub events: AtomicU64,
    pub decode_errors: AtomicU64,
    pub unknown_types: AtomicU64,
    pub unknown_parents: AtomicU64,
    pub hash_matches: AtomicU64,
    pub hash_mismatches: AtomicU64,
    /// Custom tier slots granted to the pod (`tiers.rs`).
    pub tier_mask: AtomicU32,
    /// Events refused because their tier name did not fit.
    pub tiers_refused: AtomicU64,
    /// KV-cache groups the pod published (hybrid models, `groups.rs`).
    pub groups: Mutex<PodGroups>,
    last_seq: AtomicI64,
    /// Last batch applied to the end (`last_seq` is set when a batch starts): snapshots
    /// record this one, so a batch half-applied while they copy is replayed, not skipped.
    applied_seq: AtomicI64,
    last_ts: AtomicU64,
    dp_rank: AtomicI64,
}

impl PodInfo {
    pub fn new(name: Arc<str>) -> Self {
        PodInfo {
            name,
            active: AtomicBool::new(true),
            models: Mutex::new(Vec::new()),
            bridge: Mutex::new(Bridge::default()),
            batches: AtomicU64::new(0),
            events: AtomicU64::new(0),
            decode_errors: AtomicU64::new(0),
            unknown_types: AtomicU64::new(0),
            unknown_parents: AtomicU64::new(0),
            hash_matches: AtomicU64::new(0),
            hash_mismatches: AtomicU64::new(0),
            tier_mask: AtomicU32::new(0),
            tiers_refused: AtomicU64::new(0),
            groups: Mutex::new(PodGroups::default()),
            last_seq: AtomicI64::new(NONE_I64),
            applied_seq: AtomicI64::new(NONE_I64),
            last_ts: AtomicU64::new(f64::NAN.to_bits()),
            dp_rank: AtomicI64::new(NONE_I64),
        }
    }

    /// Forget everything but the name (remove_pod).
    pub fn reset(&self) {
        self.models.lock().clear();
        *self.bridge.lock() = Bridge::default();
        for a in [
            &self.batches,
            &self.events,
            &self.decode_errors,
            &self.unknown_types,
            &self.unknown_parents,
            &self.hash_matches,
            &self.hash_mismatches,
            &self.tiers_refused,
        ] {
            a.store(0, Relaxed);
        }
        self.tier_mask.store(0, Relaxed);
        *self.groups.lock() = PodGroups::default();
        self.last_seq.store(NONE_I64, Relaxed);
        self.applied_seq.store(NONE_I64, Relaxed);
        self.last_ts.store(f64::NAN.to_bits(), Relaxed);
        self.dp_rank.store(NONE_I64, Relaxed);
    }

    pub fn note_model(&self, model: ModelId) {
        let mut ms = self.models.lock();
        if !ms.contains(&model) {
            ms.push(model);
        }
    }
    pub fn set_seq(&self, seq: u64) {
        self.last_seq.store(seq.min(i64::MAX as u64) as i64, Relaxed);
    }
    /// A batch finished applying (`None`: it had no sequence number).
    pub fn set_applied(&self, seq: Option<u64>) {
        if let Some(s) = seq {
            self.applied_seq.store(s.min(i64::MAX as u64) as i64, Relaxed);
        }
    }
    pub fn applied_seq(&self) -> Option<u64> {
        let s = self.applied_seq.load(Relaxed);
        (s != NONE_I64).then_some(s as u64)
    }
    pub fn last_ts(&self) -> Option<f64> {
        let ts = f64::from_bits(self.last_ts.load(Relaxed));
        (!ts.is_nan()).then_some(ts)
    }
    pub fn dp_rank(&self) -> Option<i64> {
        let dp = self.dp_rank.load(Relaxed);
        (dp != NONE_I64).then_some(dp)
    }
    pub fn set_ts(&self, ts: f64) {
        if ts.is_finite() {
            self.last_ts.store(ts.to_bits(), Relaxed);
        }
    }
    pub fn set_dp_rank(&self, rank: i64) {
        self.dp_rank.store(rank, Relaxed);
    }

    /// The public view. `models` are the interned model names, `tiers[t]` names tier `t`
    /// (`""` for a free slot), `counts[t]` the pod's blocks in tier `t`. GPU and CPU are
    /// always listed, other tiers only while the pod holds blocks in them.
    pub fn state(&self, models: &Names, tiers: &[String], counts: &[i64; MAX_TIERS]) -> PodState {
        let seq = self.last_seq.load(Relaxed);
        let ts = f64::from_bits(self.last_ts.load(Relaxed));
        let dp = self.dp_rank.load(Relaxed);
        PodState {
            pod: self.name.clone(),
            models: self.models.lock().iter().map(|&m| models.name(m).clone()).collect(),
            blocks_by_tier: tiers
                .iter()
                .enumerate()
                .filter(|&(i, t)| !t.is_empty() && (i == TIER_GPU as usize || i == TIER_CPU as usize || counts[i] != 0))
                .map(|(i, t)| (t.clone(), counts[i]))
                .collect(),
            last_seq: (seq != NONE_I64).then_some(seq as u64),
            last_event_ts: (!ts.is_nan()).then_some(ts),
            dp_rank: (dp != NONE_I64).then_some(dp),
            batches_applied: self.batches.load(Relaxed),
            events_applied: self.events.load(Relaxed),
            decode_errors: self.decode_errors.load(Relaxed),
            unknown_event_types: self.unknown_types.load(Relaxed),
            unknown_parents: self.unknown_parents.load(Relaxed),
            hash_matches: self.hash_matches.load(Relaxed),
            hash_mismatches: self.hash_mismatches.load(Relaxed),
            tiers_refused: self.tiers_refused.load(Relaxed),
            bridge_entries: self.bridge.lock().len() as u64,
            kv_cache_groups: self.groups.lock().describe(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PodState {
    pub pod: Arc<str>,
    pub models: Vec<Arc<str>>,
    pub blocks_by_tier: Vec<(String, i64)>,
    pub last_seq: Option<u64>,
    pub last_event_ts: Option<f64>,
    pub dp_rank: Option<i64>,
    pub batches_applied: u64,
    pub events_applied: u64,
    pub decode_errors: u64,
    pub unknown_event_types: u64,
    pub unknown_parents: u64,
    pub hash_matches: u64,
    pub hash_mismatches: u64,
    pub tiers_refused: u64,
    pub bridge_entries: u64,
    /// The KV-cache groups the pod published (`groups.rs`): (group_idx, kind as scored,
    /// sliding window in tokens, engine block size).
    pub kv_cache_groups: Vec<GroupInfo>,
}

impl PodState {
    /// None until the pod stored a block; then whether every engine hash equalled our key.
    pub fn hashes_match(&self) -> Option<bool> {
        (self.hash_matches + self.hash_mismatches > 0).then_some(self.hash_mismatches == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interned_ids_are_stable() {
        let mut n = Names::default();
        assert_eq!((n.intern("a"), n.intern("b"), n.intern("a")), (0, 1, 0));
        assert_eq!((n.get("b"), n.get("c"), n.len()), (Some(1), None, 2));
        assert_eq!(&**n.name(1), "b");
    }

    #[test]
    fn reset_forgets_all_but_the_name() {
        let p = PodInfo::new(Arc::from("p"));
        let mut models = Names::default();
        p.note_model(models.intern("m"));
        p.set_seq(7);
        p.set_ts(f64::INFINITY); // ignored
        p.hash_mismatches.store(2, Relaxed);
        let s = p.state(&models, &[], &[0; MAX_TIERS]);
        assert_eq!((s.last_seq, s.last_event_ts, s.hashes_match()), (Some(7), None, Some(false)));
        assert_eq!(s.models, vec![Arc::from("m")]);
        p.reset();
        assert!(p.models.lock().is_empty());
        let s = p.state(&Names::default(), &[], &[0; MAX_TIERS]);
        assert_eq!((s.last_seq, s.hash_mismatches, s.hashes_match()), (None, 0, None));
    }
}
