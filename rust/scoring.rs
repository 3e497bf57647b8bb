//! Scorer: per pod, the longest consecutive run of blocks from block 0 it holds (any tier),
//! weighted per tier. Keys are pulled lazily, so hashing stops as soon as no pod can extend
//! its prefix.

use smallvec::SmallVec;

use crate::hashing::BlockKey;
use crate::index::{entry_pod, entry_tier, BlockIndex, ModelId, PodId, MAX_TIERS};

#[derive(Clone, Debug, PartialEq)]
pub struct PodScore {
    pub pod: PodId,
    pub matched_blocks: u32,
    /// Sum over matched blocks of the best weight among the tiers holding the block.
    pub score: f64,
    /// Per tier, the longest run of leading blocks held in that tier alone.
    pub tier_blocks: [u32; MAX_TIERS],
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScoreResult {
    /// Best first: score desc, matched blocks desc, pod id asc.
    pub scores: Vec<PodScore>,
    /// Keys pulled from the iterator (hashed, for token input).
    pub keys_consumed: usize,
}

struct Alive {
    s: PodScore,
    tiers: u8,
}

/// Score the key sequence. `filter`: only these pods are eligible (they are all listed in the
/// result, zeros included). `weights[t]` is the weight of tier `t`.
///
/// Per block the work is O(entries of the key + pods still alive): tier masks are gathered
/// into a scratch array indexed by pod id, then read back for the live pods.
pub fn score_keys(
    index: &BlockIndex,
    model: ModelId,
    keys: impl Iterator<Item = BlockKey>,
    filter: Option<&[PodId]>,
    weights: &[f64; MAX_TIERS],
) -> ScoreResult {
    // best weight for every tier mask
    let mut best_of = [0.0f64; 1 << MAX_TIERS];
    for (mask, best) in best_of.iter_mut().enumerate().skip(1) {
        *best = (0..MAX_TIERS).filter(|t| mask & (1 << t) != 0).map(|t| weights[t]).fold(0.0, f64::max);
    }
    let mut done: Vec<PodScore> = Vec::new();
    let mut alive: Vec<Alive> = Vec::new();
    let mut held: Vec<u8> = Vec::new();
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
                    s: PodScore { pod, matched_blocks: 0, score: 0.0, tier_blocks: [0; MAX_TIERS] },
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
            a.s.score += best_of[a.tiers as usize];
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
    if let Some(f) = filter {
        for &pod in f {
            if !done.iter().any(|s| s.pod == pod) {
                done.push(PodScore { pod, matched_blocks: 0, score: 0.0, tier_blocks: [0; MAX_TIERS] });
            }
        }
    }
    done.sort_by(|a, b| {
        b.score.total_cmp(&a.score).then(b.matched_blocks.cmp(&a.matched_blocks)).then(a.pod.cmp(&b.pod))
    });
    ScoreResult { scores: done, keys_consumed: consumed }
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

    #[test]
    fn longest_prefix_from_block_zero() {
        let ix = BlockIndex::new(100, 8, 4, false);
        for k in [10, 11, 12] {
            ix.add(0, 1, k, TIER_GPU, None);
        }
        for k in [11, 12] {
            ix.add(0, 2, k, TIER_GPU, None); // no block 0: scores 0
        }
        ix.add(0, 3, 10, TIER_CPU, None);
        ix.add(0, 3, 11, TIER_GPU, None);
        let r = score_keys(&ix, 0, [10u64, 11, 12, 13].into_iter(), None, &weights());
        assert_eq!(r.scores.len(), 2);
        assert_eq!((r.scores[0].pod, r.scores[0].matched_blocks, r.scores[0].score), (1, 3, 3.0));
        let p3 = &r.scores[1];
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
        let r = score_keys(&ix, 0, 1u64..1000, None, &weights());
        assert_eq!(r.keys_consumed, 2);
        assert_eq!(r.scores[0].matched_blocks, 1);
    }

    #[test]
    fn filter_lists_every_candidate() {
        let ix = BlockIndex::new(100, 8, 4, false);
        ix.add(0, 1, 1, TIER_GPU, None);
        ix.add(0, 2, 1, TIER_GPU, None);
        let r = score_keys(&ix, 0, [1u64].into_iter(), Some(&[2, 5]), &weights());
        let got: Vec<_> = r.scores.iter().map(|s| (s.pod, s.matched_blocks)).collect();
        assert_eq!(got, vec![(2, 1), (5, 0)]);
    }
}
