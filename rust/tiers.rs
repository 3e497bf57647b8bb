//! Tier names (`medium` strings) -> the 4-bit tier ids index entries carry.
//!
//! Engines name their tiers and any publisher can send any string, so the table is guarded
//! against exhaustion by one publisher:
//!
//! * **Reserved names** — the built-in media (`BUILTIN_TIERS`: vLLM's GPU, CPU, FS, OBJ,
//!   STORAGE, Mooncake's DISK, LMCache's CXL; LMCache's lower-case names fold to these) and
//!   every name given a weight in `tier_weights` — always get a slot: a custom name may take a
//!   free slot only while more slots stay free than there are reserved names not registered
//!   yet. Reserved slots are registered on first use and never reclaimed.
//! * **Custom names** (all others) are limited per pod: a pod holds grants (`PodInfo::tier_mask`)
//!   for at most `max_tiers_per_pod` custom slots. A pod at its limit gets its grants
//!   recomputed from its live entries (grants with no live entry are dropped) at most once per
//!   batch; if it is still at its limit the name is refused for that pod only — nothing global
//!   changes, so a refusal for one pod never affects another.
//! * **Reclamation**: when no free slot is left for a custom name, custom slots with no live
//!   entry in the whole index are freed (name and weight cleared) and reused.
//!
//! Invariant: junk names from any number of pods never make a reserved name fail, and one pod
//! can occupy at most `max_tiers_per_pod` custom slots.
//!
//! Ids never alias: a slot is freed only when, under the table's write lock, its live-entry
//! count is zero and no event holds it. Every user of a custom id holds a `TierGuard` (an
//! in-flight count taken under the read lock) from resolving the name until its index
//! updates are done. Counting live entries locks the index shards, which must not happen under
//! the table lock (it is a leaf), so reclaiming is two-phase: mark the idle candidates
//! `draining` (write lock), count live entries (no table lock), then free the candidates that
//! are still draining — resolving a name clears its draining bit, so a slot used between the
//! two phases is never freed. Readers that name entries' tiers (scoring) compare the table's
//! `generation` before and after and retry when a slot was freed meanwhile.

use std::sync::atomic::{AtomicU32, Ordering::*};

use parking_lot::{Mutex, RwLock};

use crate::error::{Error, Result};
use crate::groups::{slot_group, slot_tier, GroupTable, GroupView};
use crate::index::{Tier, MAX_TIERS, TIER_CPU, TIER_GPU};

/// Media real engines send, upper-cased; GPU and CPU hold ids 0 and 1.
pub const BUILTIN_TIERS: &[&str] = &["GPU", "CPU", "DISK", "FS", "OBJ", "STORAGE", "CXL"];
/// Reserved names (built-in plus configured) at most, so that custom names keep 4 slots.
pub const MAX_RESERVED_TIERS: usize = MAX_TIERS - 4;
/// Longest tier name accepted (bytes).
pub const MAX_TIER_NAME: usize = 64;

/// Trimmed and upper-cased; empty or over-long names are invalid.
pub fn normalize(name: &str) -> Result<String> {
    let n = name.trim();
    if n.is_empty() {
        return Err(Error::invalid("tier name is empty"));
    }
    if n.len() > MAX_TIER_NAME {
        return Err(Error::invalid(format!("tier name longer than {MAX_TIER_NAME} bytes")));
    }
    Ok(n.to_ascii_uppercase())
}

struct Table {
    names: [Option<String>; MAX_TIERS],
    weights: [f64; MAX_TIERS],
    /// Bumped whenever a slot is freed.
    generation: u64,
}

impl Table {
    fn find(&self, name: &str) -> Option<Tier> {
        self.names.iter().position(|n| n.as_deref() == Some(name)).map(|i| i as Tier)
    }
    fn free_slots(&self) -> usize {
        self.names.iter().filter(|n| n.is_none()).count()
    }
}

/// A resolved tier id, held while the caller updates the index with it.
pub struct TierGuard<'a> {
    table: Option<&'a TierTable>,
    tier: Tier,
}

