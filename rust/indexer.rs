//! The indexer: one block index, its token processor, the per-pod records (with their
//! engine-hash bridges) and the event shards that apply each pod's batches in arrival order.
//!
//! Write path: `submit` queues a raw batch on the pod's shard (`shards.rs`), whose worker
//! decodes and applies it (`apply.rs`, `bridge.rs`). Read path: `score_tokens` hashes lazily,
//! finds the prefix runs and ranks them (`scoring.rs`).
//!
//! # Lock order
//!
//! All locks are parking_lot and not reentrant. Where two are held together, they are taken
//! in this order (never the reverse), and none is held while waiting on a shard queue:
//!
//! 1. `Inner::models` (RwLock: model names)
//! 2. `PodInfo::models` (Mutex: the models one pod served)
//! 3. `PodInfo::bridge` (Mutex: one pod's bridge, held by its shard for a whole event)
//! 4. `BlockIndex` shard Mutexes, one at a time
//!
//! `Inner::pods` (RwLock: pod names and records), the tier table's RwLock (`tiers.rs`: tier
//! names and weights, one lock) and the key memo's Mutexes are leaves: nothing else is taken
//! while one is held. `state_of` takes 1-2-3; events take 3-4 (their tier is resolved before
//! 3, holding no lock). Resolving a tier may count live entries (index shard locks, one at a
//! time, the table lock not held); reclaiming serializes on the tier table's own Mutex, taken
//! first and holding nothing else. Snapshots (`snapshot.rs`) take 4 one shard at a time,
//! then `Inner::pods` and `Inner::models` one after the other, then each pod's 2 and 3 alone:
//! never two at once; loading one takes the same locks the write path does, one at a time.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use smallvec::SmallVec;

use crate::counters::{Counters, C};
use crate::error::{Error, Result};
use crate::hashing::{Algorithm, BlockKey, Extras, TokenProcessor};
use crate::index::{entry_pod, entry_tier, BlockIndex, IndexStats, ModelId, PodId, Tier, MAX_PODS, TIER_GPU};
use crate::memo::KeyMemo;
use crate::pods::{Names, PodInfo};
use crate::scoring::{prefix_runs, rank, Ctx, Runs, ScoreResult};
use crate::shards::{Msg, Shards};
use crate::tiers::{Budget, PodTiers, Snapshot, TierGuard, TierTable};

pub use crate::apply::ApplyResult;
pub use crate::config::IndexerConfig;
pub use crate::pods::PodState;
pub use crate::shards::fnv1a;

/// Pod names and records, indexed by `PodId`.
#[derive(Default)]
pub(crate) struct Pods {
    names: Names,
    infos: Vec<Arc<PodInfo>>,
}

/// State shared by the facade and the shard workers.
pub(crate) struct Inner {
    pub(crate) cfg: IndexerConfig,
    pub(crate) tp: TokenProcessor,
    memo: Option<KeyMemo>,
    pub(crate) index: BlockIndex,
    pods: RwLock<Pods>,
    models: RwLock<Names>,
    pub(crate) tiers: TierTable,
    pub(crate) counters: Counters,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FullStats {
    pub index: IndexStats,
    pub pods: u64,
    pub models: u64,
}

pub struct Indexer {
    inner: Arc<Inner>,
    shards: Shards,
}

impl Indexer {
    pub fn new(cfg: IndexerConfig) -> Result<Self> {
        let tp = TokenProcessor::new(cfg.block_size, cfg.hash_seed.as_deref(), cfg.algorithm)?;
        cfg.validate()?;
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let nshards = cfg.effective_shards(cores);
        // at most ~64K keys per index shard: a snapshot holds one shard's lock at a time, for
        // a few milliseconds at that size. Smaller shards shorten that hold but cost every add
        // and lookup cache locality (8K keys per shard: add+remove 33% and warm scoring 35%
        // slower in one criterion run). BlockIndex keeps at least 4096 keys per shard.
        let want = (cores * 32).max(64).max(cfg.max_keys / 65_536);
        let index = BlockIndex::new(cfg.max_keys, cfg.max_pods_per_key, want, cfg.algorithm.chains_on_digest());
        let memo = match cfg.algorithm {
            Algorithm::Xxh3 => None, // hashing is already as cheap as a memo lookup
            _ => KeyMemo::new(cfg.key_memo_blocks),
        };
        let inner = Arc::new(Inner {
            tp,
            memo,
            index,
            pods: RwLock::new(Pods::default()),
            models: RwLock::new(Names::default()),
            tiers: TierTable::new(&cfg.tier_weights, cfg.default_weight, cfg.max_tiers_per_pod),
            counters: Counters::default(),
            cfg,
        });
        let shards = Shards::start(&inner, nshards, inner.cfg.queue_capacity)?;
        Ok(Indexer { inner, shards })
    }

