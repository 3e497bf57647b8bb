//! Block index: block key -> pod entries, bounded twice.
//!
//! * at most `max_keys` keys; when full, a key not read or re-added since CLOCK's hand last
//!   passed it is evicted (second chance: an approximation of LRU over keys);
//! * at most `max_pods_per_key` entries per key, least recently touched entry evicted first
//!   (LRU within a key).
//!
//! Keys live in shards chosen by key, each behind its own mutex, so scoring and event
//! application rarely meet on a lock. Each shard also keeps, per pod, the nodes of its keys it
//! holds, so clearing a pod costs O(blocks of that pod), never a scan of the whole index. The
//! shard layout (about 20 bytes per key plus 4 to 6 per entry) is in `index_shard.rs`.
//!
//! Models are separated by mixing the interned model id into the key: the same tokens under
//! two models never share an entry. An entry packs `(pod << 4) | tier` into a `u32`.

use std::hash::BuildHasher;

use parking_lot::Mutex;
use smallvec::SmallVec;

use crate::hashing::BlockKey;
use crate::snapshot::KeyCopy;

pub type PodId = u32;
pub type ModelId = u32;
pub type Tier = u8;

/// Tiers are interned into 4 bits (`tiers.rs`): GPU = 0, CPU = 1, then others as they appear.
pub const MAX_TIERS: usize = 16;
const TIER_BITS: u32 = 4;
pub const TIER_GPU: Tier = 0;
pub const TIER_CPU: Tier = 1;
/// Pod ids an entry can hold (28 bits; the highest is kept free so that no packed entry is
/// `u32::MAX`, which the shard layout uses as a sentinel).
pub const MAX_PODS: u32 = (1 << (32 - TIER_BITS)) - 1;

#[inline]
pub fn pack(pod: PodId, tier: Tier) -> u32 {
    (pod << TIER_BITS) | tier as u32
}
#[inline]
pub fn entry_pod(e: u32) -> PodId {
    e >> TIER_BITS
}
#[inline]
pub fn entry_tier(e: u32) -> Tier {
    (e & (MAX_TIERS as u32 - 1)) as Tier
}

#[inline]
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The index-internal key of `key` under `model`.
#[inline]
pub fn model_key(model: ModelId, key: BlockKey) -> u64 {
    key ^ splitmix64(model as u64 ^ 0x6b76_696e_6465_7821)
}

/// A key's packed entries, least recently touched first.
pub type Entries = SmallVec<[u32; 4]>;

#[path = "index_chunked.rs"]
mod chunked;
#[path = "index_shard.rs"]
mod shard;
use shard::{Shard, MAX_SHARD_KEYS};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    pub keys: u64,
    pub entries: u64,
    pub key_evictions: u64,
    pub entry_evictions: u64,
    pub bytes_used: u64,
    pub max_keys: u64,
    pub max_pods_per_key: u64,
}

pub struct BlockIndex {
    shards: Box<[Mutex<Shard>]>,
    max_keys: usize,
    max_per_key: usize,
    keep_digest: bool,
}

impl BlockIndex {
    /// `keep_digest`: keep the first 24 bytes of each key's digest so a chain can be extended
    /// from a parent known only by its key (needed by `sha256_cbor`).
    pub fn new(max_keys: usize, max_per_key: usize, shards: usize, keep_digest: bool) -> Self {
        const MOST_SHARDS: usize = 4096;
        let max_keys = max_keys.clamp(1, MOST_SHARDS * MAX_SHARD_KEYS);
        // a power of two, so picking a shard is a mask, not a division; small indexes get
        // fewer shards so that each keeps a useful LRU of its own, huge ones more so that no
        // shard outgrows its 24-bit node indices
        let mut n = shards.clamp(1, MOST_SHARDS).next_power_of_two();
        while n > 1 && max_keys / n < 4096 {
            n /= 2;
        }
        while max_keys.div_ceil(n) > MAX_SHARD_KEYS {
            n *= 2;
        }
        // the shard capacities add up to exactly max_keys; the table hash is seeded per index
        let (per, extra) = (max_keys / n, max_keys % n);
        let seed = std::collections::hash_map::RandomState::new().hash_one(0x6b76_696e_6465_7831u64);
        BlockIndex {
            shards: (0..n).map(|i| Mutex::new(Shard::new(per + usize::from(i < extra), seed))).collect(),
            max_keys,
            max_per_key: max_per_key.clamp(1, 1 << 16),
            keep_digest,
        }
    }

