//! The engine-hash -> key bridge. Each pod's `BlockStored` events carry the engine's block
//! hashes; we compute our own keys from the tokens. When the two agree (same algorithm, seed
//! and block size) nothing is stored; when they differ the bridge maps each engine hash to
//! our key(s) (several when the engine's block is a multiple of ours), so later
//! `BlockRemoved`, token-less stores and child blocks naming that hash as parent still land
//! on the right keys. It is bounded per pod (`max_bridge_per_pod`, overflow counted).

use smallvec::SmallVec;

use crate::events::EngineHash;
use crate::hashing::{BlockKey, Chain, TokenProcessor};
use crate::index::{BlockIndex, ModelId, PodId, Tier};

/// Our keys for one engine block (usually one).
pub type Keys = SmallVec<[BlockKey; 2]>;

pub type Bridge = hashbrown::HashMap<EngineHash, Keys>;

/// Our keys for an engine hash: through the bridge, else the hash itself when the index
/// knows it as a key of this model. `None`: unknown.
pub fn resolve(index: &BlockIndex, model: ModelId, bridge: &Bridge, h: EngineHash) -> Option<Keys> {
    if let Some(keys) = bridge.get(&h) {
        return Some(keys.clone());
    }
    index.contains(model, h).then(|| SmallVec::from_slice(&[h]))
}

/// The chain value to continue from after the engine block `parent` (`None`: a chain root).
/// `None` when the parent is unknown: the caller counts it and never guesses.
pub fn parent_chain(
    index: &BlockIndex,
    tp: &TokenProcessor,
    model: ModelId,
    bridge: &Bridge,
    parent: Option<EngineHash>,
) -> Option<Chain> {
    let Some(p) = parent else { return Some(tp.root()) };
    let key = *resolve(index, model, bridge, p)?.last()?;
    if tp.algorithm().chains_on_digest() {
        index.digest_hi(model, key).map(|hi| Chain::from_parts(&hi, key))
    } else {
        Some(Chain::from_key(key))
    }
}

/// What `record` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Engine hashes equal to our key (no entry kept).
    pub matches: u64,
    /// Engine hashes that differ (an entry kept, unless the bridge was full).
    pub mismatches: u64,
    /// Mismatches dropped because the bridge was at `cap`.
    pub full: u64,
}

/// After a store: compare each engine hash with our keys (`ratio` of ours per engine block)
/// and keep the mapping for those that differ.
pub fn record(bridge: &mut Bridge, hashes: &[EngineHash], keys: &[BlockKey], ratio: usize, cap: usize) -> Recorded {
    let mut r = Recorded::default();
    for (j, &h) in hashes.iter().enumerate() {
        let ours = &keys[j * ratio..(j + 1) * ratio];
        if ratio == 1 && ours[0] == h {
            r.matches += 1;
            bridge.remove(&h);
        } else {
            r.mismatches += 1;
            if bridge.len() < cap || bridge.contains_key(&h) {
                bridge.insert(h, SmallVec::from_slice(ours));
            } else {
                r.full += 1;
            }
        }
    }
    r
}