    pub fn config(&self) -> &IndexerConfig {
        &self.inner.cfg
    }
    pub fn token_processor(&self) -> &TokenProcessor {
        &self.inner.tp
    }
    pub fn num_shards(&self) -> usize {
        self.shards.count()
    }

    // -- write path -------------------------------------------------------------------------

    /// Queue one raw batch for `pod`. Returns false if the shard queue was full and the call
    /// had to wait.
    pub fn submit(&self, pod: &str, model: &str, seq: Option<u64>, payload: Vec<u8>) -> Result<bool> {
        let pod_id = self.inner.pod_id(pod)?;
        let model_id = self.inner.model_id(model);
        self.inner.counters.add(C::batches_queued, 1);
        self.shards.send(&self.inner, pod, Msg::Batch { pod: pod_id, model: model_id, seq, payload })
    }

    pub fn clear_pod(&self, pod: &str) -> Result<()> {
        if let Some(id) = self.inner.known_pod(pod) {
            self.shards.send(&self.inner, pod, Msg::Clear(id))?;
        }
        Ok(())
    }

    pub fn remove_pod(&self, pod: &str) -> Result<()> {
        if let Some(id) = self.inner.known_pod(pod) {
            self.shards.send(&self.inner, pod, Msg::Remove(id))?;
        }
        Ok(())
    }

    /// Wait until everything queued before this call is applied.
    pub fn flush(&self, timeout: Option<Duration>) -> bool {
        self.shards.flush(timeout)
    }

    /// Decode and apply one batch on the caller's thread (still in per-pod order only if
    /// the caller does not also queue batches for the same pod).
    pub fn apply(&self, pod: &str, model: &str, seq: Option<u64>, payload: &[u8]) -> Result<ApplyResult> {
        let pod_id = self.inner.pod_id(pod)?;
        let model_id = self.inner.model_id(model);
        Ok(self.inner.apply_batch(pod_id, model_id, seq, payload))
    }

    pub fn add_blocks(&self, pod: &str, model: &str, keys: &[BlockKey], tier: &str) -> Result<()> {
        crate::tiers::normalize(tier)?;
        let p = self.inner.pod_id(pod)?;
        let info = self.inner.info(p);
        let guard = self.inner.store_tier(p, &info, Some(tier), &mut Budget::default())?;
        let t = guard.tier();
        let m = self.inner.model_id(model);
        info.note_model(m);
        for &k in keys {
            self.inner.index.add(m, p, k, t, None);
        }
        Ok(())
    }

    pub fn remove_blocks(&self, pod: &str, model: &str, keys: &[BlockKey], tier: &str) -> Result<()> {
        let guard = self.inner.tiers.find(tier)?;
        let m = self.inner.known_model(model);
        let (Some(p), Some(m), Some(g)) = (self.inner.known_pod(pod), m, guard) else {
            return Ok(());
        };
        for &k in keys {
            self.inner.index.remove(m, p, k, g.tier());
        }
        Ok(())
    }

    // -- read path --------------------------------------------------------------------------

    fn filter_ids(&self, pods: Option<&[&str]>) -> Option<Vec<PodId>> {
        pods.map(|names| names.iter().filter_map(|n| self.inner.known_pod(n)).collect())
    }

