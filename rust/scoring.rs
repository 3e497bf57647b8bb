//! Scorer: per pod, the longest consecutive run of blocks from block 0 it holds (any tier),
//! weighted per tier. Keys are pulled lazily, so hashing stops as soon as no pod can extend
//! its prefix. `rank` then names the pods, lists every candidate (zeros included) and orders
//! the result: the one place those rules live.

use std::cmp::Ordering;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::hashing::BlockKey;
use crate::index::{entry_pod, entry_tier, BlockIndex, ModelId, PodId, MAX_TIERS};

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

/// The prefix runs of the key sequence. `filter`: only these pods are eligible.
/// `weights[t]` is the weight of tier `t`.
///
/// Per block the work is O(entries of the key + pods still alive): tier masks are gathered
/// into a scratch array indexed by pod id, then read back for the live pods.
pub fn prefix_runs(
    index: &BlockIndex,
    model: ModelId,
    keys: impl Iterator<Item = BlockKey>,
    filter: Option<&[PodId]>,
    weights: &[f64; MAX_TIERS],
) -> Runs {
    let mut done: Vec<PrefixRun> = Vec::new();
    let mut alive: Vec<Alive> = Vec::new();
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
        if i == 0 {
            for &e in buf.iter() {
                let pod = entry_pod(e);
                let mask = std::mem::take(&mut held[pod as usize]);
                if mask == 0 || filter.is_some_and(|f| !f.contains(&pod)) {
                    continue;
                }
                alive.push(Alive {
                    s: PrefixRun { pod, matched_blocks: 0, score: 0.0, tier_blocks: [0; MAX_TIERS] },
                    tiers: mask,
                });
            }
        } else {
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
            for &e in buf.iter() {
                held[entry_pod(e) as usize] = 0;
            }
        }
        if alive.is_empty() {
            break;
        }
        for a in alive.iter_mut() {
            a.s.matched_blocks += 1;
            a.s.score += best_weight(a.tiers, weights);
            let mut m = a.tiers;
            while m != 0 {
                let t = m.trailing_zeros() as usize;
                // a tier's own run continues only while it held every block so far
                if a.s.tier_blocks[t] + 1 == a.s.matched_blocks {
                    a.s.tier_blocks[t] += 1;
                }
                m &= m - 1;
            }
        }
    }
    done.extend(alive.into_iter().map(|a| a.s));
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
        let r = prefix_runs(&ix, 0, [10u64, 11, 12, 13].into_iter(), None, &weights());
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
        let r = prefix_runs(&ix, 0, 1u64..1000, None, &weights());
        assert_eq!(r.keys_consumed, 2);
        assert_eq!(r.runs[0].matched_blocks, 1);
    }

    #[test]
    fn the_filter_excludes_pods_not_named() {
        let ix = BlockIndex::new(100, 8, 4, false);
        ix.add(0, 1, 1, TIER_GPU, None);
        ix.add(0, 2, 1, TIER_GPU, None);
        let r = prefix_runs(&ix, 0, [1u64].into_iter(), Some(&[2, 3]), &weights());
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
