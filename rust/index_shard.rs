//! One shard of the block index (`index.rs`): a compact layout, about 20 bytes per key plus
//! 4 per entry when a key has at most two entries.
//!
//! * `nodes`: one 20-byte node per key slot (key, two inline entries, model), at stable
//!   indices; a key with more than two entries keeps them all in `spill` instead. Free nodes
//!   form a list threaded through their first entry word.
//! * `table`: open addressing (linear probing, removed buckets marked) of `u32` buckets,
//!   each an 8-bit hash tag above a 24-bit node index, so a probe rarely touches a node that
//!   is not the one sought. The hash is seeded per index: keys come from the network.
//! * `refs`: one bit per node, set by lookups and by adds to a key already held. Eviction is
//!   CLOCK with second chance: a hand sweeps the nodes, clearing set bits, and evicts the
//!   first key whose bit is clear. A new key takes the node freed by the last eviction, just
//!   behind the hand, so it gets a whole sweep before it is considered: LRU order up to the
//!   one bit of recency a sweep keeps.
//! * `pods`: per pod, the nodes holding one of its entries (for clearing a pod in O(its
//!   blocks)) and its entries per tier. A node leaving a pod's list is not searched for:
//!   stale indices stay until the list is twice the pod's live keys, then it is compacted.

use hashbrown::HashMap;

use super::{chunked::Chunked, entry_pod, entry_tier, pack, Entries, PodId, Tier, MAX_TIERS};

/// Bucket and node sentinels. Entries never take these values: pod ids stay below
/// `MAX_PODS`, so a packed entry is at most `0xFFFF_FFEF`.
pub(super) const EMPTY: u32 = u32::MAX;
/// A bucket whose key was removed: probes go on past it, inserts reuse it.
pub(super) const TOMB: u32 = u32::MAX - 1;
pub(super) const SPILL: u32 = u32::MAX - 1;
const FREE: u32 = u32::MAX - 2;
const IDX_BITS: u32 = 24;
const IDX_MASK: u32 = (1 << IDX_BITS) - 1;
/// Nodes a shard may hold (indices `IDX_MASK` and `IDX_MASK - 1` would collide with the empty
/// and removed buckets).
pub(super) const MAX_SHARD_KEYS: usize = IDX_MASK as usize - 2;

/// A key slot: 20 bytes, 4-byte aligned. `e[1] == SPILL`: the entries are `spill[e[0]]`;
/// `e[1] == EMPTY`: one inline entry; `e[1] == FREE`: unused, `e[0]` is the next free node.
#[derive(Clone, Copy)]
struct Node {
    key: [u32; 2],
    e: [u32; 2],
    model: u32,
}

impl Node {
    #[inline]
    fn ikey(&self) -> u64 {
        self.key[0] as u64 | (self.key[1] as u64) << 32
    }
    #[inline]
    fn live(&self) -> bool {
        self.e[1] != FREE
    }
}

#[derive(Default)]
struct PodShard {
    /// Nodes that held an entry of this pod when added (may repeat or be stale).
    nodes: Vec<u32>,
    /// Nodes holding at least one entry of this pod.
    keys: u32,
    tiers: [i64; MAX_TIERS],
}

#[derive(Default)]
pub(super) struct Shard {
    table: Vec<u32>,
    nodes: Chunked<Node>,
    refs: Vec<u64>,
    /// First 24 digest bytes per node, from the first digest this shard is given on (only
    /// when the index keeps digests); zero: unknown.
    digests: Chunked<[u8; 24]>,
    spill: Chunked<Entries>,
    spill_free: Vec<u32>,
    spill_heap: usize,
    free: u32,
    hand: u32,
    seed: u64,
    cap: usize,
    pub(super) live: usize,
    /// Removed buckets in `table`.
    tombs: usize,
    pods: HashMap<PodId, PodShard>,
    pub(super) entries: u64,
    pub(super) key_evictions: u64,
    pub(super) entry_evictions: u64,
}

#[inline]
fn heap_bytes(e: &Entries) -> usize {
    if e.spilled() {
        e.capacity() * 4 + 16
    } else {
        0
    }
}

impl Shard {
    pub(super) fn new(cap: usize, seed: u64) -> Self {
        Shard { cap: cap.clamp(1, MAX_SHARD_KEYS), seed, free: EMPTY, ..Default::default() }
    }

    #[inline]
    fn hash(&self, ikey: u64) -> u64 {
        let m = ((ikey ^ self.seed) as u128).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        (m as u64) ^ ((m >> 64) as u64)
    }