    /// Score a request's tokens against every pod, or only the `pods` named (each listed).
    pub fn score_tokens(&self, model: &str, tokens: &[u32], extras: &Extras<'_>, pods: Option<&[&str]>) -> ScoreResult {
        let (index, tp) = (&self.inner.index, &self.inner.tp);
        let (runs, tiers) = match self.inner.known_model(model) {
            None => (Runs::default(), self.inner.tiers.snapshot()),
            Some(m) => {
                let filter = self.filter_ids(pods);
                let f = filter.as_deref();
                self.stable(|s| match &self.inner.memo {
                    Some(memo) => {
                        prefix_runs(index, m, memo.chain_iter(tp, tokens, extras).map(|c| c.key()), f, &ctx(s))
                    }
                    None => prefix_runs(index, m, tp.chain_iter(tokens, None, extras, 0).map(|c| c.key()), f, &ctx(s)),
                })
            }
        };
        self.ranked(runs, &tiers, pods, tokens.len() / tp.block_size(), tokens.len())
    }

    /// Run a read of tier ids under a tier snapshot that stayed valid (no slot freed and
    /// reused meanwhile); retried a few times, then the last snapshot is used.
    fn stable<T>(&self, mut read: impl FnMut(&Snapshot) -> T) -> (T, Snapshot) {
        let mut snap = self.inner.tiers.snapshot();
        for _ in 0..3 {
            let out = read(&snap);
            if self.inner.tiers.generation() == snap.generation {
                return (out, snap);
            }
            snap = self.inner.tiers.snapshot();
        }
        (read(&snap), snap)
    }

    /// Score precomputed block keys (each block counts `block_size` tokens).
    pub fn score_keys(&self, model: &str, keys: &[BlockKey], pods: Option<&[&str]>) -> ScoreResult {
        let (runs, tiers) = match self.inner.known_model(model) {
            None => (Runs::default(), self.inner.tiers.snapshot()),
            Some(m) => {
                let filter = self.filter_ids(pods);
                self.stable(|s| prefix_runs(&self.inner.index, m, keys.iter().copied(), filter.as_deref(), &ctx(s)))
            }
        };
        self.ranked(runs, &tiers, pods, keys.len(), keys.len() * self.inner.tp.block_size())
    }

    fn ranked(
        &self,
        runs: Runs,
        tiers: &Snapshot,
        pods: Option<&[&str]>,
        total_blocks: usize,
        total_tokens: usize,
    ) -> ScoreResult {
        let names = self.inner.pods.read();
        let scores = rank(runs.runs, pods, |id| names.names.name(id).clone(), &tiers.names, self.inner.tp.block_size());
        ScoreResult { scores, total_blocks, total_tokens, keys_computed: runs.keys_consumed }
    }

