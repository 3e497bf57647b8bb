//! Scorer: per pod, the longest consecutive run of blocks from block 0 it holds (any tier),
//! weighted per tier. Keys are pulled lazily, so hashing stops as soon as no pod can extend
//! its prefix. `rank` then names the pods, lists every candidate (zeros included) and orders
//! the result: the one place those rules live.
//!
//! Pods of hybrid-attention models (several KV-cache groups, `groups.rs`) record which groups
//! hold each block and get vLLM's hybrid hit (`groups::hit`) instead: they stay in the scan
//! while their full-attention groups hold every block, and pods with no full-attention group
//! (sliding window or Mamba only) keep the scan to the end of the prompt, since they may hit
//! without block 0. In a hybrid hit, a block no group holds (outside every window) weighs as
//! GPU; per tier runs count the group slots (`GPU#1`) as tiers of their own.

use std::cmp::Ordering;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::groups::{self, GroupView, PodGroups};
use crate::hashing::BlockKey;
use crate::index::{entry_pod, entry_tier, BlockIndex, ModelId, PodId, MAX_TIERS, TIER_GPU};

/// One pod's prefix run, by pod id (before naming and ranking).
#[derive(Clone, Debug, PartialEq)]
pub struct PrefixRun {
    pub pod: PodId,
    pub matched_blocks: u32,
    /// Sum over matched blocks of the best weight among the tiers holding the block.
    pub score: f64,
    /// Per tier, the longest run of leading blocks held in that tier alone.
    pub tier_blocks: [u32; MAX_TIERS],
}

/// The runs of every pod holding block 0 (filtered), in no particular order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Runs {
    pub runs: Vec<PrefixRun>,
    /// Keys pulled from the iterator (hashed, for token input).
    pub keys_consumed: usize,
}

/// One pod's score, as every caller sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodScore {
    pub pod: Arc<str>,
    pub matched_blocks: u32,
    pub matched_tokens: u64,
    pub score: f64,
    /// Tier name -> longest run of leading blocks held in that tier alone (tiers with 0 left out).
    pub tier_blocks: Vec<(String, u32)>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScoreResult {
    /// Best first, see `best_first`.
    pub scores: Vec<PodScore>,
    /// Full blocks in the prompt.
    pub total_blocks: usize,
    pub total_tokens: usize,
    /// Keys actually computed (hashing stops once no pod can extend its prefix).
    pub keys_computed: usize,
}

/// The result order: score desc, then matched blocks desc, then pod name asc (so equal
/// scores come back in the same order across restarts, whatever ids the pods got).
pub fn best_first(a: &PodScore, b: &PodScore) -> Ordering {
    b.score.total_cmp(&a.score).then(b.matched_blocks.cmp(&a.matched_blocks)).then(a.pod.cmp(&b.pod))
}

/// Name and order `runs`. With `candidates`, every candidate is listed: one never seen by
/// the index, or holding no block 0, gets zeros (duplicates are listed once).
/// `tiers[t]` names tier `t`; `block_size` turns blocks into tokens.
pub fn rank(
    runs: Vec<PrefixRun>,
    candidates: Option<&[&str]>,
    pod_name: impl Fn(PodId) -> Arc<str>,
    tiers: &[String],
    block_size: usize,
) -> Vec<PodScore> {
    let mut scores: Vec<PodScore> = runs
        .into_iter()
        .map(|r| PodScore {
            pod: pod_name(r.pod),
            matched_blocks: r.matched_blocks,
            matched_tokens: r.matched_blocks as u64 * block_size as u64,
            score: r.score,
            tier_blocks: tiers.iter().zip(r.tier_blocks).filter(|(_, n)| *n > 0).map(|(t, n)| (t.clone(), n)).collect(),
        })
        .collect();
    if let Some(names) = candidates {
        let mut listed: hashbrown::HashSet<Arc<str>> = scores.iter().map(|s| s.pod.clone()).collect();
        for &n in names {
            if !listed.contains(n) {
                let pod: Arc<str> = Arc::from(n);
                listed.insert(pod.clone());
                scores.push(PodScore {
                    pod,
                    matched_blocks: 0,
                    matched_tokens: 0,
                    score: 0.0,
                    tier_blocks: Vec::new(),
                });
            }
        }
    }
    scores.sort_by(best_first);
    scores
}