impl TierGuard<'_> {
    /// A reserved slot (never reclaimed, so nothing to hold).
    pub fn fixed(tier: Tier) -> Self {
        TierGuard { table: None, tier }
    }
    pub fn tier(&self) -> Tier {
        self.tier
    }
}

impl Drop for TierGuard<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.table {
            t.inflight[self.tier as usize].fetch_sub(1, Release);
        }
    }
}

/// A consistent copy of the names (`""` for a free slot) and weights, with the KV-cache group
/// of each slot and the pods that have groups (`groups.rs`).
pub struct Snapshot {
    pub names: Vec<String>,
    pub weights: [f64; MAX_TIERS],
    pub generation: u64,
    pub slot_group: [u8; MAX_TIERS],
    pub groups: GroupView,
}

/// Per-call budget of the expensive refreshes (each counts live entries in every index shard).
#[derive(Default)]
pub struct Budget {
    pub pod_refreshed: bool,
    pub reclaimed: bool,
}

/// What `acquire` needs to know about the pod and the index.
pub struct PodTiers<'a, P, G> {
    /// The pod's custom-slot grants.
    pub mask: &'a AtomicU32,
    /// The pod's live entries per tier.
    pub pod_live: P,
    /// Live entries per tier in the whole index.
    pub global_live: G,
}

pub struct TierTable {
    table: RwLock<Table>,
    inflight: [AtomicU32; MAX_TIERS],
    draining: AtomicU32,
    reclaiming: Mutex<()>,
    /// Built-in and configured names (upper-case).
    reserved: Vec<String>,
    configured: Vec<(String, f64)>,
    default_weight: f64,
    per_pod: usize,
    /// The pods' KV-cache groups (hybrid models); their slots are custom names here.
    pub groups: GroupTable,
}

impl TierTable {
    /// `weights`: the configured tier weights (names upper-case), `default_weight` for the
    /// others; `per_pod`: custom names a pod may hold.
    pub fn new(weights: &[(String, f64)], default_weight: f64, per_pod: usize) -> Self {
        let mut reserved: Vec<String> = BUILTIN_TIERS.iter().map(|s| s.to_string()).collect();
        for (n, _) in weights {
            if !reserved.contains(n) {
                reserved.push(n.clone());
            }
        }
        let mut names: [Option<String>; MAX_TIERS] = Default::default();
        let mut w = [default_weight; MAX_TIERS];
        let weight = |n: &str| weights.iter().find(|(k, _)| k == n).map_or(default_weight, |(_, v)| *v);
        for (slot, name) in [(TIER_GPU, "GPU"), (TIER_CPU, "CPU")] {
            names[slot as usize] = Some(name.to_string());
            w[slot as usize] = weight(name);
        }
        TierTable {
            table: RwLock::new(Table { names, weights: w, generation: 0 }),
            inflight: Default::default(),
            draining: AtomicU32::new(0),
            reclaiming: Mutex::new(()),
            reserved,
            configured: weights.to_vec(),
            default_weight,
            per_pod,
            groups: GroupTable::default(),
        }
    }

    pub fn is_reserved(&self, name: &str) -> bool {
        self.reserved.iter().any(|r| r == name)
    }

    /// A group's slot (`"GPU#1"`) weighs as its tier.
    fn weight_of(&self, name: &str) -> f64 {
        let name = slot_tier(name);
        self.configured.iter().find(|(k, _)| k == name).map_or(self.default_weight, |(_, v)| *v)
    }