    /// Per key, the (pod, tier) entries holding it.
    pub fn lookup(&self, model: &str, keys: &[BlockKey], pods: Option<&[&str]>) -> Vec<Vec<(Arc<str>, String)>> {
        let filter = self.filter_ids(pods);
        let m = self.inner.known_model(model);
        let mut buf = SmallVec::new();
        let (ids, tiers) = self.stable(|_| {
            keys.iter()
                .map(|&k| {
                    let Some(m) = m else { return Vec::new() };
                    self.inner.index.lookup_into(m, k, &mut buf);
                    buf.iter()
                        .filter(|&&e| filter.as_ref().is_none_or(|f| f.contains(&entry_pod(e))))
                        .map(|&e| (entry_pod(e), entry_tier(e)))
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        });
        ids.into_iter()
            .map(|per| per.into_iter().map(|(p, t)| (self.pod_name(p), tiers.names[t as usize].clone())).collect())
            .collect()
    }

    pub fn pod_name(&self, id: PodId) -> Arc<str> {
        self.inner.pods.read().names.name(id).clone()
    }

    pub fn tier_name(&self, t: Tier) -> String {
        self.inner.tiers.name(t).unwrap_or_else(|| format!("TIER{t}"))
    }

    /// The registered tier names, in id order.
    pub fn tier_names(&self) -> Vec<String> {
        self.inner.tiers.names()
    }

    pub fn pod_state(&self, pod: &str) -> Option<PodState> {
        let id = self.inner.known_pod(pod)?;
        let info = self.inner.info(id);
        info.active.load(Relaxed).then(|| self.inner.state_of(id, &info))
    }

    pub fn pod_states(&self) -> Vec<PodState> {
        let infos: Vec<_> = self.inner.pods.read().infos.iter().cloned().enumerate().collect();
        infos
            .into_iter()
            .filter(|(_, i)| i.active.load(Relaxed))
            .map(|(id, info)| self.inner.state_of(id as PodId, &info))
            .collect()
    }

    pub fn stats(&self) -> FullStats {
        let pods = self.inner.pods.read().infos.iter().filter(|p| p.active.load(Relaxed)).count() as u64;
        FullStats { index: self.inner.index.stats(), pods, models: self.inner.models.read().len() as u64 }
    }

    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.inner.counters.snapshot()
    }

    /// Apply what is queued, then stop the workers. Idempotent.
    pub fn close(&self) {
        self.shards.close();
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}

impl Inner {
    pub(crate) fn pod_id(&self, pod: &str) -> Result<PodId> {
        if pod.is_empty() || pod.len() > 1024 {
            return Err(Error::invalid("pod id must be 1 to 1024 bytes"));
        }
        if let Some(id) = self.known_pod(pod) {
            self.info(id).active.store(true, Relaxed);
            return Ok(id);
        }
        let mut g = self.pods.write();
        if g.names.len() as u32 >= MAX_PODS {
            return Err(Error::TooManyPods { max: MAX_PODS });
        }
        let id = g.names.intern(pod);
        if id as usize == g.infos.len() {
            let name = g.names.name(id).clone();
            g.infos.push(Arc::new(PodInfo::new(name)));
        }
        Ok(id)
    }

    pub(crate) fn known_pod(&self, pod: &str) -> Option<PodId> {
        self.pods.read().names.get(pod)
    }

    pub(crate) fn info(&self, pod: PodId) -> Arc<PodInfo> {
        self.pods.read().infos[pod as usize].clone()
    }

    fn known_model(&self, model: &str) -> Option<ModelId> {
        self.models.read().get(model)
    }

    /// Every pod record, by id, and every model name, by id (snapshots; `pods` then
    /// `models`, one at a time).
    pub(crate) fn tables(&self) -> (Vec<Arc<PodInfo>>, Vec<Arc<str>>) {
        let pods = self.pods.read().infos.clone();
        let models = self.models.read();
        (pods, (0..models.len() as ModelId).map(|m| models.name(m).clone()).collect())
    }

    pub(crate) fn model_id(&self, model: &str) -> ModelId {
        if let Some(id) = self.known_model(model) {
            return id;
        }
        self.models.write().intern(model)
    }

    /// The tier a store by `pod` names (`None`: GPU), registered on first use within the
    /// pod's limit (`tiers.rs`); a refusal is counted. Call holding no lock.
    pub(crate) fn store_tier(
        &self,
        pod: PodId,
        info: &PodInfo,
        medium: Option<&str>,
        budget: &mut Budget,
    ) -> Result<TierGuard<'_>> {
        let Some(name) = medium else { return Ok(TierGuard::fixed(TIER_GPU)) };
        let tiers = PodTiers {
            mask: &info.tier_mask,
            pod_live: || self.index.pod_tier_counts(pod),
            global_live: || self.index.tier_counts(),
        };
        let r = self.tiers.acquire(name, tiers, budget);
        if let Err(Error::TooManyTiers { .. }) = &r {
            self.counters.add(C::tiers_refused, 1);
            info.tiers_refused.fetch_add(1, Relaxed);
        }
        r
    }

    fn state_of(&self, id: PodId, info: &PodInfo) -> PodState {
        let counts = self.index.pod_tier_counts(id);
        let tiers = self.tiers.snapshot().names;
        let models = self.models.read();
        info.state(&models, &tiers, &counts)
    }
}

/// The scorer's view of a tier snapshot.
fn ctx(s: &Snapshot) -> Ctx<'_> {
    Ctx { weights: &s.weights, slot_group: &s.slot_group, groups: &s.groups }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{batch, stored, tokens};
    use crate::tiers::Budget;

    fn indexer() -> Indexer {
        Indexer::new(IndexerConfig { shards: 1, ..Default::default() }).unwrap()
    }

