//! The indexer: one block index, its token processor, the per-pod engine-hash bridges and
//! the event shards that apply each pod's batches in arrival order.
//!
//! Write path: `submit` picks a shard by FNV-1a of the pod id and queues the raw batch on
//! a bounded channel (a full queue blocks the caller: push-back, counted); the shard's worker
//! thread decodes and applies it. Read path: `score_tokens` hashes lazily and scores.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender, TrySendError};
use parking_lot::{Mutex, RwLock};
use smallvec::SmallVec;

use crate::error::{Error, Result};
use crate::events::{decode_batch, BlockRemoved, BlockStored, EngineHash, Event};
use crate::hashing::{cbor, Algorithm, BlockKey, Chain, Extras, TokenProcessor};
use crate::index::{BlockIndex, IndexStats, ModelId, PodId, Tier, MAX_PODS, MAX_TIERS, TIER_GPU};
use crate::memo::KeyMemo;
use crate::scoring::{score_keys, ScoreResult};

#[derive(Clone, Debug)]
pub struct IndexerConfig {
    pub block_size: usize,
    pub hash_seed: Option<String>,
    pub algorithm: Algorithm,
    pub max_keys: usize,
    pub max_pods_per_key: usize,
    /// Event shards (worker threads); 0 = one per core.
    pub shards: usize,
    pub queue_capacity: usize,
    /// Tier name -> weight. Unnamed tiers weigh `default_weight`.
    pub tier_weights: Vec<(String, f64)>,
    pub default_weight: f64,
    /// Engine-hash -> key entries kept per pod at most.
    pub max_bridge_per_pod: usize,
    /// Blocks the read path's key memo remembers (SHA-256 algorithms only; 0 = off).
    pub key_memo_blocks: usize,
}

impl Default for IndexerConfig {
    fn default() -> Self {
        IndexerConfig {
            block_size: 16,
            hash_seed: None,
            algorithm: Algorithm::Sha256Cbor,
            max_keys: 10_000_000,
            max_pods_per_key: 64,
            shards: 0,
            queue_capacity: 1024,
            tier_weights: vec![("GPU".into(), 1.0), ("CPU".into(), 0.8)],
            default_weight: 0.8,
            max_bridge_per_pod: 4_000_000,
            key_memo_blocks: 1 << 18,
        }
    }
}

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy)]
        pub enum C { $($name),* }
        pub const COUNTER_NAMES: &[&str] = &[$(stringify!($name)),*];
    };
}

counters!(
    batches_applied,
    batch_decode_errors,
    batches_with_trailing_bytes,
    events_block_stored,
    events_block_removed,
    events_all_blocks_cleared,
    events_unknown_type,
    event_decode_errors,
    blocks_stored,
    blocks_removed,
    unknown_parents,
    unplaced_blocks,
    block_size_mismatches,
    hash_matches,
    hash_mismatches,
    bridge_full,
    queue_pushbacks,
    batches_queued,
    pods_cleared,
);

#[derive(Default)]
struct Counters([AtomicU64; COUNTER_NAMES.len()]);

impl Counters {
    fn add(&self, c: C, n: u64) {
        if n > 0 {
            self.0[c as usize].fetch_add(n, Relaxed);
        }
    }
}

const NONE_I64: i64 = i64::MIN;

type Bridge = hashbrown::HashMap<EngineHash, SmallVec<[BlockKey; 2]>>;

struct PodInfo {
    name: Arc<str>,
    active: AtomicBool,
    models: Mutex<Vec<ModelId>>,
    bridge: Mutex<Bridge>,
    batches: AtomicU64,
    events: AtomicU64,
    decode_errors: AtomicU64,
    unknown_types: AtomicU64,
    unknown_parents: AtomicU64,
    hash_matches: AtomicU64,
    hash_mismatches: AtomicU64,
    last_seq: AtomicI64,
    last_ts: AtomicU64,
    dp_rank: AtomicI64,
}

impl PodInfo {
    fn new(name: Arc<str>) -> Self {
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
            last_seq: AtomicI64::new(NONE_I64),
            last_ts: AtomicU64::new(f64::NAN.to_bits()),
            dp_rank: AtomicI64::new(NONE_I64),
        }
    }
    fn reset(&self) {
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
        ] {
            a.store(0, Relaxed);
        }
        self.last_seq.store(NONE_I64, Relaxed);
        self.last_ts.store(f64::NAN.to_bits(), Relaxed);
        self.dp_rank.store(NONE_I64, Relaxed);
    }
}

