//! KV-cache groups of hybrid-attention models (vLLM's hybrid allocator: gpt-oss, Gemma 3,
//! Llama 4, hybrid Mamba models) and vLLM's hybrid cache-hit rule.
//!
//! Each group stores and removes its own copy of a block (`group_idx`, vLLM >= 0.20), so an
//! index entry names the group: group 0 keeps the plain tier slot (`"GPU"`), group `g > 0`
//! takes the slot `"GPU#g"` in the tier table (`tiers.rs`), a custom slot like any other, so
//! `tiers x groups` beyond the 16 slots (or a pod's `max_tiers_per_pod`) is refused and counted
//! (`tiers_refused`). Stores also carry the group's kind and window (vLLM >= 0.22); they are
//! kept per pod (`PodGroups`) and only pods that are not a single full-attention group go
//! through `hit` when scored. A pod without group fields is exactly the single group 0.
//!
//! `hit` follows vLLM 0.33.0 (`vllm/v1/core/`):
//! * `kv_cache_coordinator.py` `HybridKVCacheCoordinator.verify_and_split_kv_cache_groups`:
//!   groups of one spec are looked up together (a block counts only when every one holds it);
//!   full-attention specs first.
//! * `HybridKVCacheCoordinator.find_longest_cache_hit`: each spec group in turn accepts or
//!   shortens the candidate length, repeated until no spec shortens it (one pass for one full
//!   spec plus one other); `UnitaryKVCacheCoordinator.find_longest_cache_hit` for one group.
//!   Hits are aligned to `scheduler_block_size`, the LCM of the groups' block sizes
//!   (`kv_cache_utils.py`); vLLM's partial hash hits (Mamba "align" mode) are not modelled.
//! * `single_type_kv_cache_manager.py` `FullAttentionManager.find_longest_cache_hit`: the
//!   leading run of held blocks. `SlidingWindowManager.find_longest_cache_hit`: scanning from
//!   the end, the first run of `cdiv(window - 1, block_size)` held blocks ends the hit; with no
//!   such run, the run of held blocks from block 0. `MambaManager.find_longest_cache_hit`: the
//!   last held block ends the hit.
//!
//! Not modelled (scored as full attention, which never over-promises): chunked local
//! attention (its chunk size is not published), unknown kinds, and groups whose kind is not
//! published (vLLM 0.20-0.21).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::index::{PodId, MAX_TIERS};

/// Groups a pod may have: each needs a slot of its own.
pub const MAX_GROUPS: usize = MAX_TIERS;
/// Separates a tier name from its group in a slot name (`"GPU#1"`); never in a medium.
pub const GROUP_SEP: char = '#';

/// The slot name of `tier` (normalized) for group `group`.
pub fn slot_name(tier: &str, group: u8) -> String {
    if group == 0 {
        tier.to_string()
    } else {
        format!("{tier}{GROUP_SEP}{group}")
    }
}

/// The group a slot name stands for (0 for a plain tier name).
pub fn slot_group(name: &str) -> u8 {
    name.rsplit_once(GROUP_SEP)
        .and_then(|(_, g)| g.parse().ok())
        .filter(|&g: &u8| (g as usize) < MAX_GROUPS)
        .unwrap_or(0)
}

/// The tier a slot name stands for (`"GPU#1"` -> `"GPU"`).
pub fn slot_tier(name: &str) -> &str {
    name.split_once(GROUP_SEP).map_or(name, |(t, _)| t)
}

/// How a group's manager finds a hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Every block from the start (full attention, MLA, sink attention; also the kinds not
    /// modelled: chunked local, unknown, not published).
    Full,
    /// The blocks inside the window before the hit point (`window` tokens).
    SlidingWindow { window: u32 },
    /// The state at the hit point: one block.
    Mamba,
}

impl Kind {
    /// vLLM's `KVCacheSpecKind` value and `kv_cache_spec_sliding_window`.
    pub fn from_event(kind: Option<&str>, window: Option<i64>) -> Kind {
        match (kind, window) {
            (Some("sliding_window" | "sliding_window_mla"), Some(w)) if w > 0 => {
                Kind::SlidingWindow { window: w.min(u32::MAX as i64) as u32 }
            }
            (Some("mamba"), _) => Kind::Mamba,
            _ => Kind::Full,
        }
    }
    pub fn is_full(self) -> bool {
        self == Kind::Full
    }
    /// The label `/pods` shows.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Full => "full_attention",
            Kind::SlidingWindow { .. } => "sliding_window",
            Kind::Mamba => "mamba",
        }
    }
}