    fn tier_of(ix: &Indexer, pod: &str, name: &str) -> Result<Tier> {
        let p = ix.inner.pod_id(pod)?;
        let info = ix.inner.info(p);
        let g = ix.inner.store_tier(p, &info, Some(name), &mut Budget::default())?;
        Ok(g.tier())
    }

    fn refused(ix: &Indexer) -> u64 {
        ix.counters().into_iter().find(|(n, _)| *n == "tiers_refused").unwrap().1
    }

    #[test]
    fn tiers_are_case_insensitive_and_bounded_per_pod() {
        let ix = indexer();
        assert_eq!((tier_of(&ix, "p", " gpu ").unwrap(), tier_of(&ix, "p", "Cpu").unwrap()), (0, 1));
        assert!(matches!(tier_of(&ix, "p", " "), Err(Error::InvalidInput { .. })));
        let per_pod = ix.config().max_tiers_per_pod;
        for i in 0..per_pod {
            ix.add_blocks("p", "m", &[1], &format!("t{i}")).unwrap();
        }
        // granted but holding nothing: the grant goes back
        tier_of(&ix, "p", "t0").unwrap();
        ix.remove_blocks("p", "m", &[1], "t0").unwrap();
        ix.add_blocks("p", "m", &[1], "t5").unwrap();
        ix.add_blocks("p", "m", &[1], "t0").unwrap_err();
        assert!(matches!(tier_of(&ix, "p", "one-more"), Err(Error::TooManyTiers { .. })));
        // an event naming one more tier is a decode error of that event, not of the batch
        let r = ix.apply("p", "m", None, &batch(&[stored(&[1], None, &tokens(16), Some("NVME"))])).unwrap();
        assert_eq!((r.events, r.decode_errors), (0, 1));
        assert_eq!(refused(&ix), 3);
        assert_eq!(ix.pod_state("p").unwrap().tiers_refused, 3);
        // another pod is not affected, built-in names never count
        tier_of(&ix, "q", "NVME").unwrap();
        for name in ["disk", "FS", "obj", "Storage", "cxl"] {
            tier_of(&ix, "p", name).unwrap();
        }
        let w = ix.inner.tiers.weights();
        assert_eq!((w[0], w[1], w[tier_of(&ix, "q", "nvme").unwrap() as usize]), (1.0, 0.8, 0.8));
    }

    #[test]
    fn bad_pod_ids_and_closed_indexers_are_typed_errors() {
        let ix = indexer();
        assert!(matches!(ix.submit("", "m", None, Vec::new()), Err(Error::InvalidInput { .. })));
        ix.close();
        ix.close();
        assert_eq!(ix.submit("p", "m", None, Vec::new()), Err(Error::Closed));
        assert!(ix.flush(Some(Duration::from_millis(10))));
    }

    #[test]
    fn unknown_models_score_candidates_as_zeros() {
        let ix = indexer();
        let r = ix.score_tokens("nope", &tokens(40), &Extras::None, Some(&["b", "a"]));
        assert_eq!((r.total_blocks, r.total_tokens, r.keys_computed), (2, 40, 0));
        let pods: Vec<_> = r.scores.iter().map(|s| s.pod.to_string()).collect();
        assert_eq!(pods, ["a", "b"]);
        assert!(ix.score_keys("nope", &[1, 2], None).scores.is_empty());
    }

    #[test]
    fn add_and_remove_blocks_by_key() {
        let ix = indexer();
        ix.add_blocks("b", "m", &[1, 2], "GPU").unwrap();
        ix.add_blocks("a", "m", &[1], "cpu").unwrap();
        let r = ix.score_keys("m", &[1, 2, 3], None);
        let got: Vec<_> = r.scores.iter().map(|s| (s.pod.to_string(), s.matched_blocks)).collect();
        assert_eq!(got, [("b".to_string(), 2), ("a".to_string(), 1)]);
        assert_eq!(r.total_tokens, 48);
        assert_eq!(ix.lookup("m", &[1], Some(&["a"])), vec![vec![(Arc::from("a"), "CPU".to_string())]]);
        ix.remove_blocks("b", "m", &[1], "GPU").unwrap();
        ix.remove_blocks("nobody", "m", &[1], "GPU").unwrap();
        assert_eq!(ix.score_keys("m", &[1, 2], None).scores.len(), 1);
    }
}
