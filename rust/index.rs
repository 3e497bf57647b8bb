//! Block index: block key -> pod entries, a bounded two-level LRU.
//!
//! * at most `max_keys` keys, least recently used key evicted first (LRU over keys);
//! * at most `max_pods_per_key` entries per key, least recently touched entry evicted first
//!   (LRU within a key).
//!
//! Keys live in shards chosen by key, each behind its own mutex, so scoring and event
//! application rarely meet on a lock. Each shard also keeps, per pod, the set of its keys it
//! holds, so clearing a pod costs O(blocks of that pod), never a scan of the whole index.
//!
//! Models are separated by mixing the interned model id into the key: the same tokens under
//! two models never share an entry. An entry packs `(pod << 4) | tier` into a `u32`.

use hashbrown::{HashMap, HashSet};
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
/// Pod ids an entry can hold (28 bits).
pub const MAX_PODS: u32 = 1 << (32 - TIER_BITS);

const NIL: u32 = u32::MAX;

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

pub type Entries = SmallVec<[u32; 4]>;

struct Node {
    ikey: u64,
    /// The model `ikey` was mixed with (fits in the padding; snapshots need it back).
    model: ModelId,
    prev: u32,
    next: u32,
    entries: Entries,
    /// Set by lookups; eviction gives such a key a second chance instead of evicting it.
    /// Reads thus never relink the list (no extra cache misses on the scoring path), and a
    /// key read since it reached the tail is kept, which is LRU order up to that lag.
    referenced: bool,
}

#[derive(Default)]
struct Shard {
    map: HashMap<u64, u32>,
    nodes: Vec<Node>,
    /// First 24 digest bytes per node (only for algorithms that chain on digests); all zero
    /// means "unknown".
    digests: Vec<[u8; 24]>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
    cap: usize,
    /// Per pod: the keys of this shard it holds (for clearing) and its entries per tier.
    pods: HashMap<PodId, PodShard>,
    entries: u64,
    key_evictions: u64,
    entry_evictions: u64,
    spilled_bytes: i64,
}

#[derive(Default)]
struct PodShard {
    keys: HashSet<u64>,
    tiers: [i64; MAX_TIERS],
}

#[inline]
fn heap_bytes(e: &Entries) -> i64 {
    if e.spilled() {
        (e.capacity() * 4) as i64
    } else {
        0
    }
}

impl Shard {
    fn new(cap: usize) -> Self {
        Shard { head: NIL, tail: NIL, cap: cap.max(1), ..Default::default() }
    }

    fn unlink(&mut self, i: u32) {
        let (p, n) = {
            let node = &self.nodes[i as usize];
            (node.prev, node.next)
        };
        if p != NIL {
            self.nodes[p as usize].next = n;
        } else {
            self.head = n;
        }
        if n != NIL {
            self.nodes[n as usize].prev = p;
        } else {
            self.tail = p;
        }
    }

    fn push_front(&mut self, i: u32) {
        let h = self.head;
        {
            let node = &mut self.nodes[i as usize];
            node.prev = NIL;
            node.next = h;
        }
        if h != NIL {
            self.nodes[h as usize].prev = i;
        } else {
            self.tail = i;
        }
        self.head = i;
    }