/// What the scan needs besides the index: tier weights and the KV-cache groups.
pub struct Ctx<'a> {
    /// `weights[t]` is the weight of slot `t`.
    pub weights: &'a [f64; MAX_TIERS],
    /// The group each slot holds (0 for a plain tier).
    pub slot_group: &'a [u8; MAX_TIERS],
    /// Pods with groups other than a single full-attention one.
    pub groups: &'a GroupView,
}

/// A hybrid pod's scan: slot masks per block, from block 0.
struct Hybrid {
    groups: Arc<PodGroups>,
    full: u16,
    slots: Vec<u16>,
}

impl Hybrid {
    fn group_mask(slots: u16, slot_group: &[u8; MAX_TIERS]) -> u16 {
        let (mut m, mut g) = (slots, 0u16);
        while m != 0 {
            g |= 1 << slot_group[m.trailing_zeros() as usize];
            m &= m - 1;
        }
        g
    }

    /// Record the next block; false once the hit can no longer grow (a full-attention group
    /// misses it, so it is not recorded).
    fn push(&mut self, slots: u16, slot_group: &[u8; MAX_TIERS]) -> bool {
        if self.full != 0 && Self::group_mask(slots, slot_group) & self.full != self.full {
            return false;
        }
        self.slots.push(slots);
        true
    }

    /// The pod's run under vLLM's hybrid rule; `None` for no hit.
    fn finish(self, pod: PodId, ctx: &Ctx<'_>) -> Option<PrefixRun> {
        let held: Vec<u16> = self.slots.iter().map(|&s| Self::group_mask(s, ctx.slot_group)).collect();
        let n = groups::hit(&self.groups, &held);
        if n == 0 {
            return None;
        }
        let mut run = PrefixRun { pod, matched_blocks: n as u32, score: 0.0, tier_blocks: [0; MAX_TIERS] };
        for (i, &s) in self.slots[..n].iter().enumerate() {
            run.score += if s == 0 { ctx.weights[TIER_GPU as usize] } else { best_weight(s, ctx.weights) };
            extend_tier_runs(&mut run.tier_blocks, s, i as u32 + 1);
        }
        Some(run)
    }
}

struct Alive {
    s: PrefixRun,
    tiers: u16,
}

/// The best weight among the tiers in `mask`.
#[inline]
fn best_weight(mut mask: u16, weights: &[f64; MAX_TIERS]) -> f64 {
    let mut best = 0.0f64;
    while mask != 0 {
        best = best.max(weights[mask.trailing_zeros() as usize]);
        mask &= mask - 1;
    }
    best
}

/// A tier's own run continues only while it held every block so far (`matched` of them).
#[inline]
fn extend_tier_runs(tier_blocks: &mut [u32; MAX_TIERS], mut mask: u16, matched: u32) {
    while mask != 0 {
        let t = mask.trailing_zeros() as usize;
        if tier_blocks[t] + 1 == matched {
            tier_blocks[t] += 1;
        }
        mask &= mask - 1;
    }
}