    /// The node holding `ikey`.
    #[inline]
    pub(super) fn find(&self, ikey: u64) -> Option<u32> {
        if self.table.is_empty() {
            return None;
        }
        let mask = self.table.len() - 1;
        let h = self.hash(ikey);
        let tag = (h >> 56) as u32;
        let mut p = h as usize & mask;
        loop {
            let b = self.table[p];
            if b == EMPTY {
                return None;
            }
            if b >> IDX_BITS == tag && b != TOMB && self.nodes[(b & IDX_MASK) as usize].ikey() == ikey {
                return Some(b & IDX_MASK);
            }
            p = (p + 1) & mask;
        }
    }

    fn table_insert(&mut self, ikey: u64, i: u32) {
        let mask = self.table.len() - 1;
        let h = self.hash(ikey);
        let mut p = h as usize & mask;
        while self.table[p] != EMPTY && self.table[p] != TOMB {
            p = (p + 1) & mask;
        }
        if self.table[p] == TOMB {
            self.tombs -= 1;
        }
        self.table[p] = ((h >> 56) as u32) << IDX_BITS | i;
    }

    /// Room for one more key with live and removed buckets at most 4/5 of the table: rebuilt
    /// (reading the nodes in order) twice as large, or as large when removals filled it.
    fn grow_table(&mut self) {
        if (self.live + self.tombs + 1) * 5 <= self.table.len() * 4 {
            return;
        }
        let grow = (self.live + 1) * 5 > self.table.len() * 3;
        let size = if grow { self.table.len() * 2 } else { self.table.len() }.max(16);
        self.table.clear();
        self.table.resize(size, EMPTY);
        self.tombs = 0;
        for i in 0..self.nodes.len() {
            if self.nodes[i].live() {
                self.table_insert(self.nodes[i].ikey(), i as u32);
            }
        }
    }

    fn table_remove(&mut self, ikey: u64) {
        let mask = self.table.len() - 1;
        let h = self.hash(ikey);
        let tag = (h >> 56) as u32;
        let mut p = h as usize & mask;
        loop {
            let b = self.table[p];
            debug_assert!(b != EMPTY, "removing a key the table does not hold");
            if b == EMPTY {
                return;
            }
            if b >> IDX_BITS == tag && b != TOMB && self.nodes[(b & IDX_MASK) as usize].ikey() == ikey {
                break;
            }
            p = (p + 1) & mask;
        }
        // a removed bucket, unless the run ends right after it (no node read either way)
        if self.table[(p + 1) & mask] == EMPTY {
            self.table[p] = EMPTY;
        } else {
            self.table[p] = TOMB;
            self.tombs += 1;
        }
    }

    #[inline]
    pub(super) fn set_ref(&mut self, i: u32, on: bool) {
        let (w, bit) = ((i / 64) as usize, 1u64 << (i % 64));
        if on {
            self.refs[w] |= bit;
        } else {
            self.refs[w] &= !bit;
        }
    }