    fn touch(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    fn count(&mut self, pod: PodId, tier: Tier, delta: i64) {
        self.pods.entry(pod).or_default().tiers[tier as usize] += delta;
        self.entries = (self.entries as i64 + delta) as u64;
    }

    /// Forget that `pod` holds `ikey` if no entry of it is left on the node.
    fn drop_pod_key_if_gone(&mut self, i: u32, pod: PodId) {
        let ikey = self.nodes[i as usize].ikey;
        if !self.nodes[i as usize].entries.iter().any(|&e| entry_pod(e) == pod) {
            if let Some(ps) = self.pods.get_mut(&pod) {
                ps.keys.remove(&ikey);
            }
        }
    }

    fn free_node(&mut self, i: u32) {
        self.unlink(i);
        let node = &mut self.nodes[i as usize];
        self.spilled_bytes -= heap_bytes(&node.entries);
        node.entries = Entries::new();
        let ikey = node.ikey;
        self.map.remove(&ikey);
        if let Some(d) = self.digests.get_mut(i as usize) {
            *d = [0; 24];
        }
        self.free.push(i);
    }

    fn evict_tail(&mut self) {
        let mut t = self.tail;
        // second chance for keys read since they were last moved; each pass clears a flag,
        // so this ends after at most one trip around the list
        while t != NIL && self.nodes[t as usize].referenced {
            self.nodes[t as usize].referenced = false;
            self.unlink(t);
            self.push_front(t);
            t = self.tail;
        }
        if t == NIL {
            return;
        }
        let ikey = self.nodes[t as usize].ikey;
        let entries = std::mem::take(&mut self.nodes[t as usize].entries);
        for e in entries.iter() {
            if let Some(ps) = self.pods.get_mut(&entry_pod(*e)) {
                ps.tiers[entry_tier(*e) as usize] -= 1;
                ps.keys.remove(&ikey);
            }
        }
        self.entries -= entries.len() as u64;
        self.spilled_bytes -= heap_bytes(&entries);
        self.free_node(t);
        self.key_evictions += 1;
    }

    fn node_for_insert(&mut self, ikey: u64, keep_digest: bool) -> u32 {
        if let Some(&i) = self.map.get(&ikey) {
            self.touch(i);
            return i;
        }
        while self.map.len() >= self.cap {
            self.evict_tail();
        }
        let node = Node { ikey, model: 0, prev: NIL, next: NIL, entries: Entries::new(), referenced: false };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                if keep_digest {
                    self.digests.push([0; 24]);
                }
                (self.nodes.len() - 1) as u32
            }
        };
        self.push_front(i);
        self.map.insert(ikey, i);
        i
    }

    /// Returns the key's node (a new node's `model` is the caller's to set).
    fn add(
        &mut self,
        ikey: u64,
        pod: PodId,
        tier: Tier,
        digest: Option<&[u8; 24]>,
        max_per_key: usize,
        keep: bool,
    ) -> u32 {
        let i = self.node_for_insert(ikey, keep);
        if let (Some(d), true) = (digest, keep) {
            self.digests[i as usize] = *d;
        }
        let e = pack(pod, tier);
        let before = heap_bytes(&self.nodes[i as usize].entries);
        let entries = &mut self.nodes[i as usize].entries;
        if let Some(pos) = entries.iter().position(|&x| x == e) {
            // touch within the key: most recent at the end
            entries.remove(pos);
            entries.push(e);
            return i;
        }
        let mut evicted = None;
        if entries.len() >= max_per_key {
            evicted = Some(entries.remove(0));
        }
        entries.push(e);
        let after = heap_bytes(entries);
        self.spilled_bytes += after - before;
        // one lookup for both: the pod's tier count and its reverse set
        let ps = self.pods.entry(pod).or_default();
        ps.tiers[tier as usize] += 1;
        ps.keys.insert(ikey);
        self.entries += 1;
        if let Some(old) = evicted {
            self.entry_evictions += 1;
            self.count(entry_pod(old), entry_tier(old), -1);
            self.drop_pod_key_if_gone(i, entry_pod(old));
        }
        i
    }

    fn remove(&mut self, ikey: u64, pod: PodId, tier: Tier) -> bool {
        let Some(&i) = self.map.get(&ikey) else { return false };
        let e = pack(pod, tier);
        let entries = &mut self.nodes[i as usize].entries;
        let Some(pos) = entries.iter().position(|&x| x == e) else { return false };
        entries.remove(pos);
        self.count(pod, tier, -1);
        self.drop_pod_key_if_gone(i, pod);
        if self.nodes[i as usize].entries.is_empty() {
            self.free_node(i);
        }
        true
    }

    fn clear_pod(&mut self, pod: PodId) -> u64 {
        let Some(PodShard { keys, .. }) = self.pods.remove(&pod) else { return 0 };
        let mut removed = 0;
        for ikey in keys {
            let Some(&i) = self.map.get(&ikey) else { continue };
            let before = heap_bytes(&self.nodes[i as usize].entries);
            let entries = &mut self.nodes[i as usize].entries;
            let n = entries.len();
            entries.retain(|e| entry_pod(*e) != pod);
            removed += (n - entries.len()) as u64;
            let empty = entries.is_empty();
            let after = heap_bytes(entries);
            self.spilled_bytes += after - before;
            if empty {
                self.free_node(i);
            }
        }
        self.entries -= removed;
        removed
    }

    fn bytes_used(&self) -> usize {
        let set_bytes: usize = self.pods.values().map(|p| p.keys.capacity() * 9 + 48 + 8 * MAX_TIERS).sum();
        self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.digests.capacity() * 24
            + self.free.capacity() * 4
            + self.map.capacity() * (std::mem::size_of::<(u64, u32)>() + 1)
            + set_bytes
            + self.pods.capacity() * (std::mem::size_of::<(PodId, PodShard)>() + 1)
            + self.spilled_bytes.max(0) as usize
    }
}

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
        let max_keys = max_keys.max(1);
        // a power of two, so picking a shard is a mask, not a division; small indexes get
        // fewer shards so that each keeps a useful LRU of its own
        let mut n = shards.clamp(1, 4096).next_power_of_two();
        while n > 1 && max_keys / n < 4096 {
            n /= 2;
        }
        // the shard capacities add up to exactly max_keys
        let (per, extra) = (max_keys / n, max_keys % n);
        BlockIndex {
            shards: (0..n).map(|i| Mutex::new(Shard::new(per + usize::from(i < extra)))).collect(),
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
        s.nodes[i as usize].model = model;
    }

    pub fn remove(&self, model: ModelId, pod: PodId, key: BlockKey, tier: Tier) -> bool {
        let ik = model_key(model, key);
        self.shard(ik).lock().remove(ik, pod, tier)
    }

    /// Whether any pod holds `key` under `model`.
    pub fn contains(&self, model: ModelId, key: BlockKey) -> bool {
        let ik = model_key(model, key);
        self.shard(ik).lock().map.contains_key(&ik)
    }

    /// Whether `pod` holds `key` in any tier.
    pub fn holds(&self, model: ModelId, pod: PodId, key: BlockKey) -> bool {
        let ik = model_key(model, key);
        let s = self.shard(ik).lock();
        s.map.get(&ik).map(|&i| s.nodes[i as usize].entries.iter().any(|&e| entry_pod(e) == pod)).unwrap_or(false)
    }

    /// First 24 digest bytes of `key`, when the index holds the key and its digest.
    pub fn digest_hi(&self, model: ModelId, key: BlockKey) -> Option<[u8; 24]> {
        let ik = model_key(model, key);
        let s = self.shard(ik).lock();
        let &i = s.map.get(&ik)?;
        let d = *s.digests.get(i as usize)?;
        (d != [0; 24]).then_some(d)
    }

    /// Copy the entries of `key` into `out` (cleared first) and mark the key referenced
    /// (it survives the next eviction pass). Returns false when the key is absent.
    pub fn lookup_into(&self, model: ModelId, key: BlockKey, out: &mut SmallVec<[u32; 16]>) -> bool {
        out.clear();
        let ik = model_key(model, key);
        let mut s = self.shard(ik).lock();
        let Some(&i) = s.map.get(&ik) else { return false };
        let node = &mut s.nodes[i as usize];
        out.extend_from_slice(&node.entries);
        node.referenced = true;
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
            if let Some(p) = s.lock().pods.get(&pod) {
                for (o, v) in out.iter_mut().zip(&p.tiers) {
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
            for p in s.lock().pods.values() {
                for (o, v) in out.iter_mut().zip(&p.tiers) {
                    *o += v;
                }
            }
        }
        out
    }

    /// Append shard `i`'s keys to `out`, least recently used first (one shard lock held).
    pub fn copy_shard(&self, i: usize, out: &mut Vec<KeyCopy>) {
        let s = self.shards[i].lock();
        out.reserve(s.map.len());
        let mut t = s.tail;
        while t != NIL {
            let n = &s.nodes[t as usize];
            let (digest, entries) = (s.digests.get(t as usize).copied().filter(|d| *d != [0; 24]), n.entries.clone());
            out.push(KeyCopy { ikey: n.ikey, model: n.model, referenced: n.referenced, digest, entries });
            t = n.prev;
        }
    }

    /// Re-create a key as a snapshot recorded it: `entries` oldest first, which makes the key
    /// the most recently used one (restore keys oldest first).
    pub fn restore(&self, model: ModelId, key: BlockKey, digest: Option<&[u8; 24]>, entries: &[u32], referenced: bool) {
        let ik = model_key(model, key);
        let mut s = self.shard(ik).lock();
        for &e in entries {
            let i = s.add(ik, entry_pod(e), entry_tier(e), digest, self.max_per_key, self.keep_digest) as usize;
            (s.nodes[i].model, s.nodes[i].referenced) = (model, referenced);
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
            st.keys += s.map.len() as u64;
            st.entries += s.entries;
            st.key_evictions += s.key_evictions;
            st.entry_evictions += s.entry_evictions;
            st.bytes_used += s.bytes_used() as u64;
        }
        st
    }
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