/// Remove the `tier` copy of the engine block `h` from `pod`; returns the index entries
/// removed. A bridge entry goes once the pod holds none of its keys in any tier.
pub fn remove(index: &BlockIndex, model: ModelId, pod: PodId, tier: Tier, bridge: &mut Bridge, h: EngineHash) -> u64 {
    let bridged = bridge.get(&h).cloned();
    let bridged_some = bridged.is_some();
    let keys = bridged.unwrap_or_else(|| SmallVec::from_slice(&[h]));
    let mut removed = 0;
    for &k in &keys {
        if index.remove(model, pod, k, tier) {
            removed += 1;
        }
    }
    if bridged_some && !keys.iter().any(|&k| index.holds(model, pod, k)) {
        bridge.remove(&h);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::Extras;
    use crate::index::{TIER_CPU, TIER_GPU};
    use crate::testutil::{batch, removed, stored, tokens};
    use crate::{Indexer, IndexerConfig};

    fn indexer(max_bridge_per_pod: usize) -> Indexer {
        Indexer::new(IndexerConfig { shards: 1, max_bridge_per_pod, ..Default::default() }).unwrap()
    }

    fn matched(ix: &Indexer, pod: &str, toks: &[u32]) -> u32 {
        let r = ix.score_tokens("m", toks, &Extras::None, None);
        r.scores.iter().find(|s| &*s.pod == pod).map_or(0, |s| s.matched_blocks)
    }

    #[test]
    fn record_keeps_only_mismatches_and_respects_the_cap() {
        let mut b = Bridge::default();
        let r = record(&mut b, &[1, 2, 3], &[1, 20, 30], 1, 1);
        assert_eq!(r, Recorded { matches: 1, mismatches: 2, full: 1 });
        assert_eq!(b.len(), 1);
        assert_eq!(b[&2].as_slice(), &[20]);
        // an existing entry is updated even when full; a later match drops it
        record(&mut b, &[2], &[21], 1, 1);
        assert_eq!(b[&2].as_slice(), &[21]);
        record(&mut b, &[2], &[2], 1, 1);
        assert!(b.is_empty());
        // engine blocks of two of ours: always bridged
        let r = record(&mut b, &[9], &[90, 91], 2, 10);
        assert_eq!((r.mismatches, b[&9].as_slice()), (1, &[90, 91][..]));
    }

    #[test]
    fn foreign_hashes_place_children_and_removals() {
        let ix = indexer(100);
        let t = tokens(48);
        ix.apply("p", "m", None, &batch(&[stored(&[111, 222], None, &t[..32], Some("GPU"))])).unwrap();
        let st = ix.pod_state("p").unwrap();
        assert_eq!((st.hash_matches, st.hash_mismatches, st.bridge_entries), (0, 2, 2));
        assert_eq!(st.hashes_match(), Some(false));
        // a child whose parent is the foreign hash 222 chains on our key for it
        ix.apply("p", "m", None, &batch(&[stored(&[333], Some(222), &t[32..], Some("GPU"))])).unwrap();
        assert_eq!(matched(&ix, "p", &t), 3);
        // removal by foreign hash reaches our key, and the entry goes with it
        let r = ix.apply("p", "m", None, &batch(&[removed(&[222], Some("GPU"))])).unwrap();
        assert_eq!(r.removed_blocks, 1);
        assert_eq!(matched(&ix, "p", &t), 1);
        assert_eq!(ix.pod_state("p").unwrap().bridge_entries, 2);
    }

    #[test]
    fn matching_hashes_cost_no_bridge_memory() {
        let ix = indexer(100);
        let t = tokens(32);
        let keys = ix.token_processor().block_keys(&t, &Extras::None);
        ix.apply("p", "m", None, &batch(&[stored(&keys, None, &t, None)])).unwrap();
        let st = ix.pod_state("p").unwrap();
        assert_eq!((st.hash_matches, st.bridge_entries, st.hashes_match()), (2, 0, Some(true)));
        ix.apply("p", "m", None, &batch(&[removed(&keys[1..], None)])).unwrap();
        assert_eq!(matched(&ix, "p", &t), 1);
    }

    #[test]
    fn a_bridged_entry_survives_while_another_tier_holds_the_key() {
        let ix = indexer(100);
        let t = tokens(16);
        ix.apply("p", "m", None, &batch(&[stored(&[7], None, &t, Some("GPU"))])).unwrap();
        ix.apply("p", "m", None, &batch(&[stored(&[7], None, &[], Some("CPU"))])).unwrap();
        ix.apply("p", "m", None, &batch(&[removed(&[7], Some("GPU"))])).unwrap();
        let st = ix.pod_state("p").unwrap();
        assert_eq!(st.bridge_entries, 1);
        assert_eq!(st.blocks_by_tier[TIER_GPU as usize].1, 0);
        assert_eq!(st.blocks_by_tier[TIER_CPU as usize].1, 1);
        ix.apply("p", "m", None, &batch(&[removed(&[7], Some("CPU"))])).unwrap();
        assert_eq!(ix.pod_state("p").unwrap().bridge_entries, 0);
    }

    #[test]
    fn a_full_bridge_is_counted_and_its_blocks_stay_unresolvable() {
        let ix = indexer(1);
        let t = tokens(32);
        ix.apply("p", "m", None, &batch(&[stored(&[1, 2], None, &t, None)])).unwrap();
        let counters: std::collections::HashMap<_, _> = ix.counters().into_iter().collect();
        assert_eq!(counters["bridge_full"], 1);
        assert_eq!(counters["hash_mismatches"], 2);
        assert_eq!(ix.pod_state("p").unwrap().bridge_entries, 1);
        // both blocks are indexed under our keys; the unbridged one cannot be removed by hash
        assert_eq!(matched(&ix, "p", &t), 2);
        let r = ix.apply("p", "m", None, &batch(&[removed(&[2], None)])).unwrap();
        assert_eq!(r.removed_blocks, 0);
        // and its child is an unknown parent
        let child = stored(&[3], Some(2), &tokens(48)[32..], None);
        assert_eq!(ix.apply("p", "m", None, &batch(&[child])).unwrap().unknown_parents, 1);
    }
}