/// Interned names: ids are never reused, so a stale id can never name another thing.
#[derive(Default)]
struct Names {
    ids: HashMap<Arc<str>, u32>,
    names: Vec<Arc<str>>,
}

impl Names {
    fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let name: Arc<str> = Arc::from(s);
        let id = self.names.len() as u32;
        self.names.push(name.clone());
        self.ids.insert(name, id);
        id
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApplyResult {
    pub events: u64,
    pub stored_blocks: u64,
    pub removed_blocks: u64,
    pub cleared: u64,
    pub decode_errors: u64,
    pub unknown_event_types: u64,
    pub unknown_parents: u64,
    pub dp_rank: Option<i64>,
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
    pub bridge_entries: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FullStats {
    pub index: IndexStats,
    pub pods: u64,
    pub models: u64,
}

struct Inner {
    cfg: IndexerConfig,
    tp: TokenProcessor,
    memo: Option<KeyMemo>,
    index: BlockIndex,
    pods: RwLock<(Names, Vec<Arc<PodInfo>>)>,
    models: RwLock<Names>,
    tiers: RwLock<Vec<String>>,
    weights: RwLock<[f64; MAX_TIERS]>,
    counters: Counters,
}

enum Msg {
    Batch { pod: PodId, model: ModelId, seq: Option<u64>, payload: Vec<u8> },
    Clear(PodId),
    Remove(PodId),
    Barrier(Sender<()>),
    Stop,
}

pub struct Indexer {
    inner: Arc<Inner>,
    senders: Vec<Sender<Msg>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    closed: AtomicBool,
}

/// FNV-1a, 64-bit: picks a pod's shard.
pub fn fnv1a(s: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in s {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Indexer {
    pub fn new(cfg: IndexerConfig) -> Result<Self> {
        let tp = TokenProcessor::new(cfg.block_size, cfg.hash_seed.as_deref(), cfg.algorithm)?;
        if cfg.max_keys == 0 {
            return Err(Error::invalid("max_keys must be at least 1"));
        }
        if cfg.max_pods_per_key == 0 {
            return Err(Error::invalid("max_pods_per_key must be at least 1"));
        }
        if cfg.queue_capacity == 0 {
            return Err(Error::invalid("queue_capacity must be at least 1"));
        }
        for (name, w) in &cfg.tier_weights {
            if !w.is_finite() || *w < 0.0 {
                return Err(Error::invalid(format!("tier weight for {name} must be a finite number >= 0")));
            }
        }
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let nshards = if cfg.shards == 0 { cores } else { cfg.shards.min(256) };
        let index =
            BlockIndex::new(cfg.max_keys, cfg.max_pods_per_key, (cores * 32).max(64), cfg.algorithm.chains_on_digest());
        let memo = match cfg.algorithm {
            Algorithm::Xxh3 => None, // hashing is already as cheap as a memo lookup
            _ => KeyMemo::new(cfg.key_memo_blocks),
        };
        let inner = Arc::new(Inner {
            tp,
            memo,
            index,
            pods: RwLock::new((Names::default(), Vec::new())),
            models: RwLock::new(Names::default()),
            tiers: RwLock::new(Vec::new()),
            weights: RwLock::new([cfg.default_weight; MAX_TIERS]),
            counters: Counters::default(),
            cfg,
        });
        inner.tier_id("GPU")?;
        inner.tier_id("CPU")?;
        let mut senders = Vec::with_capacity(nshards);
        let mut workers = Vec::with_capacity(nshards);
        for i in 0..nshards {
            let (tx, rx) = bounded::<Msg>(inner.cfg.queue_capacity);
            let inner2 = inner.clone();
            let h = std::thread::Builder::new()
                .name(format!("kvindex-shard-{i}"))
                .spawn(move || {
                    while let Ok(msg) = rx.recv() {
                        match msg {
                            Msg::Batch { pod, model, seq, payload } => {
                                inner2.apply_batch(pod, model, seq, &payload);
                            }
                            Msg::Clear(pod) => inner2.clear_pod(pod),
                            Msg::Remove(pod) => inner2.remove_pod(pod),
                            Msg::Barrier(ack) => {
                                let _ = ack.send(());
                            }
                            Msg::Stop => break,
                        }
                    }
                })
                .map_err(|e| Error::invalid(format!("cannot start shard thread: {e}")))?;
            senders.push(tx);
            workers.push(h);
        }
        Ok(Indexer { inner, senders, workers: Mutex::new(workers), closed: AtomicBool::new(false) })
    }

    pub fn config(&self) -> &IndexerConfig {
        &self.inner.cfg
    }
    pub fn token_processor(&self) -> &TokenProcessor {
        &self.inner.tp
    }
    pub fn num_shards(&self) -> usize {
        self.senders.len()
    }

    fn shard_of(&self, pod: &str) -> usize {
        (fnv1a(pod.as_bytes()) % self.senders.len() as u64) as usize
    }

    fn send(&self, shard: usize, msg: Msg) -> Result<bool> {
        if self.closed.load(Relaxed) {
            return Err(Error::Closed);
        }
        match self.senders[shard].try_send(msg) {
            Ok(()) => Ok(true),
            Err(TrySendError::Full(msg)) => {
                self.inner.counters.add(C::queue_pushbacks, 1);
                self.senders[shard].send(msg).map_err(|_| Error::Closed)?;
                Ok(false)
            }
            Err(TrySendError::Disconnected(_)) => Err(Error::Closed),
        }
    }

    /// Queue one raw batch for `pod`. Returns false if the shard queue was full and the call
    /// had to wait.
    pub fn submit(&self, pod: &str, model: &str, seq: Option<u64>, payload: Vec<u8>) -> Result<bool> {
        let pod_id = self.inner.pod_id(pod)?;
        let model_id = self.inner.model_id(model);
        self.inner.counters.add(C::batches_queued, 1);
        self.send(self.shard_of(pod), Msg::Batch { pod: pod_id, model: model_id, seq, payload })
    }

    pub fn clear_pod(&self, pod: &str) -> Result<()> {
        if let Some(id) = self.inner.known_pod(pod) {
            self.send(self.shard_of(pod), Msg::Clear(id))?;
        }
        Ok(())
    }

    pub fn remove_pod(&self, pod: &str) -> Result<()> {
        if let Some(id) = self.inner.known_pod(pod) {
            self.send(self.shard_of(pod), Msg::Remove(id))?;
        }
        Ok(())
    }

    /// Wait until everything queued before this call is applied.
    pub fn flush(&self, timeout: Option<Duration>) -> bool {
        if self.closed.load(Relaxed) {
            return true;
        }
        let (tx, rx) = bounded::<()>(self.senders.len());
        for s in &self.senders {
            if s.send(Msg::Barrier(tx.clone())).is_err() {
                return true;
            }
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        for _ in 0..self.senders.len() {
            let ok = match deadline {
                Some(d) => rx.recv_deadline(d).is_ok(),
                None => rx.recv().is_ok(),
            };
            if !ok {
                return false;
            }
        }
        true
    }

    /// Decode and apply one batch on the caller's thread (still in per-pod order only if
    /// the caller does not also queue batches for the same pod).
    pub fn apply(&self, pod: &str, model: &str, seq: Option<u64>, payload: &[u8]) -> Result<ApplyResult> {
        let pod_id = self.inner.pod_id(pod)?;
        let model_id = self.inner.model_id(model);
        Ok(self.inner.apply_batch(pod_id, model_id, seq, payload))
    }

    pub fn add_blocks(&self, pod: &str, model: &str, keys: &[BlockKey], tier: &str) -> Result<()> {
        let t = self.inner.tier_id(tier)?;
        let p = self.inner.pod_id(pod)?;
        let m = self.inner.model_id(model);
        self.inner.note_model(p, m);
        for &k in keys {
            self.inner.index.add(m, p, k, t, None);
        }
        Ok(())
    }

    pub fn remove_blocks(&self, pod: &str, model: &str, keys: &[BlockKey], tier: &str) -> Result<()> {
        let t = self.inner.tier_id(tier)?;
        let (Some(p), Some(m)) = (self.inner.known_pod(pod), self.inner.models.read().get(model)) else {
            return Ok(());
        };
        for &k in keys {
            self.inner.index.remove(m, p, k, t);
        }
        Ok(())
    }

    fn filter_ids(&self, pods: Option<&[&str]>) -> Option<Vec<PodId>> {
        pods.map(|names| names.iter().filter_map(|n| self.inner.known_pod(n)).collect())
    }

    /// Score a request's tokens: `(result, full blocks in the prompt)`.
    pub fn score_tokens(
        &self,
        model: &str,
        tokens: &[u32],
        extras: &Extras<'_>,
        pods: Option<&[&str]>,
    ) -> (ScoreResult, usize) {
        let total = tokens.len() / self.inner.tp.block_size();
        let filter = self.filter_ids(pods);
        let Some(m) = self.inner.models.read().get(model) else {
            return (self.empty_result(filter.as_deref()), total);
        };
        let weights = *self.inner.weights.read();
        let (index, tp, f) = (&self.inner.index, &self.inner.tp, filter.as_deref());
        let res = match &self.inner.memo {
            Some(memo) => score_keys(index, m, memo.chain_iter(tp, tokens, extras).map(|c| c.key()), f, &weights),
            None => score_keys(index, m, tp.chain_iter(tokens, None, extras, 0).map(|c| c.key()), f, &weights),
        };
        (res, total)
    }

    pub fn score_keys(&self, model: &str, keys: &[BlockKey], pods: Option<&[&str]>) -> ScoreResult {
        let filter = self.filter_ids(pods);
        let Some(m) = self.inner.models.read().get(model) else {
            return self.empty_result(filter.as_deref());
        };
        let weights = *self.inner.weights.read();
        score_keys(&self.inner.index, m, keys.iter().copied(), filter.as_deref(), &weights)
    }

    fn empty_result(&self, filter: Option<&[PodId]>) -> ScoreResult {
        let weights = *self.inner.weights.read();
        score_keys(&self.inner.index, 0, std::iter::empty(), filter, &weights)
    }

    /// Per key, the (pod, tier) entries holding it.
    pub fn lookup(&self, model: &str, keys: &[BlockKey], pods: Option<&[&str]>) -> Vec<Vec<(Arc<str>, String)>> {
        let filter = self.filter_ids(pods);
        let m = self.inner.models.read().get(model);
        let mut buf = SmallVec::new();
        keys.iter()
            .map(|&k| {
                let Some(m) = m else { return Vec::new() };
                self.inner.index.lookup_into(m, k, &mut buf);
                buf.iter()
                    .filter(|&&e| filter.as_ref().is_none_or(|f| f.contains(&crate::index::entry_pod(e))))
                    .map(|&e| (self.pod_name(crate::index::entry_pod(e)), self.tier_name(crate::index::entry_tier(e))))
                    .collect()
            })
            .collect()
    }

    pub fn pod_name(&self, id: PodId) -> Arc<str> {
        self.inner.pods.read().0.names[id as usize].clone()
    }

    pub fn tier_name(&self, t: Tier) -> String {
        self.inner.tiers.read().get(t as usize).cloned().unwrap_or_else(|| format!("TIER{t}"))
    }

    pub fn tier_names(&self) -> Vec<String> {
        self.inner.tiers.read().clone()
    }

    pub fn pod_state(&self, pod: &str) -> Option<PodState> {
        let id = self.inner.known_pod(pod)?;
        let info = self.inner.pods.read().1[id as usize].clone();
        info.active.load(Relaxed).then(|| self.inner.state_of(id, &info))
    }

    pub fn pod_states(&self) -> Vec<PodState> {
        let infos: Vec<_> = self.inner.pods.read().1.iter().cloned().enumerate().collect();
        infos
            .into_iter()
            .filter(|(_, i)| i.active.load(Relaxed))
            .map(|(id, info)| self.inner.state_of(id as PodId, &info))
            .collect()
    }

    pub fn stats(&self) -> FullStats {
        let pods = self.inner.pods.read().1.iter().filter(|p| p.active.load(Relaxed)).count() as u64;
        FullStats { index: self.inner.index.stats(), pods, models: self.inner.models.read().names.len() as u64 }
    }

    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        COUNTER_NAMES.iter().zip(self.inner.counters.0.iter()).map(|(n, v)| (*n, v.load(Relaxed))).collect()
    }

    /// Apply what is queued, then stop the workers. Idempotent.
    pub fn close(&self) {
        if self.closed.swap(true, Relaxed) {
            return;
        }
        for s in &self.senders {
            let _ = s.send(Msg::Stop);
        }
        for h in self.workers.lock().drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Indexer {
    fn drop(&mut self) {
        self.close();
    }
}

impl Inner {
    fn pod_id(&self, pod: &str) -> Result<PodId> {
        if pod.is_empty() || pod.len() > 1024 {
            return Err(Error::invalid("pod id must be 1 to 1024 bytes"));
        }
        if let Some(id) = self.known_pod(pod) {
            let info = self.pods.read().1[id as usize].clone();
            info.active.store(true, Relaxed);
            return Ok(id);
        }
        let mut g = self.pods.write();
        if g.0.names.len() as u32 >= MAX_PODS {
            return Err(Error::invalid("too many pods"));
        }
        let id = g.0.intern(pod);
        if id as usize == g.1.len() {
            let name = g.0.names[id as usize].clone();
            g.1.push(Arc::new(PodInfo::new(name)));
        }
        Ok(id)
    }

    fn known_pod(&self, pod: &str) -> Option<PodId> {
        self.pods.read().0.get(pod)
    }

    fn info(&self, pod: PodId) -> Arc<PodInfo> {
        self.pods.read().1[pod as usize].clone()
    }

    fn model_id(&self, model: &str) -> ModelId {
        if let Some(id) = self.models.read().get(model) {
            return id;
        }
        self.models.write().intern(model)
    }

    fn note_model(&self, pod: PodId, model: ModelId) {
        let info = self.info(pod);
        let mut ms = info.models.lock();
        if !ms.contains(&model) {
            ms.push(model);
        }
    }

    fn tier_id(&self, name: &str) -> Result<Tier> {
        let upper = name.trim().to_ascii_uppercase();
        if upper.is_empty() {
            return Err(Error::invalid("tier name is empty"));
        }
        if let Some(i) = self.tiers.read().iter().position(|t| *t == upper) {
            return Ok(i as Tier);
        }
        let mut tiers = self.tiers.write();
        if let Some(i) = tiers.iter().position(|t| *t == upper) {
            return Ok(i as Tier);
        }
        if tiers.len() >= MAX_TIERS {
            return Err(Error::invalid(format!("too many tiers (at most {MAX_TIERS}): {upper}")));
        }
        let w = self
            .cfg
            .tier_weights
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(&upper))
            .map(|(_, w)| *w)
            .unwrap_or(self.cfg.default_weight);
        self.weights.write()[tiers.len()] = w;
        tiers.push(upper);
        Ok((tiers.len() - 1) as Tier)
    }

    fn medium_tier(&self, medium: &Option<String>) -> Result<Tier> {
        match medium {
            None => Ok(TIER_GPU),
            Some(m) => self.tier_id(m).map_err(|e| Error::decode(e.to_string())),
        }
    }

    fn clear_pod(&self, pod: PodId) {
        self.index.clear_pod(pod);
        // the pod still serves its models: `models` is kept (remove_pod resets it)
        self.info(pod).bridge.lock().clear();
        self.counters.add(C::pods_cleared, 1);
    }

    fn remove_pod(&self, pod: PodId) {
        self.clear_pod(pod);
        let info = self.info(pod);
        info.reset();
        info.active.store(false, Relaxed);
    }

    fn state_of(&self, id: PodId, info: &PodInfo) -> PodState {
        let counts = self.index.pod_tier_counts(id);
        let tiers = self.tiers.read().clone();
        let models = {
            let names = self.models.read();
            info.models.lock().iter().map(|&m| names.names[m as usize].clone()).collect()
        };
        let seq = info.last_seq.load(Relaxed);
        let ts = f64::from_bits(info.last_ts.load(Relaxed));
        let dp = info.dp_rank.load(Relaxed);
        PodState {
            pod: info.name.clone(),
            models,
            blocks_by_tier: tiers.into_iter().enumerate().map(|(i, t)| (t, counts[i])).collect(),
            last_seq: (seq != NONE_I64).then_some(seq as u64),
            last_event_ts: (!ts.is_nan()).then_some(ts),
            dp_rank: (dp != NONE_I64).then_some(dp),
            batches_applied: info.batches.load(Relaxed),
            events_applied: info.events.load(Relaxed),
            decode_errors: info.decode_errors.load(Relaxed),
            unknown_event_types: info.unknown_types.load(Relaxed),
            unknown_parents: info.unknown_parents.load(Relaxed),
            hash_matches: info.hash_matches.load(Relaxed),
            hash_mismatches: info.hash_mismatches.load(Relaxed),
            bridge_entries: info.bridge.lock().len() as u64,
        }
    }

    fn apply_batch(&self, pod: PodId, model: ModelId, seq: Option<u64>, payload: &[u8]) -> ApplyResult {
        let info = self.info(pod);
        if let Some(s) = seq {
            info.last_seq.store(s.min(i64::MAX as u64) as i64, Relaxed);
        }
        let mut res = ApplyResult::default();
        let batch = match decode_batch(payload) {
            Ok(b) => b,
            Err(_) => {
                self.counters.add(C::batch_decode_errors, 1);
                info.decode_errors.fetch_add(1, Relaxed);
                res.decode_errors = 1;
                return res;
            }
        };
        self.note_model(pod, model);
        if batch.trailing_bytes {
            self.counters.add(C::batches_with_trailing_bytes, 1);
        }
        res.dp_rank = batch.dp_rank;
        if let Some(r) = batch.dp_rank {
            info.dp_rank.store(r, Relaxed);
        }
        if batch.ts.is_finite() {
            info.last_ts.store(batch.ts.to_bits(), Relaxed);
        }
        for ev in batch.events {
            let outcome = match ev {
                Ok(Event::BlockStored(s)) => {
                    self.counters.add(C::events_block_stored, 1);
                    self.apply_stored(pod, model, &info, &s, &mut res)
                }
                Ok(Event::BlockRemoved(r)) => {
                    self.counters.add(C::events_block_removed, 1);
                    self.apply_removed(pod, model, &info, &r, &mut res)
                }
                Ok(Event::AllBlocksCleared) => {
                    self.counters.add(C::events_all_blocks_cleared, 1);
                    self.clear_pod(pod);
                    res.cleared += 1;
                    Ok(())
                }
                Ok(Event::Unknown(_)) => {
                    self.counters.add(C::events_unknown_type, 1);
                    info.unknown_types.fetch_add(1, Relaxed);
                    res.unknown_event_types += 1;
                    continue;
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => res.events += 1,
                Err(_) => {
                    self.counters.add(C::event_decode_errors, 1);
                    info.decode_errors.fetch_add(1, Relaxed);
                    res.decode_errors += 1;
                }
            }
        }
        info.batches.fetch_add(1, Relaxed);
        info.events.fetch_add(res.events, Relaxed);
        self.counters.add(C::batches_applied, 1);
        res
    }

    /// Our keys for an engine hash: through the bridge, else the hash itself when the index
    /// knows it as a key of this model. `None`: unknown.
    fn resolve(&self, model: ModelId, bridge: &Bridge, h: EngineHash) -> Option<SmallVec<[BlockKey; 2]>> {
        if let Some(keys) = bridge.get(&h) {
            return Some(keys.clone());
        }
        self.index.contains(model, h).then(|| SmallVec::from_slice(&[h]))
    }

    fn parent_chain(&self, model: ModelId, bridge: &Bridge, parent: Option<EngineHash>) -> Option<Chain> {
        let Some(p) = parent else { return Some(self.tp.root()) };
        let key = *self.resolve(model, bridge, p)?.last()?;
        if self.tp.algorithm().chains_on_digest() {
            self.index.digest_hi(model, key).map(|hi| Chain::from_parts(&hi, key))
        } else {
            Some(Chain::from_key(key))
        }
    }

    fn apply_stored(
        &self,
        pod: PodId,
        model: ModelId,
        info: &PodInfo,
        ev: &BlockStored,
        res: &mut ApplyResult,
    ) -> Result<()> {
        let tier = self.medium_tier(&ev.medium)?;
        let n = ev.block_hashes.len();
        let mut bridge = info.bridge.lock();
        if ev.token_ids.is_empty() {
            // a token-less copy (e.g. CPU offload): place the blocks we already know
            for &h in &ev.block_hashes {
                match self.resolve(model, &bridge, h) {
                    Some(keys) => {
                        for k in keys {
                            self.index.add(model, pod, k, tier, None);
                            res.stored_blocks += 1;
                        }
                    }
                    None => {
                        self.counters.add(C::unplaced_blocks, 1);
                        info.unknown_parents.fetch_add(1, Relaxed);
                        res.unknown_parents += 1;
                    }
                }
            }
            self.counters.add(C::blocks_stored, res.stored_blocks);
            return Ok(());
        }
        let bs = self.tp.block_size();
        let ebs = if ev.block_size > 0 {
            ev.block_size as usize
        } else if n > 0 && ev.token_ids.len().is_multiple_of(n) {
            ev.token_ids.len() / n
        } else {
            return Err(Error::decode("BlockStored without block_size"));
        };
        if ebs % bs != 0 {
            self.counters.add(C::block_size_mismatches, 1);
            return Err(Error::decode(format!("engine block size {ebs} is not a multiple of {bs}")));
        }
        if ev.token_ids.len() != n * ebs {
            return Err(Error::decode(format!(
                "BlockStored carries {} tokens for {n} blocks of {ebs}",
                ev.token_ids.len()
            )));
        }
        let ratio = ebs / bs;
        let Some(parent) = self.parent_chain(model, &bridge, ev.parent_block_hash) else {
            self.counters.add(C::unknown_parents, 1);
            self.counters.add(C::unplaced_blocks, (n * ratio) as u64);
            info.unknown_parents.fetch_add(1, Relaxed);
            res.unknown_parents += 1;
            return Ok(());
        };
        // extra keys: explicit per block (0.17+), else the LoRA name (0.14+) or id
        let expanded: Vec<Option<Vec<u8>>>;
        let lora_extra;
        let extras = match (&ev.extra_keys, &ev.lora_name, ev.lora_id) {
            (Some(per), _, _) if ratio == 1 => Extras::PerBlock(per),
            (Some(per), _, _) => {
                expanded = per.iter().flat_map(|e| std::iter::repeat_n(e.clone(), ratio)).collect();
                Extras::PerBlock(&expanded)
            }
            (None, Some(name), _) if !name.is_empty() => {
                lora_extra = {
                    let mut v = Vec::new();
                    cbor::head(&mut v, 4, 1);
                    cbor::text(&mut v, name);
                    v
                };
                Extras::Request { first: Some(lora_extra.clone()), rest: Some(lora_extra) }
            }
            (None, _, Some(id)) if id > 0 => {
                let mut v = Vec::new();
                cbor::head(&mut v, 4, 1);
                cbor::int(&mut v, id as i128);
                Extras::Request { first: Some(v.clone()), rest: Some(v) }
            }
            _ => Extras::None,
        };
        let keep = self.tp.algorithm().chains_on_digest();
        let mut keys: SmallVec<[BlockKey; 16]> = SmallVec::with_capacity(n * ratio);
        for chain in self.tp.chain_iter(&ev.token_ids, Some(parent), &extras, 0) {
            let k = chain.key();
            let hi = chain.hi();
            self.index.add(model, pod, k, tier, keep.then_some(&hi));
            keys.push(k);
        }
        res.stored_blocks += keys.len() as u64;
        self.counters.add(C::blocks_stored, keys.len() as u64);
        let (mut matches, mut mismatches) = (0u64, 0u64);
        for (j, &h) in ev.block_hashes.iter().enumerate() {
            let ours = &keys[j * ratio..(j + 1) * ratio];
            if ratio == 1 && ours[0] == h {
                matches += 1;
                bridge.remove(&h);
            } else {
                mismatches += 1;
                if bridge.len() < self.cfg.max_bridge_per_pod || bridge.contains_key(&h) {
                    bridge.insert(h, SmallVec::from_slice(ours));
                } else {
                    self.counters.add(C::bridge_full, 1);
                }
            }
        }
        info.hash_matches.fetch_add(matches, Relaxed);
        info.hash_mismatches.fetch_add(mismatches, Relaxed);
        self.counters.add(C::hash_matches, matches);
        self.counters.add(C::hash_mismatches, mismatches);
        Ok(())
    }

    fn apply_removed(
        &self,
        pod: PodId,
        model: ModelId,
        info: &PodInfo,
        ev: &BlockRemoved,
        res: &mut ApplyResult,
    ) -> Result<()> {
        let tier = self.medium_tier(&ev.medium)?;
        let mut bridge = info.bridge.lock();
        for &h in &ev.block_hashes {
            let bridged = bridge.get(&h).cloned();
            let keys = bridged.clone().unwrap_or_else(|| SmallVec::from_slice(&[h]));
            for &k in &keys {
                if self.index.remove(model, pod, k, tier) {
                    res.removed_blocks += 1;
                }
            }
            if bridged.is_some() && !keys.iter().any(|&k| self.index.holds(model, pod, k)) {
                bridge.remove(&h);
            }
        }
        self.counters.add(C::blocks_removed, res.removed_blocks);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored_array(hashes: &[u64], parent: Option<u64>, tokens: &[u32], medium: &str) -> Vec<u8> {
        // ["BlockStored", hashes, parent, tokens, 16, nil, medium]
        let mut b = vec![0x97, 0xab];
        b.extend_from_slice(b"BlockStored");
        b.push(0xdc);
        b.extend_from_slice(&(hashes.len() as u16).to_be_bytes());
        for h in hashes {
            b.push(0xcf);
            b.extend_from_slice(&h.to_be_bytes());
        }
        match parent {
            None => b.push(0xc0),
            Some(p) => {
                b.push(0xcf);
                b.extend_from_slice(&p.to_be_bytes());
            }
        }
        b.push(0xdc);
        b.extend_from_slice(&(tokens.len() as u16).to_be_bytes());
        for t in tokens {
            b.push(0xce);
            b.extend_from_slice(&t.to_be_bytes());
        }
        b.extend_from_slice(&[0x10, 0xc0, 0xa0 | medium.len() as u8]);
        b.extend_from_slice(medium.as_bytes());
        b
    }

    fn batch(events: &[Vec<u8>]) -> Vec<u8> {
        let mut b = vec![0x93, 0xcb];
        b.extend_from_slice(&1.0f64.to_be_bytes());
        b.push(0x90 | events.len() as u8);
        for e in events {
            b.extend_from_slice(e);
        }
        b.push(0x00);
        b
    }

    #[test]
    fn stored_blocks_chain_through_parents_and_score() {
        let ix = Indexer::new(IndexerConfig { shards: 1, ..Default::default() }).unwrap();
        let toks: Vec<u32> = (0..48).collect();
        let keys = ix.token_processor().block_keys(&toks, &Extras::None);
        let first = stored_array(&keys[..2], None, &toks[..32], "GPU");
        let r = ix.apply("p1", "m", Some(0), &batch(&[first])).unwrap();
        assert_eq!((r.events, r.stored_blocks), (1, 2));
        let second = stored_array(&keys[2..], Some(keys[1]), &toks[32..], "GPU");
        ix.apply("p1", "m", Some(1), &batch(&[second])).unwrap();
        let (res, total) = ix.score_tokens("m", &toks, &Extras::None, None);
        assert_eq!(total, 3);
        assert_eq!(res.scores[0].matched_blocks, 3);
        let st = ix.pod_state("p1").unwrap();
        assert_eq!((st.hash_matches, st.hash_mismatches, st.bridge_entries), (3, 0, 0));
        assert_eq!(st.last_seq, Some(1));
    }

    #[test]
    fn foreign_hashes_go_through_the_bridge() {
        let ix = Indexer::new(IndexerConfig { shards: 1, ..Default::default() }).unwrap();
        let toks: Vec<u32> = (0..32).collect();
        let ev = stored_array(&[111, 222], None, &toks, "GPU");
        ix.apply("p", "m", None, &batch(&[ev])).unwrap();
        let st = ix.pod_state("p").unwrap();
        assert_eq!((st.hash_mismatches, st.bridge_entries), (2, 2));
        // a child whose parent is the foreign hash 222
        let more: Vec<u32> = (32..48).collect();
        ix.apply("p", "m", None, &batch(&[stored_array(&[333], Some(222), &more, "GPU")])).unwrap();
        let all: Vec<u32> = (0..48).collect();
        assert_eq!(ix.score_tokens("m", &all, &Extras::None, None).0.scores[0].matched_blocks, 3);
        // an unknown parent is counted, never guessed
        let r = ix.apply("p", "m", None, &batch(&[stored_array(&[444], Some(999), &more, "GPU")])).unwrap();
        assert_eq!(r.unknown_parents, 1);
    }
}