/// One group's spec as published: kind and the engine's block size (tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GroupSpec {
    pub kind: Kind,
    pub block_size: u32,
}

/// (group_idx, kind as scored, sliding window in tokens, engine block size).
pub type GroupInfo = (u8, &'static str, Option<u32>, u32);

/// A pod's groups, by `group_idx`; `unit` is our block size (tokens).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodGroups {
    pub specs: [Option<GroupSpec>; MAX_GROUPS],
    pub unit: u32,
}

impl PodGroups {
    /// A single full-attention group 0 (or nothing known): scored as before groups existed.
    pub fn is_plain(&self) -> bool {
        self.specs.iter().enumerate().all(|(g, s)| match s {
            None => true,
            Some(s) => g == 0 && s.kind.is_full(),
        })
    }
    /// Groups whose every block from the start is needed.
    pub fn full_mask(&self) -> u16 {
        self.specs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some_and(|s| s.kind.is_full()))
            .fold(0, |m, (g, _)| m | 1 << g)
    }
    /// The known groups, for `/pods`.
    pub fn describe(&self) -> Vec<GroupInfo> {
        let window = |k| match k {
            Kind::SlidingWindow { window } => Some(window),
            _ => None,
        };
        self.specs
            .iter()
            .enumerate()
            .filter_map(|(g, s)| s.map(|s| (g as u8, s.kind.label(), window(s.kind), s.block_size)))
            .collect()
    }
    /// Learn group `g`'s spec; true when it changed.
    pub fn learn(&mut self, g: u8, spec: GroupSpec) -> bool {
        let slot = &mut self.specs[g as usize];
        let changed = *slot != Some(spec);
        *slot = Some(spec);
        changed
    }
}

/// The pods whose groups are not plain, shared with the scorer (copy on write: a pod's groups
/// change once, when it first publishes them).
#[derive(Default)]
pub struct GroupTable {
    pods: RwLock<Arc<HashMap<PodId, Arc<PodGroups>>>>,
}

pub type GroupView = Arc<HashMap<PodId, Arc<PodGroups>>>;

impl GroupTable {
    pub fn set(&self, pod: PodId, groups: &PodGroups) {
        let mut w = self.pods.write();
        let mut map = (**w).clone();
        if groups.is_plain() {
            map.remove(&pod);
        } else {
            map.insert(pod, Arc::new(groups.clone()));
        }
        *w = Arc::new(map);
    }
    pub fn forget(&self, pod: PodId) {
        if self.pods.read().contains_key(&pod) {
            let mut w = self.pods.write();
            let mut map = (**w).clone();
            map.remove(&pod);
            *w = Arc::new(map);
        }
    }
    pub fn view(&self) -> GroupView {
        self.pods.read().clone()
    }
}

