//! The shard layout's invariants, checked by tests after random operations.

use hashbrown::{HashMap, HashSet};

use super::{entry_pod, entry_tier, PodId, Shard, EMPTY, MAX_TIERS, SPILL, TOMB};

impl Shard {
    /// Check every invariant (tests): table <-> live nodes, pod lists and counts, entries.
    pub(in crate::index) fn check(&self) {
        let live: Vec<u32> = (0..self.nodes.len() as u32).filter(|&i| self.nodes[i as usize].live()).collect();
        assert_eq!(live.len(), self.live);
        assert!(self.digests.is_empty() || self.digests.len() == self.nodes.len());
        assert!(self.live <= self.cap);
        assert_eq!(self.table.iter().filter(|&&b| b != EMPTY && b != TOMB).count(), self.live);
        assert_eq!(self.table.iter().filter(|&&b| b == TOMB).count(), self.tombs);
        let listed: HashSet<(PodId, u32)> =
            self.pods.iter().flat_map(|(&p, ps)| ps.nodes.iter().map(move |&i| (p, i))).collect();
        let mut entries = 0u64;
        let mut per_pod: HashMap<PodId, ([i64; MAX_TIERS], u32)> = HashMap::new();
        for &i in &live {
            assert_eq!(self.find(self.ikey(i)), Some(i));
            let es = self.entries(i);
            assert!(!es.is_empty());
            assert_eq!(self.nodes[i as usize].e[1] == SPILL, es.len() > 2);
            entries += es.len() as u64;
            for (k, &e) in es.iter().enumerate() {
                assert!(!es[..k].contains(&e), "a repeated entry");
                let c = per_pod.entry(entry_pod(e)).or_default();
                c.0[entry_tier(e) as usize] += 1;
                if !es[..k].iter().any(|&x| entry_pod(x) == entry_pod(e)) {
                    c.1 += 1;
                    assert!(listed.contains(&(entry_pod(e), i)), "a pod list misses a node");
                }
            }
        }
        assert_eq!(entries, self.entries);
        assert_eq!(per_pod.len(), self.pods.len());
        for (pod, (tiers, keys)) in per_pod {
            let ps = &self.pods[&pod];
            assert_eq!((ps.tiers, ps.keys), (tiers, keys), "pod {pod}");
            assert!(ps.nodes.len() <= 2 * keys as usize + 32);
        }
        let spilled = live.iter().filter(|&&i| self.nodes[i as usize].e[1] == SPILL).count();
        assert_eq!(spilled + self.spill_free.len(), self.spill.len());
    }
}
