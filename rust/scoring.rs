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
pub fn score_keys(
    index: &BlockIndex,
    model: ModelId,
    keys: impl Iterator<Item = BlockKey>,
    filter: Option<&[PodId]>,
    weights: &[f64; MAX_TIERS],
) -> ScoreResult {
    let mut done: Vec<PodScore> = Vec::new();
    let mut alive: Vec<Alive> = Vec::new();
    let mut buf: SmallVec<[u32; 16]> = SmallVec::new();
    let mut consumed = 0usize;
    for (i, key) in keys.enumerate() {
        consumed += 1;
        index.lookup_into(model, key, &mut buf);
        if i == 0 {
            for &e in buf.iter() {
                let pod = entry_pod(e);
                if filter.is_some_and(|f| !f.contains(&pod)) {
                    continue;
                }
                let bit = 1u8 << entry_tier(e);
                match alive.iter_mut().find(|a| a.s.pod == pod) {
                    Some(a) => a.tiers |= bit,
                    None => alive.push(Alive {
                        s: PodScore { pod, matched_blocks: 0, score: 0.0, tier_blocks: [0; MAX_TIERS] },
                        tiers: bit,
                    }),
                }
            }
        } else {
            // narrow each live pod's tier mask to the tiers that still hold this block
            let mut j = 0;
            while j < alive.len() {
                let pod = alive[j].s.pod;
                let mut held = 0u8;
                for &e in buf.iter() {
                    if entry_pod(e) == pod {
                        held |= 1 << entry_tier(e);
                    }
                }
                if held == 0 {
                    done.push(alive.swap_remove(j).s);
                    continue;
                }
                alive[j].tiers = held;
                j += 1;
            }
        }
        if alive.is_empty() {
            break;
        }
        for a in alive.iter_mut() {
            a.s.matched_blocks += 1;
            let mut best = 0.0f64;
            for t in 0..MAX_TIERS {
                if a.tiers & (1 << t) != 0 {
                    best = best.max(weights[t]);
                    // a tier's own run continues only while it held every block so far
                    if a.s.tier_blocks[t] + 1 == a.s.matched_blocks {
                        a.s.tier_blocks[t] += 1;
                    }
                }
            }
            a.s.score += best;
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
        b.score
            .total_cmp(&a.score)
            .then(b.matched_blocks.cmp(&a.matched_blocks))
            .then(a.pod.cmp(&b.pod))
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