/// One spec's groups, looked up together.
struct SpecGroup {
    kind: Kind,
    /// Our blocks per engine block of this spec.
    ratio: usize,
    /// Engine block size (tokens).
    block_size: usize,
    members: u16,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The hit length in our blocks for a pod with `groups`, where `held[i]` is the mask of the
/// groups holding our block `i` and `held.len()` bounds the hit.
pub fn hit(groups: &PodGroups, held: &[u16]) -> usize {
    let unit = groups.unit.max(1) as usize;
    let mut specs: Vec<SpecGroup> = Vec::new();
    for (g, s) in groups.specs.iter().enumerate() {
        let Some(s) = s else { continue };
        let bs = (s.block_size as usize).max(unit);
        match specs.iter_mut().find(|x| x.kind == s.kind && x.block_size == bs) {
            Some(x) => x.members |= 1 << g,
            None => specs.push(SpecGroup { kind: s.kind, ratio: (bs / unit).max(1), block_size: bs, members: 1 << g }),
        }
    }
    if specs.is_empty() {
        return 0;
    }
    // full attention first (a stable sort, as vLLM's)
    specs.sort_by_key(|s| !s.kind.is_full());
    // scheduler_block_size: the LCM of the block sizes, in our blocks
    let align = specs.iter().fold(1usize, |l, s| l / gcd(l, s.ratio) * s.ratio);
    let n = held.len();
    let unitary = groups.specs.iter().flatten().count() == 1;
    if unitary {
        return find(&specs[0], held, n, specs[0].ratio);
    }
    let simple = specs.len() == 2 && specs[0].kind.is_full();
    let mut hit_len = n;
    let mut by_spec: Vec<Option<usize>> = vec![None; specs.len()];
    loop {
        let mut curr = hit_len;
        for (i, s) in specs.iter().enumerate() {
            if let (true, Some(h)) = (s.kind.is_full(), by_spec[i]) {
                // downward-closed: trim, no new lookup
                curr = curr.min(h);
                continue;
            }
            curr = find(s, held, curr, align);
            by_spec[i] = Some(curr);
        }
        if curr >= hit_len {
            break;
        }
        hit_len = curr;
        if simple {
            break;
        }
    }
    hit_len
}

/// One spec's `find_longest_cache_hit` with `max_len` our blocks; `align` in our blocks.
fn find(s: &SpecGroup, held: &[u16], max_len: usize, align: usize) -> usize {
    let r = s.ratio;
    let holds = |j: usize| held[j * r..(j + 1) * r].iter().all(|&m| m & s.members == s.members);
    let max_blocks = max_len / r;
    let blocks = match s.kind {
        Kind::Full => {
            let k = (0..max_blocks).take_while(|&j| holds(j)).count();
            let h = k * r;
            return h - h % align;
        }
        Kind::Mamba => {
            (0..max_blocks).rev().find(|&j| holds(j) && ((j + 1) * r).is_multiple_of(align)).map_or(0, |j| j + 1)
        }
        Kind::SlidingWindow { window } => {
            let need = (window as usize).saturating_sub(1).div_ceil(s.block_size);
            let mut run = 0usize;
            let mut found = None;
            for j in (0..max_blocks).rev() {
                if holds(j) {
                    if run == 0 && r != align && !((j + 1) * r).is_multiple_of(align) {
                        continue;
                    }
                    run += 1;
                    if run >= need {
                        found = Some(j + run);
                        break;
                    }
                } else {
                    run = 0;
                }
            }
            match found {
                Some(b) => b,
                None => {
                    // the leading run is a hit even when shorter than the window
                    let mut b = run;
                    while r != align && !(b * r).is_multiple_of(align) {
                        b -= 1;
                    }
                    b
                }
            }
        }
    };
    blocks * r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(kinds: &[Kind]) -> PodGroups {
        let mut p = PodGroups { unit: 16, ..Default::default() };
        for (g, &k) in kinds.iter().enumerate() {
            p.learn(g as u8, GroupSpec { kind: k, block_size: 16 });
        }
        p
    }

    const SW: Kind = Kind::SlidingWindow { window: 33 }; // cdiv(32, 16) = 2 blocks

    #[test]
    fn slot_names_round_trip() {
        assert_eq!((slot_name("GPU", 0), slot_name("CPU", 3)), ("GPU".to_string(), "CPU#3".to_string()));
        assert_eq!((slot_group("CPU#3"), slot_tier("CPU#3"), slot_group("GPU"), slot_group("X#99")), (3, "CPU", 0, 0));
    }

    #[test]
    fn kinds_from_events() {
        assert_eq!(Kind::from_event(Some("sliding_window"), Some(128)), Kind::SlidingWindow { window: 128 });
        assert_eq!(Kind::from_event(Some("sliding_window"), None), Kind::Full);
        assert_eq!(Kind::from_event(Some("chunked_local_attention"), None), Kind::Full);
        assert_eq!(Kind::from_event(Some("mamba"), None), Kind::Mamba);
        assert!(pod(&[Kind::Full]).is_plain() && !pod(&[Kind::Full, SW]).is_plain() && !pod(&[SW]).is_plain());
    }

    #[test]
    fn hybrid_needs_every_group() {
        let p = pod(&[Kind::Full, SW]);
        // both groups hold blocks 0..4
        assert_eq!(hit(&p, &[3, 3, 3, 3]), 4);
        // the sliding group dropped blocks outside its window: still the full hit
        assert_eq!(hit(&p, &[1, 1, 3, 3]), 4);
        // the sliding group misses block 2: the hit ends where its window is held (block 2 is
        // inside the window of a hit at 4, so the hit falls back to 2, held by both)
        assert_eq!(hit(&p, &[3, 3, 1, 3]), 2);
        // full attention lost block 2
        assert_eq!(hit(&p, &[3, 3, 2, 3]), 2);
        // only the sliding group
        assert_eq!(hit(&p, &[2, 2, 2, 2]), 0);
    }

    #[test]
    fn sliding_only_and_mamba() {
        let p = pod(&[SW]);
        assert_eq!(hit(&p, &[0, 0, 1, 1, 0]), 4);
        assert_eq!(hit(&p, &[1, 0, 0, 0]), 1); // the leading run
        let m = pod(&[Kind::Full, Kind::Mamba]);
        assert_eq!(hit(&m, &[3, 1, 1, 3, 1]), 4);
        assert_eq!(hit(&m, &[1, 1, 1]), 0);
    }
}