/// The prefix runs of the key sequence. `filter`: only these pods are eligible.
///
/// Per block the work is O(entries of the key + pods still alive): tier masks are gathered
/// into a scratch array indexed by pod id, then read back for the live pods.
pub fn prefix_runs(
    index: &BlockIndex,
    model: ModelId,
    keys: impl Iterator<Item = BlockKey>,
    filter: Option<&[PodId]>,
    ctx: &Ctx<'_>,
) -> Runs {
    let eligible = |pod: PodId| filter.is_none_or(|f| f.contains(&pod));
    // a pod with no full-attention group may hit without block 0: scan the whole prompt
    let scan_all = ctx.groups.iter().any(|(&p, g)| g.full_mask() == 0 && eligible(p));
    let mut done: Vec<PrefixRun> = Vec::new();
    let mut alive: Vec<Alive> = Vec::new();
    // hybrid pods apart, so that the loop over plain pods stays as it was
    let mut hybrids: Vec<(PodId, Hybrid)> = Vec::new();
    let mut held: Vec<u16> = Vec::new();
    let mut buf: SmallVec<[u32; 16]> = SmallVec::new();
    let mut consumed = 0usize;
    for (i, key) in keys.enumerate() {
        consumed += 1;
        index.lookup_into(model, key, &mut buf);
        for &e in buf.iter() {
            let p = entry_pod(e) as usize;
            if p >= held.len() {
                held.resize(p + 1, 0);
            }
            held[p] |= 1 << entry_tier(e);
        }
        if i > 0 {
            let mut j = 0;
            while j < alive.len() {
                let pod = alive[j].s.pod as usize;
                let mask = held.get(pod).copied().unwrap_or(0);
                if mask == 0 {
                    done.push(alive.swap_remove(j).s);
                    continue;
                }
                alive[j].tiers = mask;
                j += 1;
            }
            let mut j = 0;
            while j < hybrids.len() {
                let (pod, h) = &mut hybrids[j];
                let mask = held.get(*pod as usize).copied().unwrap_or(0);
                if h.push(mask, ctx.slot_group) {
                    j += 1;
                    continue;
                }
                let (pod, h) = hybrids.swap_remove(j);
                done.extend(h.finish(pod, ctx));
            }
        }
        // pods joining: every pod holding block 0; later, only pods with no full-attention
        // group (their leading blocks count as not held)
        if i > 0 && !scan_all {
            for &e in buf.iter() {
                held[entry_pod(e) as usize] = 0;
            }
            if alive.is_empty() && hybrids.is_empty() {
                break;
            }
        }
        for &e in buf.iter().filter(|_| i == 0 || scan_all) {
            let pod = entry_pod(e);
            let mask = std::mem::take(&mut held[pod as usize]);
            if mask == 0 || !eligible(pod) {
                continue;
            }
            match ctx.groups.get(&pod) {
                None if i == 0 => alive.push(Alive {
                    s: PrefixRun { pod, matched_blocks: 0, score: 0.0, tier_blocks: [0; MAX_TIERS] },
                    tiers: mask,
                }),
                Some(g) if i == 0 || (g.full_mask() == 0 && !hybrids.iter().any(|(p, _)| *p == pod)) => {
                    let mut h = Hybrid { full: g.full_mask(), groups: g.clone(), slots: vec![0; i] };
                    if h.push(mask, ctx.slot_group) {
                        hybrids.push((pod, h));
                    }
                }
                _ => {}
            }
        }
        if alive.is_empty() && hybrids.is_empty() && !scan_all {
            break;
        }
        for a in alive.iter_mut() {
            a.s.matched_blocks += 1;
            a.s.score += best_weight(a.tiers, ctx.weights);
            extend_tier_runs(&mut a.s.tier_blocks, a.tiers, a.s.matched_blocks);
        }
    }
    done.extend(alive.into_iter().map(|a| a.s));
    done.extend(hybrids.into_iter().filter_map(|(pod, h)| h.finish(pod, ctx)));
    Runs { runs: done, keys_consumed: consumed }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{TIER_CPU, TIER_GPU};

    fn weights() -> [f64; MAX_TIERS] {
        let mut w = [0.8; MAX_TIERS];
        w[0] = 1.0;
        w
    }

    fn scan(ix: &BlockIndex, keys: impl Iterator<Item = BlockKey>, filter: Option<&[PodId]>) -> Runs {
        let groups = GroupView::default();
        prefix_runs(ix, 0, keys, filter, &Ctx { weights: &weights(), slot_group: &[0; MAX_TIERS], groups: &groups })
    }

    fn by_pod(r: &Runs) -> Vec<PrefixRun> {
        let mut v = r.runs.clone();
        v.sort_by_key(|s| s.pod);
        v
    }

    fn names(id: PodId) -> Arc<str> {
        Arc::from(["zeta", "alpha", "beta", "gamma"][id as usize])
    }

    fn tiers() -> Vec<String> {
        vec!["GPU".into(), "CPU".into()]
    }

    #[test]
    fn longest_prefix_from_block_zero() {
        let ix = BlockIndex::new(100, 8, 4, false);
        for k in [10, 11, 12] {
            ix.add(0, 1, k, TIER_GPU, None);
        }
        for k in [11, 12] {
            ix.add(0, 2, k, TIER_GPU, None); // no block 0: not listed
        }
        ix.add(0, 3, 10, TIER_CPU, None);
        ix.add(0, 3, 11, TIER_GPU, None);
        let r = scan(&ix, [10u64, 11, 12, 13].into_iter(), None);
        let runs = by_pod(&r);
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].pod, runs[0].matched_blocks, runs[0].score), (1, 3, 3.0));
        let p3 = &runs[1];
        assert_eq!((p3.pod, p3.matched_blocks), (3, 2));
        assert!((p3.score - 1.8).abs() < 1e-9);
        assert_eq!(p3.tier_blocks[TIER_CPU as usize], 1);
        assert_eq!(p3.tier_blocks[TIER_GPU as usize], 0);
        assert_eq!(r.keys_consumed, 4);
    }

    #[test]
    fn stops_pulling_keys_when_no_pod_is_left() {
        let ix = BlockIndex::new(100, 8, 4, false);
        ix.add(0, 1, 1, TIER_GPU, None);
        let r = scan(&ix, 1u64..1000, None);
        assert_eq!(r.keys_consumed, 2);
        assert_eq!(r.runs[0].matched_blocks, 1);
    }

    #[test]
    fn the_filter_excludes_pods_not_named() {
        let ix = BlockIndex::new(100, 8, 4, false);
        ix.add(0, 1, 1, TIER_GPU, None);
        ix.add(0, 2, 1, TIER_GPU, None);
        let r = scan(&ix, [1u64].into_iter(), Some(&[2, 3]));
        let got: Vec<_> = r.runs.iter().map(|s| (s.pod, s.matched_blocks)).collect();
        assert_eq!(got, vec![(2, 1)]);
    }

    #[test]
    fn rank_orders_by_score_then_blocks_then_name() {
        let run = |pod, matched_blocks, score| PrefixRun { pod, matched_blocks, score, tier_blocks: [0; MAX_TIERS] };
        // ids in the opposite order of names: the name decides ties
        let runs = vec![run(0, 2, 2.0), run(3, 2, 2.0), run(2, 3, 2.0), run(1, 1, 0.8)];
        let got: Vec<_> = rank(runs, None, names, &tiers(), 16).into_iter().map(|s| s.pod.to_string()).collect();
        assert_eq!(got, ["beta", "gamma", "zeta", "alpha"]);
    }

    #[test]
    fn rank_lists_every_candidate_once_with_zeros() {
        let mut t = [0; MAX_TIERS];
        t[TIER_CPU as usize] = 2;
        let runs = vec![PrefixRun { pod: 2, matched_blocks: 2, score: 1.6, tier_blocks: t }];
        let got = rank(runs, Some(&["new", "beta", "alpha", "new"]), names, &tiers(), 16);
        let pods: Vec<_> = got.iter().map(|s| s.pod.to_string()).collect();
        assert_eq!(pods, ["beta", "alpha", "new"]);
        assert_eq!((got[0].matched_tokens, got[0].tier_blocks.clone()), (32, vec![("CPU".to_string(), 2)]));
        for zero in &got[1..] {
            assert_eq!((zero.matched_blocks, zero.matched_tokens, zero.score), (0, 0, 0.0));
            assert!(zero.tier_blocks.is_empty());
        }
    }
}