    /// Guard slot `t` (call with the table lock held, read or write).
    fn pin(&self, t: Tier) -> TierGuard<'_> {
        let bit = 1u32 << t;
        if self.draining.load(Relaxed) & bit != 0 {
            self.draining.fetch_and(!bit, Relaxed);
        }
        self.inflight[t as usize].fetch_add(1, Relaxed);
        TierGuard { table: Some(self), tier: t }
    }

    fn guard(&self, table: &Table, t: Tier) -> TierGuard<'_> {
        match table.names[t as usize].as_deref() {
            Some(n) if self.is_reserved(n) => TierGuard { table: None, tier: t },
            _ => self.pin(t),
        }
    }

    /// The registered tier named `name`, without registering it (removals).
    pub fn find(&self, name: &str) -> Result<Option<TierGuard<'_>>> {
        let name = normalize(name)?;
        let table = self.table.read();
        Ok(table.find(&name).map(|t| self.guard(&table, t)))
    }

    /// The tier for a store by a pod, registered on first use, within the pod's limit.
    pub fn acquire<P, G>(&self, name: &str, pod: PodTiers<'_, P, G>, budget: &mut Budget) -> Result<TierGuard<'_>>
    where
        P: FnOnce() -> [i64; MAX_TIERS],
        G: FnOnce() -> [i64; MAX_TIERS],
    {
        let name = normalize(name)?;
        if self.is_reserved(&name) {
            return self.acquire_reserved(&name);
        }
        let PodTiers { mask, pod_live, global_live } = pod;
        let mut pod_live = Some(pod_live);
        let mut global_live = Some(global_live);
        loop {
            {
                let table = self.table.read();
                if let Some(t) = table.find(&name).filter(|&t| mask.load(Relaxed) & (1 << t) != 0) {
                    return Ok(self.pin(t));
                }
            }
            // the pod's grant first: a name refused for the pod never takes a slot
            if (mask.load(Relaxed).count_ones() as usize) >= self.per_pod {
                match pod_live.take() {
                    Some(live) if !budget.pod_refreshed => {
                        budget.pod_refreshed = true;
                        let counts = live();
                        let held = (0..MAX_TIERS).filter(|&t| counts[t] > 0).fold(0u32, |m, t| m | (1 << t));
                        mask.fetch_and(held, Relaxed);
                        continue;
                    }
                    _ => return Err(self.refuse(name, self.per_pod)),
                }
            }
            let mut table = self.table.write();
            let (t, registered_here) = match table.find(&name) {
                Some(t) => (t, false),
                None => match self.free_custom_slot(&table) {
                    Some(t) => {
                        table.names[t as usize] = Some(name.clone());
                        table.weights[t as usize] = self.weight_of(&name);
                        (t, true)
                    }
                    None => {
                        drop(table);
                        match global_live.take() {
                            Some(live) if !budget.reclaimed => {
                                budget.reclaimed = true;
                                self.reclaim(live);
                                continue;
                            }
                            _ => return Err(self.refuse(name, MAX_TIERS)),
                        }
                    }
                },
            };
            let bit = 1u32 << t;
            let granted = mask
                .fetch_update(Relaxed, Relaxed, |m| {
                    if m & bit != 0 {
                        Some(m)
                    } else if (m.count_ones() as usize) < self.per_pod {
                        Some(m | bit)
                    } else {
                        None
                    }
                })
                .is_ok();
            if granted {
                return Ok(self.pin(t));
            }
            // another thread of the same pod took its last grant meanwhile
            if registered_here {
                table.names[t as usize] = None;
                table.weights[t as usize] = self.default_weight;
            }
            return Err(self.refuse(name, self.per_pod));
        }
    }

    fn refuse(&self, name: String, max: usize) -> Error {
        Error::TooManyTiers { max, tier: name }
    }

    /// A free slot a custom name may take: one that leaves a slot for every reserved name
    /// not registered yet.
    fn free_custom_slot(&self, table: &Table) -> Option<Tier> {
        let unregistered = self.reserved.iter().filter(|r| table.find(r).is_none()).count();
        if table.free_slots() <= unregistered {
            return None;
        }
        table.names.iter().position(Option::is_none).map(|i| i as Tier)
    }

    fn acquire_reserved(&self, name: &str) -> Result<TierGuard<'_>> {
        if let Some(t) = self.table.read().find(name) {
            return Ok(TierGuard { table: None, tier: t });
        }
        let mut table = self.table.write();
        if let Some(t) = table.find(name) {
            return Ok(TierGuard { table: None, tier: t });
        }
        // always present: custom names never take the last free slots (see free_custom_slot)
        let Some(t) = table.names.iter().position(Option::is_none) else {
            return Err(self.refuse(name.to_string(), MAX_TIERS));
        };
        table.names[t] = Some(name.to_string());
        table.weights[t] = self.weight_of(name);
        Ok(TierGuard { table: None, tier: t as Tier })
    }

    /// Free the custom slots with no live entry and no guard. Returns how many were freed.
    pub fn reclaim(&self, live: impl FnOnce() -> [i64; MAX_TIERS]) -> usize {
        let _one = self.reclaiming.lock();
        let candidates = {
            let table = self.table.write();
            let mut c = 0u32;
            for (t, n) in table.names.iter().enumerate() {
                let custom = n.as_deref().is_some_and(|n| !self.is_reserved(n));
                if custom && self.inflight[t].load(Acquire) == 0 {
                    c |= 1 << t;
                }
            }
            self.draining.store(c, Relaxed);
            c
        };
        if candidates == 0 {
            return 0;
        }
        let counts = live();
        let mut table = self.table.write();
        let still = self.draining.swap(0, Relaxed) & candidates;
        let mut freed = 0;
        for (t, &live) in counts.iter().enumerate() {
            if still & (1 << t) != 0 && self.inflight[t].load(Acquire) == 0 && live <= 0 {
                table.names[t] = None;
                table.weights[t] = self.default_weight;
                freed += 1;
            }
        }
        if freed > 0 {
            table.generation += 1;
        }
        freed
    }

    pub fn snapshot(&self) -> Snapshot {
        let t = self.table.read();
        let names: Vec<String> = t.names.iter().map(|n| n.clone().unwrap_or_default()).collect();
        let groups = self.groups.view();
        let mut slot_groups = [0; MAX_TIERS];
        // only pods with groups read them: nothing to parse for a fleet without
        if !groups.is_empty() {
            for (g, n) in slot_groups.iter_mut().zip(&names) {
                *g = slot_group(n);
            }
        }
        Snapshot { names, weights: t.weights, generation: t.generation, slot_group: slot_groups, groups }
    }

    pub fn generation(&self) -> u64 {
        self.table.read().generation
    }

    pub fn weights(&self) -> [f64; MAX_TIERS] {
        self.table.read().weights
    }

    /// The name of slot `t`, if registered.
    pub fn name(&self, t: Tier) -> Option<String> {
        self.table.read().names.get(t as usize).cloned().flatten()
    }

    /// Registered names, in slot order.
    pub fn names(&self) -> Vec<String> {
        self.table.read().names.iter().flatten().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: [i64; MAX_TIERS] = [0; MAX_TIERS];

    fn table() -> TierTable {
        TierTable::new(&[("GPU".into(), 1.0), ("CPU".into(), 0.8), ("SSD".into(), 0.3)], 0.8, 2)
    }

    fn acquire<'a>(t: &'a TierTable, name: &str, mask: &AtomicU32, live: [i64; MAX_TIERS]) -> Result<TierGuard<'a>> {
        let pod = PodTiers { mask, pod_live: || live, global_live: || live };
        t.acquire(name, pod, &mut Budget::default())
    }

    #[test]
    fn reserved_names_always_fit_and_are_never_granted() {
        let t = table();
        let (a, b, c, d, e) = Default::default();
        // four pods of junk take every slot custom names may use
        for (i, m) in [&a, &b, &c, &d].into_iter().enumerate() {
            for j in 0..2 {
                let _ = acquire(&t, &format!("junk-{i}-{j}"), m, NONE);
            }
        }
        let reserved = BUILTIN_TIERS.len() + 1; // plus SSD
        assert_eq!(t.names().len(), MAX_TIERS - (reserved - 2));
        assert!(matches!(acquire(&t, "junk-e", &e, [1; MAX_TIERS]), Err(Error::TooManyTiers { max: MAX_TIERS, .. })));
        for name in BUILTIN_TIERS.iter().chain(&["ssd", " disk "]) {
            let g = acquire(&t, name, &e, [1; MAX_TIERS]).unwrap();
            assert_eq!(t.name(g.tier()).unwrap(), name.trim().to_ascii_uppercase());
        }
        assert_eq!(e.load(Relaxed), 0);
        assert_eq!(t.names().len(), MAX_TIERS);
        assert_eq!(t.weights()[t.find("ssd").unwrap().unwrap().tier() as usize], 0.3);
    }

    #[test]
    fn a_pod_is_limited_and_refreshed_from_its_live_entries() {
        let t = table();
        let m = AtomicU32::new(0);
        let x = acquire(&t, "x", &m, NONE).unwrap().tier();
        let y = acquire(&t, "y", &m, NONE).unwrap().tier();
        assert_eq!(m.load(Relaxed).count_ones(), 2);
        // holding entries in both: refused, and the refusal registered nothing
        let mut live = NONE;
        live[x as usize] = 1;
        live[y as usize] = 3;
        assert!(matches!(acquire(&t, "z", &m, live), Err(Error::TooManyTiers { max: 2, .. })));
        assert!(t.find("z").unwrap().is_none());
        assert_eq!(acquire(&t, "x", &m, live).unwrap().tier(), x);
        // x no longer held: its grant goes to z
        live[x as usize] = 0;
        let z = acquire(&t, "z", &m, live).unwrap().tier();
        assert_ne!(z, y);
        assert_eq!(m.load(Relaxed), (1 << y) | (1 << z));
        // a pod refreshes at most once per budget
        let mut budget = Budget { pod_refreshed: true, reclaimed: false };
        let pod = PodTiers { mask: &m, pod_live: || NONE, global_live: || NONE };
        assert!(t.acquire("w", pod, &mut budget).is_err());
    }

    #[test]
    fn idle_custom_slots_are_reclaimed_and_cleared() {
        let t = TierTable::new(&[], 0.8, 4);
        let masks: Vec<AtomicU32> = (0..4).map(|_| AtomicU32::new(0)).collect();
        let mut held = NONE;
        for (i, m) in masks.iter().enumerate() {
            for j in 0..4 {
                if let Ok(g) = acquire(&t, &format!("j{i}{j}"), m, [1; MAX_TIERS]) {
                    held[g.tier() as usize] = 1;
                }
            }
        }
        let gen = t.generation();
        let fresh = AtomicU32::new(0);
        // full, and every custom slot still holds entries
        assert!(acquire(&t, "new", &fresh, held).is_err());
        assert_eq!(t.generation(), gen);
        // once nothing is live, the slots are freed and reused
        let g = acquire(&t, "new", &fresh, NONE).unwrap();
        assert!(t.generation() > gen);
        assert_eq!(t.name(g.tier()).as_deref(), Some("NEW"));
        assert_eq!(t.names().iter().filter(|n| n.starts_with('J')).count(), 0);
        // the guarded slot survives a reclaim, the others are free again
        assert_eq!(t.reclaim(|| NONE), 0);
        drop(g);
        assert_eq!(t.reclaim(|| NONE), 1);
        assert_eq!(t.names(), ["GPU", "CPU"]);
        assert!(t.weights().iter().all(|&w| w == 0.8));
    }

    #[test]
    fn a_slot_used_while_draining_is_kept() {
        let t = TierTable::new(&[], 0.8, 4);
        let m = AtomicU32::new(0);
        let x = acquire(&t, "x", &m, NONE).unwrap().tier(); // guard dropped: idle
        let freed = t.reclaim(|| {
            // between the phases, an event resolves x again and stores under it
            let g = t.find("x").unwrap().unwrap();
            assert_eq!(g.tier(), x);
            NONE
        });
        assert_eq!(freed, 0);
        assert_eq!(t.name(x).as_deref(), Some("X"));
        assert!(normalize(" ").is_err() && normalize(&"a".repeat(65)).is_err());
    }
}
