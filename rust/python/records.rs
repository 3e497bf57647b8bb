//! The core's share of a shared (Redis / Valkey) index: decode a batch into index records
//! keyed by kvindex's own block keys, and score entries fetched from elsewhere with the
//! core's prefix and ranking rules. The storage itself lives in Python
//! (`kvindex_service.backends`); nothing here knows Redis.

use std::collections::HashMap;

use parking_lot::Mutex;
use pyo3::prelude::*;
use smallvec::SmallVec;

use super::errors::invalid;
use super::results::{score_result, PyScoreResult};
use crate::apply::stored_extras;
use crate::config;
use crate::events::{decode_batch, BlockStored, EngineHash, Event};
use crate::hashing::{Algorithm, BlockKey, Chain, TokenProcessor};
use crate::index::{BlockIndex, Tier, MAX_TIERS, TIER_CPU, TIER_GPU};

// the scratch index names tiers GPU, CPU first, like the core's tier table
const _: () = assert!(TIER_GPU == 0 && TIER_CPU == 1);
use crate::groups::GroupView;
use crate::scoring::{prefix_runs, rank, Ctx, ScoreResult};
use crate::tiers::normalize;

/// (op, tier, keys): op is "store", "remove" or "clear" (tier "" and no keys).
type Record = (&'static str, String, Vec<BlockKey>);

#[derive(Clone)]
struct Known {
    chain: Chain,
    keys: SmallVec<[BlockKey; 2]>,
}

/// Engine hash -> our chain value and keys, in two generations: when the young one is
/// full it becomes the old one (the previous old one is dropped), so memory stays bounded
/// and recently stored blocks stay resolvable.
#[derive(Default)]
struct Known2 {
    young: hashbrown::HashMap<(u64, EngineHash), Known>,
    old: hashbrown::HashMap<(u64, EngineHash), Known>,
}

impl Known2 {
    fn get(&self, k: &(u64, EngineHash)) -> Option<&Known> {
        self.young.get(k).or_else(|| self.old.get(k))
    }
    fn put(&mut self, k: (u64, EngineHash), v: Known, cap: usize) {
        if self.young.len() >= cap.div_ceil(2) {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(k, v);
    }
    fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

#[derive(Default)]
struct Counts {
    events: u64,
    unknown_parents: u64,
    decode_errors: u64,
    unknown_event_types: u64,
}

fn tier_of(medium: Option<&str>) -> Option<String> {
    match medium {
        None => Some("GPU".to_owned()),
        Some(m) => normalize(m).ok(),
    }
}

#[pyclass(name = "RecordDecoder", module = "kvindex_service._native", frozen)]
pub(super) struct PyRecordDecoder {
    tp: TokenProcessor,
    cap: usize,
    known: Mutex<Known2>,
}

impl PyRecordDecoder {
    fn stored(&self, mh: u64, ev: &BlockStored, c: &mut Counts, out: &mut Vec<Record>) -> bool {
        let Some(tier) = tier_of(ev.medium.as_deref()) else { return false };
        let n = ev.block_hashes.len();
        let mut known = self.known.lock();
        if ev.token_ids.is_empty() {
            let mut keys = Vec::with_capacity(n);
            for &h in &ev.block_hashes {
                match known.get(&(mh, h)) {
                    Some(k) => keys.extend_from_slice(&k.keys),
                    None => c.unknown_parents += 1,
                }
            }
            out.push(("store", tier, keys));
            return true;
        }
        let bs = self.tp.block_size();
        let Some(ebs) = ev.engine_block_size() else {
            return false;
        };
        if ebs % bs != 0 || ev.token_ids.len() != n * ebs {
            return false;
        }
        let ratio = ebs / bs;
        let parent = match ev.parent_block_hash {
            None => Some(self.tp.root()),
            Some(p) => known.get(&(mh, p)).map(|k| k.chain).or_else(|| (p == 0).then(|| self.tp.root())),
        };
        let Some(parent) = parent else {
            c.unknown_parents += 1;
            return true;
        };
        let mut expanded = Vec::new();
        let extras = stored_extras(ev, ratio, &mut expanded);
        let chains: Vec<Chain> = self.tp.chain_iter(&ev.token_ids, Some(parent), &extras, 0).collect();
        for (j, &h) in ev.block_hashes.iter().enumerate() {
            let part = &chains[j * ratio..(j + 1) * ratio];
            let keys = part.iter().map(Chain::key).collect();
            known.put((mh, h), Known { chain: part[ratio - 1], keys }, self.cap);
        }
        out.push(("store", tier, chains.iter().map(Chain::key).collect()));
        true
    }
}

#[pymethods]
impl PyRecordDecoder {
    #[new]
    #[pyo3(signature = (*, block_size = 16, hash_seed = None, algorithm = "sha256_cbor", max_known = 1_000_000))]
    fn new(block_size: usize, hash_seed: Option<&str>, algorithm: &str, max_known: usize) -> PyResult<Self> {
        let tp = TokenProcessor::new(block_size, hash_seed, Algorithm::parse(algorithm)?)?;
        Ok(PyRecordDecoder { tp, cap: max_known.max(2), known: Mutex::new(Known2::default()) })
    }

    /// Engine hashes remembered (to resolve parents, removals and token-less stores).
    #[getter]
    fn known(&self) -> usize {
        self.known.lock().len()
    }

    /// One msgpack batch of `model` -> (records, counts). Never raises for bad payloads.
    fn decode(&self, py: Python<'_>, model: &str, payload: &[u8]) -> (Vec<Record>, HashMap<&'static str, u64>) {
        let mh = xxhash_rust::xxh3::xxh3_64(model.as_bytes());
        let (out, c) = py.detach(|| {
            let mut out = Vec::new();
            let mut c = Counts::default();
            let Ok(batch) = decode_batch(payload) else {
                c.decode_errors = 1;
                return (out, c);
            };
            for ev in batch.events {
                let ok = match ev {
                    Ok(Event::BlockStored(s)) => self.stored(mh, &s, &mut c, &mut out),
                    Ok(Event::BlockRemoved(r)) => match tier_of(r.medium.as_deref()) {
                        None => false,
                        Some(tier) => {
                            let known = self.known.lock();
                            let mut keys = Vec::with_capacity(r.block_hashes.len());
                            for h in r.block_hashes {
                                match known.get(&(mh, h)) {
                                    Some(k) => keys.extend_from_slice(&k.keys),
                                    None => keys.push(h),
                                }
                            }
                            out.push(("remove", tier, keys));
                            true
                        }
                    },
                    Ok(Event::AllBlocksCleared) => {
                        out.push(("clear", String::new(), Vec::new()));
                        true
                    }
                    Ok(Event::Unknown(_)) => {
                        c.unknown_event_types += 1;
                        continue;
                    }
                    Err(_) => false,
                };
                if ok {
                    c.events += 1;
                } else {
                    c.decode_errors += 1;
                }
            }
            (out, c)
        });
        let counts = HashMap::from([
            ("events", c.events),
            ("unknown_parents", c.unknown_parents),
            ("decode_errors", c.decode_errors),
            ("unknown_event_types", c.unknown_event_types),
        ]);
        (out, counts)
    }
}

/// The core's prefix runs and ranking over entries gathered elsewhere: `entries` yields,
/// per key in block order, its (pod, tier) pairs.
fn score_gathered<'a, E, I>(entries: E, n: usize, cfg: Gathered<'_>) -> ScoreResult
where
    E: Iterator<Item = I>,
    I: Iterator<Item = (&'a str, &'a str)>,
{
    let mut names: Vec<&str> = Vec::new();
    let mut ids: HashMap<&str, u32> = HashMap::new();
    let mut tiers: Vec<String> = vec!["GPU".into(), "CPU".into()];
    let index = BlockIndex::new(n.max(1), 1 << 16, 1, false);
    for (i, per) in entries.enumerate() {
        for (pod, tier) in per {
            let t = match tiers.iter().position(|x| x == tier) {
                Some(t) => t as Tier,
                None if tiers.len() < MAX_TIERS => {
                    tiers.push(tier.to_owned());
                    (tiers.len() - 1) as Tier
                }
                None => continue,
            };
            let next = names.len() as u32;
            let id = *ids.entry(pod).or_insert_with(|| {
                names.push(pod);
                next
            });
            index.add(0, id, i as BlockKey, t, None);
        }
    }
    let (weighted, default_weight) = cfg.weights;
    let mut weights = [*default_weight; MAX_TIERS];
    for (t, name) in tiers.iter().enumerate() {
        weights[t] = weighted.iter().find(|(x, _)| x == name).map_or(*default_weight, |(_, w)| *w);
    }
    let filter: Option<Vec<u32>> = cfg.pods.map(|p| p.iter().filter_map(|x| ids.get(x.as_str()).copied()).collect());
    // entries from a shared backend carry no group specs: every slot is scored as a plain tier
    let groups = GroupView::default();
    let ctx = Ctx { weights: &weights, slot_group: &[0; MAX_TIERS], groups: &groups };
    let runs = prefix_runs(&index, 0, 0..n as BlockKey, filter.as_deref(), &ctx);
    let cands: Option<Vec<&str>> = cfg.pods.map(|p| p.iter().map(String::as_str).collect());
    let scores = rank(runs.runs, cands.as_deref(), |id| names[id as usize].into(), &tiers, cfg.block_size);
    ScoreResult {
        scores,
        total_blocks: cfg.total_blocks,
        total_tokens: cfg.total_tokens,
        keys_computed: runs.keys_consumed,
    }
}

struct Gathered<'a> {
    block_size: usize,
    total_blocks: usize,
    total_tokens: usize,
    weights: &'a (Vec<(String, f64)>, f64),
    pods: Option<&'a [String]>,
}

fn gathered_cfg(block_size: usize, tier_weights: Option<HashMap<String, f64>>) -> PyResult<(Vec<(String, f64)>, f64)> {
    if block_size == 0 {
        return Err(invalid("block_size must be at least 1".into()));
    }
    Ok(config::tier_weights(tier_weights.unwrap_or_default().into_iter().collect())?)
}

/// Score per-key entries `[(pod, tier), ...]` (key order = block order) with the core's
/// rules: the same prefix runs, tier weights, candidate listing and order as `Indexer.score`.
#[pyfunction]
#[pyo3(signature = (entries, *, block_size, total_blocks, total_tokens, tier_weights = None, pods = None))]
pub(super) fn score_entries(
    py: Python<'_>,
    entries: Vec<Vec<(String, String)>>,
    block_size: usize,
    total_blocks: usize,
    total_tokens: usize,
    tier_weights: Option<HashMap<String, f64>>,
    pods: Option<Vec<String>>,
) -> PyResult<PyScoreResult> {
    let weights = gathered_cfg(block_size, tier_weights)?;
    let cfg = Gathered { block_size, total_blocks, total_tokens, weights: &weights, pods: pods.as_deref() };
    let n = entries.len();
    let r = py
        .detach(|| score_gathered(entries.iter().map(|per| per.iter().map(|(p, t)| (p.as_str(), t.as_str()))), n, cfg));
    score_result(py, r)
}

/// `score_entries` over the packed form a Redis script returns: per key one byte string of
/// `pod 0x1f tier` items joined by 0x1e (parsed here, so Python touches one object per key).
#[pyfunction]
#[pyo3(signature = (packed, *, block_size, total_blocks, total_tokens, tier_weights = None, pods = None))]
#[allow(clippy::too_many_arguments)]
pub(super) fn score_packed(
    py: Python<'_>,
    packed: Vec<Vec<u8>>,
    block_size: usize,
    total_blocks: usize,
    total_tokens: usize,
    tier_weights: Option<HashMap<String, f64>>,
    pods: Option<Vec<String>>,
) -> PyResult<PyScoreResult> {
    let weights = gathered_cfg(block_size, tier_weights)?;
    let cfg = Gathered { block_size, total_blocks, total_tokens, weights: &weights, pods: pods.as_deref() };
    let n = packed.len();
    let r = py.detach(|| {
        let per_key = packed.iter().map(|raw| {
            raw.split(|&b| b == 0x1e).filter(|item| !item.is_empty()).filter_map(|item| {
                let cut = item.iter().rposition(|&b| b == 0x1f)?;
                let pod = std::str::from_utf8(&item[..cut]).ok()?;
                let tier = std::str::from_utf8(&item[cut + 1..]).ok()?;
                Some((pod, tier))
            })
        });
        score_gathered(per_key, n, cfg)
    });
    score_result(py, r)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRecordDecoder>()?;
    m.add_function(wrap_pyfunction!(score_entries, m)?)?;
    m.add_function(wrap_pyfunction!(score_packed, m)?)?;
    Ok(())
}