    #[inline]
    fn shard(&self, ikey: u64) -> &Mutex<Shard> {
        let h = (ikey.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize;
        &self.shards[h & (self.shards.len() - 1)]
    }

    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    pub fn add(&self, model: ModelId, pod: PodId, key: BlockKey, tier: Tier, digest: Option<&[u8; 24]>) {
        let ik = model_key(model, key);
        let mut s = self.shard(ik).lock();
        let i = s.add(ik, pod, tier, digest, self.max_per_key, self.keep_digest);
        s.set_model(i, model);
    }

    pub fn remove(&self, model: ModelId, pod: PodId, key: BlockKey, tier: Tier) -> bool {
        let ik = model_key(model, key);
        self.shard(ik).lock().remove(ik, pod, tier)
    }

    /// Whether any pod holds `key` under `model`.
    pub fn contains(&self, model: ModelId, key: BlockKey) -> bool {
        let ik = model_key(model, key);
        self.shard(ik).lock().find(ik).is_some()
    }

    /// Whether `pod` holds `key` in any tier.
    pub fn holds(&self, model: ModelId, pod: PodId, key: BlockKey) -> bool {
        let ik = model_key(model, key);
        let s = self.shard(ik).lock();
        s.find(ik).is_some_and(|i| s.entries(i).iter().any(|&e| entry_pod(e) == pod))
    }

    /// First 24 digest bytes of `key`, when the index holds the key and its digest.
    pub fn digest_hi(&self, model: ModelId, key: BlockKey) -> Option<[u8; 24]> {
        let ik = model_key(model, key);
        let s = self.shard(ik).lock();
        s.digest(s.find(ik)?)
    }

    /// Copy the entries of `key` into `out` (cleared first) and mark the key referenced
    /// (it survives the next eviction pass). Returns false when the key is absent.
    #[inline]
    pub fn lookup_into(&self, model: ModelId, key: BlockKey, out: &mut SmallVec<[u32; 16]>) -> bool {
        out.clear();
        let ik = model_key(model, key);
        let mut s = self.shard(ik).lock();
        let Some(i) = s.find(ik) else { return false };
        out.extend_from_slice(s.entries(i));
        s.set_ref(i, true);
        true
    }

    /// Drop every entry of `pod` (all tiers, all models). Returns the entries removed.
    pub fn clear_pod(&self, pod: PodId) -> u64 {
        self.shards.iter().map(|s| s.lock().clear_pod(pod)).sum()
    }

    /// Entries per tier held by `pod`.
    pub fn pod_tier_counts(&self, pod: PodId) -> [i64; MAX_TIERS] {
        let mut out = [0i64; MAX_TIERS];
        for s in self.shards.iter() {
            if let Some(t) = s.lock().pod_tiers(pod) {
                for (o, v) in out.iter_mut().zip(t) {
                    *o += v;
                }
            }
        }
        out
    }

    /// Entries per tier in the whole index (locks every shard in turn; O(pods per shard)).
    pub fn tier_counts(&self) -> [i64; MAX_TIERS] {
        let mut out = [0i64; MAX_TIERS];
        for s in self.shards.iter() {
            for t in s.lock().all_pod_tiers() {
                for (o, v) in out.iter_mut().zip(t) {
                    *o += v;
                }
            }
        }
        out
    }

    /// Append shard `i`'s keys to `out`, next to be evicted first (one shard lock held).
    pub fn copy_shard(&self, i: usize, out: &mut Vec<KeyCopy>) {
        let s = self.shards[i].lock();
        out.reserve(s.live);
        for n in s.clock_order() {
            out.push(KeyCopy {
                ikey: s.ikey(n),
                model: s.model(n),
                referenced: s.is_ref(n),
                digest: s.digest(n),
                entries: Entries::from_slice(s.entries(n)),
            });
        }
    }

    /// Re-create a key as a snapshot recorded it: `entries` oldest first; the key is the last
    /// to be evicted of those restored so far (restore keys in `copy_shard` order).
    pub fn restore(&self, model: ModelId, key: BlockKey, digest: Option<&[u8; 24]>, entries: &[u32], referenced: bool) {
        let ik = model_key(model, key);
        let mut s = self.shard(ik).lock();
        for &e in entries {
            let i = s.add(ik, entry_pod(e), entry_tier(e), digest, self.max_per_key, self.keep_digest);
            s.set_model(i, model);
            s.set_ref(i, referenced);
        }
    }

    pub fn stats(&self) -> IndexStats {
        let mut st = IndexStats {
            max_keys: self.max_keys as u64,
            max_pods_per_key: self.max_per_key as u64,
            ..Default::default()
        };
        for s in self.shards.iter() {
            let s = s.lock();
            st.keys += s.live as u64;
            st.entries += s.entries;
            st.key_evictions += s.key_evictions;
            st.entry_evictions += s.entry_evictions;
            st.bytes_used += s.bytes_used() as u64;
        }
        st
    }

    /// Check every shard's invariants (tests).
    #[cfg(test)]
    pub(crate) fn check(&self) {
        for s in self.shards.iter() {
            s.lock().check();
        }
    }
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