    #[inline]
    pub(super) fn is_ref(&self, i: u32) -> bool {
        self.refs[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// The entries of live node `i`, least recently touched first.
    #[inline]
    pub(super) fn entries(&self, i: u32) -> &[u32] {
        let n = &self.nodes[i as usize];
        match n.e[1] {
            SPILL => &self.spill[n.e[0] as usize],
            EMPTY => &n.e[..1],
            FREE => &[],
            _ => &n.e,
        }
    }

    pub(super) fn model(&self, i: u32) -> u32 {
        self.nodes[i as usize].model
    }

    pub(super) fn ikey(&self, i: u32) -> u64 {
        self.nodes[i as usize].ikey()
    }

    pub(super) fn set_model(&mut self, i: u32, model: u32) {
        self.nodes[i as usize].model = model;
    }

    pub(super) fn digest(&self, i: u32) -> Option<[u8; 24]> {
        (!self.digests.is_empty()).then(|| self.digests[i as usize]).filter(|d| *d != [0; 24])
    }

    /// Replace the entries of live node `i` (at least one), inline or spilled.
    fn set_entries(&mut self, i: u32, v: &[u32]) {
        debug_assert!(!v.is_empty());
        let node = self.nodes[i as usize];
        if node.e[1] == SPILL {
            let s = node.e[0] as usize;
            if v.len() > 2 {
                let sp = &mut self.spill[s];
                self.spill_heap -= heap_bytes(sp);
                sp.clear();
                sp.extend_from_slice(v);
                self.spill_heap += heap_bytes(sp);
                return;
            }
            self.spill_heap -= heap_bytes(&self.spill[s]);
            self.spill[s] = Entries::new();
            self.spill_free.push(s as u32);
        } else if v.len() > 2 {
            let sp = Entries::from_slice(v);
            self.spill_heap += heap_bytes(&sp);
            let s = match self.spill_free.pop() {
                Some(s) => {
                    self.spill[s as usize] = sp;
                    s
                }
                None => {
                    self.spill.push(sp, Entries::new());
                    (self.spill.len() - 1) as u32
                }
            };
            self.nodes[i as usize].e = [s, SPILL];
            return;
        }
        self.nodes[i as usize].e = [v[0], v.get(1).copied().unwrap_or(EMPTY)];
    }

    fn count(&mut self, pod: PodId, tier: Tier, delta: i64) {
        self.pods.entry(pod).or_default().tiers[tier as usize] += delta;
        self.entries = (self.entries as i64 + delta) as u64;
    }

    /// Node `i` no longer holds any entry of `pod`.
    fn pod_left(&mut self, pod: PodId) {
        let Some(ps) = self.pods.get_mut(&pod) else { return };
        ps.keys -= 1;
        if ps.keys == 0 {
            self.pods.remove(&pod);
            return;
        }
        if ps.nodes.len() > 2 * ps.keys as usize + 32 {
            let mut v = std::mem::take(&mut ps.nodes);
            v.retain(|&i| self.entries_hold(i, pod));
            v.sort_unstable();
            v.dedup();
            v.shrink_to(v.len() * 5 / 4 + 8);
            self.pods.get_mut(&pod).expect("present").nodes = v;
        }
    }

    fn entries_hold(&self, i: u32, pod: PodId) -> bool {
        self.entries(i).iter().any(|&e| entry_pod(e) == pod)
    }

    /// Unlink live node `i` (its entries already accounted for) and put it on the free list.
    fn free_node(&mut self, i: u32) {
        let node = self.nodes[i as usize];
        self.table_remove(node.ikey());
        if node.e[1] == SPILL {
            let s = node.e[0] as usize;
            self.spill_heap -= heap_bytes(&self.spill[s]);
            self.spill[s] = Entries::new();
            self.spill_free.push(s as u32);
        }
        if !self.digests.is_empty() {
            self.digests[i as usize] = [0; 24];
        }
        self.set_ref(i, false);
        self.nodes[i as usize].e = [self.free, FREE];
        self.free = i;
        self.live -= 1;
    }

    /// Evict one key by CLOCK (see the module doc). Ends within one sweep after clearing bits.
    fn evict(&mut self) {
        let n = self.nodes.len() as u32;
        loop {
            if self.hand >= n {
                self.hand = 0;
            }
            let i = self.hand;
            self.hand += 1;
            if !self.nodes[i as usize].live() {
                continue;
            }
            if self.is_ref(i) {
                self.set_ref(i, false);
                continue;
            }
            let es: Entries = Entries::from_slice(self.entries(i));
            for &e in &es {
                self.count(entry_pod(e), entry_tier(e), -1);
            }
            for (k, &e) in es.iter().enumerate() {
                if !es[..k].iter().any(|&x| entry_pod(x) == entry_pod(e)) {
                    self.pod_left(entry_pod(e));
                }
            }
            self.free_node(i);
            self.key_evictions += 1;
            return;
        }
    }

    fn node_for_insert(&mut self, ikey: u64) -> (u32, bool) {
        if let Some(i) = self.find(ikey) {
            return (i, false);
        }
        while self.live >= self.cap {
            self.evict();
        }
        self.grow_table();
        let i = if self.free != EMPTY {
            let i = self.free;
            self.free = self.nodes[i as usize].e[0];
            i
        } else {
            self.nodes
                .push(Node { key: [0; 2], e: [EMPTY; 2], model: 0 }, Node { key: [0; 2], e: [0, FREE], model: 0 });
            if self.refs.len() * 64 < self.nodes.len() {
                self.refs.push(0);
            }
            if !self.digests.is_empty() {
                self.digests.push([0; 24], [0; 24]);
            }
            (self.nodes.len() - 1) as u32
        };
        self.nodes[i as usize] = Node { key: [ikey as u32, (ikey >> 32) as u32], e: [EMPTY; 2], model: 0 };
        self.live += 1;
        self.table_insert(ikey, i);
        (i, true)
    }

    /// Add (or touch) an entry; returns the key's node (a new node's model is the caller's
    /// to set).
    pub(super) fn add(
        &mut self,
        ikey: u64,
        pod: PodId,
        tier: Tier,
        digest: Option<&[u8; 24]>,
        max_per_key: usize,
        keep: bool,
    ) -> u32 {
        let (i, new) = self.node_for_insert(ikey);
        if let (Some(d), true) = (digest, keep) {
            while self.digests.len() < self.nodes.len() {
                // the first digest known in this shard: from now on one per node
                self.digests.push([0; 24], [0; 24]);
            }
            self.digests[i as usize] = *d;
        }
        let e = pack(pod, tier);
        let mut v = Entries::from_slice(if new { &[] } else { self.entries(i) });
        if !new {
            self.set_ref(i, true);
        }
        if let Some(pos) = v.iter().position(|&x| x == e) {
            // touch within the key: most recent at the end
            if pos + 1 != v.len() {
                v.remove(pos);
                v.push(e);
                self.set_entries(i, &v);
            }
            return i;
        }
        let had_pod = v.iter().any(|&x| entry_pod(x) == pod);
        let evicted = (v.len() >= max_per_key).then(|| v.remove(0));
        v.push(e);
        self.set_entries(i, &v);
        let ps = self.pods.entry(pod).or_default();
        ps.tiers[tier as usize] += 1;
        if !had_pod {
            ps.nodes.push(i);
            ps.keys += 1;
        }
        self.entries += 1;
        if let Some(old) = evicted {
            self.entry_evictions += 1;
            self.count(entry_pod(old), entry_tier(old), -1);
            if !v.iter().any(|&x| entry_pod(x) == entry_pod(old)) {
                self.pod_left(entry_pod(old));
            }
        }
        i
    }

    pub(super) fn remove(&mut self, ikey: u64, pod: PodId, tier: Tier) -> bool {
        let Some(i) = self.find(ikey) else { return false };
        let e = pack(pod, tier);
        let mut v = Entries::from_slice(self.entries(i));
        let Some(pos) = v.iter().position(|&x| x == e) else { return false };
        v.remove(pos);
        self.count(pod, tier, -1);
        if !v.iter().any(|&x| entry_pod(x) == pod) {
            self.pod_left(pod);
        }
        if v.is_empty() {
            self.free_node(i);
        } else {
            self.set_entries(i, &v);
        }
        true
    }

    pub(super) fn clear_pod(&mut self, pod: PodId) -> u64 {
        let Some(ps) = self.pods.remove(&pod) else { return 0 };
        let mut removed = 0;
        for i in ps.nodes {
            if !self.nodes[i as usize].live() {
                continue;
            }
            let mut v = Entries::from_slice(self.entries(i));
            let n = v.len();
            v.retain(|e| entry_pod(*e) != pod);
            if v.len() == n {
                continue; // stale or repeated
            }
            removed += (n - v.len()) as u64;
            if v.is_empty() {
                self.free_node(i);
            } else {
                self.set_entries(i, &v);
            }
        }
        self.entries -= removed;
        removed
    }

    pub(super) fn pod_tiers(&self, pod: PodId) -> Option<&[i64; MAX_TIERS]> {
        self.pods.get(&pod).map(|p| &p.tiers)
    }

    pub(super) fn all_pod_tiers(&self) -> impl Iterator<Item = &[i64; MAX_TIERS]> {
        self.pods.values().map(|p| &p.tiers)
    }

    /// Live nodes in the order CLOCK would consider them, starting at the hand.
    pub(super) fn clock_order(&self) -> impl Iterator<Item = u32> + '_ {
        let n = self.nodes.len() as u32;
        let h = if self.hand >= n { 0 } else { self.hand };
        (h..n).chain(0..h).filter(|&i| self.nodes[i as usize].live())
    }

    pub(super) fn bytes_used(&self) -> usize {
        let pod_lists: usize = self.pods.values().map(|p| p.nodes.capacity() * 4).sum();
        self.table.capacity() * 4
            + self.nodes.bytes()
            + self.refs.capacity() * 8
            + self.digests.bytes()
            + self.spill.bytes()
            + self.spill_free.capacity() * 4
            + self.spill_heap
            + pod_lists
            + self.pods.capacity() * (std::mem::size_of::<(PodId, PodShard)>() + 1)
    }
}

#[cfg(test)]
#[path = "index_shard_check.rs"]
mod check;
